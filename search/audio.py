"""Audio to HW4 features: the HW4 set's ``Wav2Mel`` recipe, rebuilt without sox.

WAV or FLAC files of any sample rate and sample format, mono or multi-channel, decoded with soundfile
(torchaudio.load needs ffmpeg); another format is refused with the command that converts it.

The recipe (``Wav2Mel``'s sox effects ``channels 1``, ``rate 16000``, ``norm -3``, ``silence``, then a
log-mel spectrogram):

1. mix to mono (mean of the channels, as sox ``channels 1``);
2. resample to 16 kHz with ``torchaudio.functional.resample`` (sox uses its own ``rate`` filter, so
   resampled sources differ from the real set by filter details only);
3. scale the peak to -3 dBFS (sox ``norm -3``);
4. remove silence exactly as sox ``silence 1 0.1 1% -1 0.1 1%`` does (:func:`remove_silence`): a
   sample is loud when the RMS of the 20 ms (320 samples) ending at it exceeds 1 % of full scale,
   37 dB below the peak after step 3. Everything before the first 0.1 s of loud samples in a row is
   cut (so are clicks shorter than that), then every pause of 0.1 s or more, anywhere, is cut whole,
   and the search for 0.1 s of loud samples starts again after it; shorter pauses are kept;
5. ``MelSpectrogram(sample_rate=16000, n_fft=400, hop_length=160, f_min=50, n_mels=40)``, then
   ``log(mel + 1e-9)``, saved as a float32 ``(frames, 40)`` tensor.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from search.errors import first_line
from search.layout import LOG_OFFSET

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
F_MIN = 50.0
N_MELS = 40
NORM_DB = -3.0
SILENCE_THRESHOLD = 0.01  # RMS as a fraction of full scale, after the -3 dB peak normalisation (1 %)
SILENCE_WINDOW = 320  # samples in sox ``silence``'s moving RMS window (rate / 50: 20 ms)
SILENCE_RUN = 1600  # 0.1 s: loud samples in a row that start speech; quiet ones that are cut
SILENT_PEAK = 1e-4  # a file whose peak is below -80 dBFS holds no signal, only dither
MIN_SECONDS = 0.5  # shortest utterance kept after removing silence (51 frames)
MAX_RESAMPLE_KERNEL = 50_000_000  # floats; odd rates like 16001 Hz would need gigabytes of filter
RECIPE = "v2 mono/16000/norm-3/sox-silence-1-0.1-1%-(-1)-0.1-1%/mel400-160-50-40/log+1e-9/min0.5s"

AUDIO_SUFFIXES = (".wav", ".flac")
OTHER_AUDIO_SUFFIXES = (
    *(".m4a", ".mp3", ".aac", ".ogg", ".opus", ".mp4", ".wma", ".webm", ".amr"),
    *(".aif", ".aiff", ".au", ".caf", ".w64", ".wv", ".sph"),
)
CONVERT = "convert it, e.g. ffmpeg -i IN -ac 1 -ar 16000 OUT.wav"
# The first bytes of what is read: RIFF/RIFX/RF64/BW64 ... WAVE (WAV), fLaC (FLAC, maybe after an ID3 tag).
WAV_MAGIC = (b"RIFF", b"RIFX", b"RF64", b"BW64")


class BadAudio(Exception):
    """A file that cannot become an utterance; the message is the reason listed in the summary."""


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Decode a file with soundfile and mix it to mono: (float32 samples, sample rate)."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadAudio(f"cannot read ({exc.strerror or first_line(exc)})") from None
    if size == 0:
        raise BadAudio("empty file (0 bytes)")
    _check_header(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as exc:  # libsndfile, OSError, header errors: all mean "not audio we can read"
        detail = getattr(exc, "error_string", None) or first_line(exc)
        raise BadAudio(f"not readable audio ({detail})") from None
    if data.shape[0] == 0:
        raise BadAudio("no audio samples")
    if not np.isfinite(data).all():
        raise BadAudio("holds NaN or infinite samples")
    return data.mean(axis=1, dtype=np.float32), int(rate)


def _check_header(path: Path) -> None:
    """Refuse a file that is neither WAV nor FLAC inside before libsndfile tries every decoder it has on
    it: random bytes named .wav got "File does not exist or is not a regular file", and its MP3
    decoder's warnings on stderr."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError as exc:
        raise BadAudio(f"cannot read ({exc.strerror or first_line(exc)})") from None
    if (head[:4] in WAV_MAGIC and head[8:12] == b"WAVE") or head[:4] == b"fLaC" or head[:3] == b"ID3":
        return
    raise BadAudio(f"not a WAV or FLAC file inside (corrupt, or another format under this name); {CONVERT}")


def resample(wave: torch.Tensor, rate: int) -> torch.Tensor:
    """Resample a 1-D waveform to 16 kHz (torchaudio's windowed-sinc filter, default settings)."""
    if rate == SAMPLE_RATE:
        return wave
    if rate <= 0:
        raise BadAudio(f"invalid sample rate {rate}")
    g = math.gcd(rate, SAMPLE_RATE)
    orig, new = rate // g, SAMPLE_RATE // g
    width = math.ceil(6 * orig / (min(orig, new) * 0.99))
    if new * (2 * width + orig) > MAX_RESAMPLE_KERNEL:
        raise BadAudio(f"unsupported sample rate {rate} Hz (convert the file to 16 kHz first)")
    return torchaudio.functional.resample(wave, orig_freq=rate, new_freq=SAMPLE_RATE)


def normalise_peak(wave: torch.Tensor) -> torch.Tensor:
    """Scale so the largest absolute sample is -3 dBFS (sox ``norm -3``)."""
    peak = float(wave.abs().max()) if wave.numel() else 0.0
    if peak < SILENT_PEAK:
        raise BadAudio("silent (peak below -80 dBFS)" if peak > 0 else "silent (all samples are zero)")
    return wave * (10.0 ** (NORM_DB / 20.0) / peak)


def remove_silence(wave: torch.Tensor) -> torch.Tensor:
    """A normalised 16 kHz waveform with its silence removed as sox ``silence 1 0.1 1% -1 0.1 1%`` does.

    Why exactly that: the HW4 set's ``Wav2Mel`` runs this sox effect, so features made here have the
    real set's lengths and pause structure only if pauses are cut the same way. sox works sample by
    sample: its state machine is rebuilt here over runs of loud samples (see the module doc), and the
    moving RMS window is emptied at each restart, as sox empties it. Returns the kept samples in order.
    """
    x = wave.detach().double().flatten().numpy()
    n = x.size
    sums = np.concatenate([[0.0], np.cumsum(x * x)])
    limit = SILENCE_WINDOW * SILENCE_THRESHOLD**2  # the window's sum of squares above which it is loud
    window = sums[1:].copy()  # sum of squares of the SILENCE_WINDOW samples ending at each sample
    window[SILENCE_WINDOW:] -= sums[1 : n + 1 - SILENCE_WINDOW]
    loud = window > limit
    counts = np.concatenate([[0], np.cumsum(loud, dtype=np.int64)])  # loud samples before each index
    kept: list[tuple[int, int]] = []
    start = 0  # where sox looks for speech, its RMS window just emptied
    while start < n:
        # The window holds no samples from before start: recount the first SILENCE_WINDOW - 1 samples,
        # and look there (and in the SILENCE_RUN after them) for speech with those flags.
        head = np.arange(start, min(start + SILENCE_WINDOW - 1, n))
        local = np.concatenate(
            [sums[head + 1] - sums[start] > limit, loud[head.size + start :][:SILENCE_RUN]]
        )
        found = _first_window(np.concatenate([[0], np.cumsum(local, dtype=np.int64)]), 0, SILENCE_RUN, True)
        if found is not None and found <= head.size:
            speech: int | None = start + found
        else:  # past the recounted samples, every flag is as first computed
            speech = _first_window(counts, start + head.size + 1, SILENCE_RUN, True)
        if speech is None:
            break
        pause = _first_window(counts, speech + SILENCE_RUN, SILENCE_RUN, False)
        kept.append((speech, n if pause is None else pause))
        if pause is None:
            break
        start = pause + SILENCE_RUN
    if not kept:
        raise BadAudio("silent (no 0.1 s of signal above the silence threshold)")
    flat = wave.flatten()
    return flat[kept[0][0] : kept[0][1]] if len(kept) == 1 else torch.cat([flat[a:b] for a, b in kept])


def _first_window(counts: np.ndarray, start: int, length: int, loud: bool) -> int | None:
    """The first index from ``start`` on where ``length`` loud (or, ``loud=False``, quiet) samples in a
    row begin, from ``counts``, the number of loud samples before each index; None if there is none.

    Looks ahead in doubling steps, so a search costs about the distance to what it finds, not the rest
    of the file (a long recording has many pauses).
    """
    last = counts.size - length  # the last index a run of ``length`` can start at, plus one
    want = length if loud else 0
    size = 4 * length
    while start < last:
        stop = min(last, start + size)
        hits = np.flatnonzero(counts[start + length : stop + length] - counts[start:stop] == want)
        if hits.size:
            return start + int(hits[0])
        start, size = stop, size * 2
    return None


@lru_cache(maxsize=1)
def _mel_transform() -> torchaudio.transforms.MelSpectrogram:
    return torchaudio.transforms.MelSpectrogram(
        sample_rate=SAMPLE_RATE, n_fft=N_FFT, hop_length=HOP_LENGTH, f_min=F_MIN, n_mels=N_MELS
    )


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """``log(MelSpectrogram(wave) + 1e-9)`` as a contiguous float32 ``(frames, 40)`` tensor."""
    with torch.inference_mode():
        mel = _mel_transform()(wave.float())
    return torch.log(mel + LOG_OFFSET).T.contiguous()


def compute_features(wave: np.ndarray | torch.Tensor, rate: int) -> torch.Tensor:
    """The whole recipe on mono samples at ``rate``: resample, normalise, remove silence, log-mel."""
    x = torch.as_tensor(wave, dtype=torch.float32).flatten()
    seconds = x.numel() / rate if rate > 0 else 0.0
    if seconds < MIN_SECONDS:
        raise BadAudio(f"too short ({seconds:.2f} s; need at least {MIN_SECONDS} s)")
    with torch.inference_mode():
        x = normalise_peak(resample(x, rate))
        x = remove_silence(x)
    if x.numel() < MIN_SECONDS * SAMPLE_RATE:
        kept = x.numel() / SAMPLE_RATE
        raise BadAudio(f"too short after removing silence ({kept:.2f} s; need at least {MIN_SECONDS} s)")
    return log_mel(x)


def features_from_file(path: Path) -> torch.Tensor:
    """Read one audio file and compute its HW4 features; raises :class:`BadAudio` with the reason."""
    wave, rate = read_audio(Path(path))
    return compute_features(wave, rate)
