"""search/prepare.py and the recipe in search/audio.py: a generated audio corpus in several layouts -> the
exact HW4 layout."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from rich.console import Console

from search.audio import (
    RECIPE,
    BadAudio,
    compute_features,
    features_from_file,
    normalise_peak,
    remove_silence,
)
from search.data import pack
from search.errors import UserError
from search.layout import read_layout
from search.prepare import STATE_NAME, PrepareReport, feature_name, prepare
from tests.hw4fake import make_hw4

INDEX = ("mapping.json", "metadata.json", "testdata.json", "answers.csv")
NAME = re.compile(r"^uttr-[0-9a-f]{32}\.pt$")

# name -> (f0 Hz, formant centres Hz, layout, sample rate, channels, file format)
VOICES = {
    "id00012": (105.0, (500, 1500, 2500), "session", 16000, 1, "WAV"),
    "id00027": (140.0, (750, 1200, 2600), "flat", 44100, 2, "FLAC"),
    "id00031": (185.0, (300, 2300, 3100), "session", 8000, 1, "WAV"),
    "id00045": (230.0, (600, 1000, 2400), "session", 22050, 1, "WAV"),
    "id00050": (290.0, (400, 1900, 3300), "flat", 16000, 1, "FLAC"),
}
PER_SPEAKER = 8


@dataclass
class Clip:
    path: Path
    key: str
    lead: float  # seconds of near-silence before the voice
    voiced: float
    tail: float


def voice(
    f0: float, formants: tuple[int, ...], seconds: float, rate: int, rng: np.random.Generator
) -> np.ndarray:
    """A harmonic series with vibrato, shaped by formant bumps and a syllable-rate envelope, plus noise."""
    t = np.arange(int(seconds * rate)) / rate
    base = f0 * rng.uniform(0.95, 1.05)
    freq = base * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6)))
    phase = 2 * np.pi * np.cumsum(freq) / rate
    harmonics = np.arange(1, int(min(rate / 2, 4000) * 0.9 / (base * 1.05)) + 1)
    gains = sum(np.exp(-(((harmonics * base - f) / 180.0) ** 2)) for f in formants) + 0.05 / harmonics
    x = (gains[:, None] * np.sin(harmonics[:, None] * phase[None, :])).sum(axis=0)
    x *= 0.65 + 0.35 * np.sin(2 * np.pi * rng.uniform(3, 5) * t) ** 2
    x += rng.normal(0, 0.02 * np.abs(x).max(), size=x.shape)
    return x / np.abs(x).max()


def write_clip(path: Path, samples: np.ndarray, rate: int, channels: int, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if channels == 2:
        samples = np.stack([samples, 0.8 * samples], axis=1)
    sf.write(str(path), samples, rate, format=fmt, subtype="PCM_16")


def padded(x: np.ndarray, rate: int, lead: float, tail: float, rng: np.random.Generator) -> np.ndarray:
    def hush(seconds: float) -> np.ndarray:
        return rng.normal(0, 1e-4, size=int(seconds * rate))

    return np.concatenate([hush(lead), x, hush(tail)])


def build_corpus(root: Path, seed: int = 0) -> list[Clip]:
    rng = np.random.default_rng(seed)
    clips = []
    for spk, (f0, formants, layout, rate, channels, fmt) in VOICES.items():
        for i in range(PER_SPEAKER):
            ext = ".wav" if fmt == "WAV" else ".flac"
            key = f"{spk}/{'sess' + 'AB'[i % 2] + '/' if layout == 'session' else ''}{i:05d}{ext}"
            lead, voiced, tail = rng.uniform(0.3, 0.5), rng.uniform(1.0, 1.6), rng.uniform(0.3, 0.5)
            x = 0.6 * rng.uniform(0.3, 1.0) * voice(f0, formants, voiced, rate, rng)
            write_clip(root / key, padded(x, rate, lead, tail, rng), rate, channels, fmt)
            clips.append(Clip(root / key, key, lead, voiced, tail))
    # A speaker with one usable file (left out), and bad files of every kind.
    write_clip(
        root / "id00099/a/00000.wav", 0.5 * voice(160.0, (500, 1500), 1.2, 16000, rng), 16000, 1, "WAV"
    )
    (root / "id00012/sessA/empty.wav").write_bytes(b"")
    (root / "id00027/notes.wav").write_text("these are not the samples you are looking for\n")
    write_clip(root / "id00031/sessA/silent.wav", np.zeros(8000), 8000, 1, "WAV")
    write_clip(root / "id00045/sessB/click.wav", 0.5 * voice(230.0, (600,), 0.1, 22050, rng), 22050, 1, "WAV")
    write_clip(root / "stray.wav", 0.5 * voice(200.0, (800,), 1.0, 16000, rng), 16000, 1, "WAV")
    (root / "README.txt").write_text("corpus notes\n")
    return clips


Corpus = tuple[Path, list[Clip]]
Prepared = tuple[Path, PrepareReport]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("corpus") / "audio"
    return root, build_corpus(root)


@pytest.fixture(scope="module")
def prepared(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    out = tmp_path_factory.mktemp("prepared") / "Dataset"
    report = prepare(corpus[0], out, progress=False)
    return out, report


def records(out: Path) -> dict[str, dict[str, Any]]:
    lines = (out / STATE_NAME).read_text().splitlines()[1:]
    return {r["source"]: r for r in map(json.loads, lines)}


def index_bytes(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in (*INDEX, STATE_NAME)}


# --------------------------------------------------------------------------------------------------
# The recipe, piece by piece
# --------------------------------------------------------------------------------------------------


def reference_features(path: Path) -> torch.Tensor:
    """The recipe written out directly: mono, resample, norm -3 dB, sox silence, MelSpectrogram, log."""
    data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    x = torch.from_numpy(data.mean(axis=1))
    x = torchaudio.functional.resample(x, rate, 16000)
    x = x * (10 ** (-3 / 20) / x.abs().max())
    x = torch.from_numpy(sox_silence(x.double().numpy())).float()
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=16000, n_fft=400, hop_length=160, f_min=50, n_mels=40
    )(x)
    return torch.log(mel + 1e-9).T


def sox_silence(x: np.ndarray) -> np.ndarray:
    """sox ``silence 1 0.1 1% -1 0.1 1%`` on mono samples, sample by sample as sox's silence.c runs it.

    Trim mode holds loud samples back and drops them at the first quiet one; 1,600 held in a row start
    copy mode. Copy mode holds quiet samples back and flushes them at the next loud one; 1,600 held in
    a row are dropped, the RMS window is emptied, and trim mode starts again. At the end, copy mode's
    held samples are kept, trim mode's dropped. Loud: the mean square of the last 320 samples (the
    window starts empty) above 0.01 ** 2.
    """
    window = [0.0] * 320
    slot, total = 0, 0.0
    out: list[float] = []
    held: list[float] = []
    trimming = True
    for value in x.tolist():
        total += value * value - window[slot]
        window[slot] = value * value
        slot = (slot + 1) % 320
        loud = total / 320 > 0.01**2
        if trimming:
            held = [*held, value] if loud else []
            if len(held) >= 1600:
                out += held
                held, trimming = [], False
        elif loud:
            out += [*held, value]
            held = []
        else:
            held.append(value)
            if len(held) >= 1600:
                held, trimming = [], True
                window, slot, total = [0.0] * 320, 0, 0.0
    if not trimming:
        out += held
    return np.asarray(out)


def test_silence_is_removed_as_sox_removes_it() -> None:
    rng = np.random.default_rng(1)

    def tone(seconds: float) -> np.ndarray:
        return voice(150.0, (700, 1800), seconds, 16000, rng)

    def hush(seconds: float, level: float = 1e-4) -> np.ndarray:
        return rng.normal(0, level, size=int(seconds * 16000))

    click = np.full(800, 0.9)  # 50 ms: shorter than the 0.1 s that starts speech
    cases = {
        "padding, a click, a long pause and a short one": [
            hush(0.25),
            click,
            hush(0.25),
            tone(0.8),
            hush(1.0),
            tone(0.6),
            hush(0.06),
            tone(0.5),
            hush(0.5),
        ],
        "a pause of exactly 0.1 s, speech to the very end": [
            tone(0.4),
            hush(0.1),
            tone(0.3),
            hush(0.099),
            tone(0.3),
        ],
        "noise hovering at the threshold": [
            hush(0.3),
            tone(0.5),
            hush(0.8, 0.0105),
            tone(0.4),
            hush(0.8, 0.0095),
        ],
        "speech that restarts right after a cut": [
            tone(0.3),
            hush(0.1001),
            tone(0.02),
            hush(0.01),
            tone(0.4),
        ],
    }
    # Levels held constant, so that where a sample turns loud depends on what the window holds: speech
    # barely above 1 % resumes 11 samples after sox's restart, with the pause just below 1 %. Counted
    # from an emptied window its 304th sample is the first loud one; from a window still full of the
    # pause it would be the 160th.
    loud, pause = np.resize([0.5, -0.5], 4800), np.full(1930, 0.0099)
    cases["speech resumes as the window is emptied"] = [loud, pause, np.full(4000, 0.0101)]
    for name, parts in cases.items():
        x = torch.from_numpy(np.concatenate(parts))
        x = x.double() if name.startswith("speech resumes") else normalise_peak(x).double()
        kept = remove_silence(x)
        expected = sox_silence(x.numpy())
        assert kept.shape == (expected.size,), name
        assert torch.equal(kept, torch.from_numpy(expected)), name
    # The last case: the loud part and the 20 ms its RMS takes to fall, then the speech from its 304th
    assert remove_silence(x).numel() == (4800 + 319) + (4000 - 303)
    # The first case, in seconds: the voice (1.9 s) and the short pause are kept; padding, click and
    # the long pause go (sox cuts a pause from where the 20-ms RMS falls below 1 %).
    x = normalise_peak(torch.from_numpy(np.concatenate(list(cases.values())[0])))
    assert 1.9 <= remove_silence(x).numel() / 16000 <= 1.9 + 0.06 + 2 * 0.02
    with pytest.raises(BadAudio, match="silent"):
        remove_silence(torch.from_numpy(np.concatenate([hush(0.5), click, hush(0.5)])).float())
    with pytest.raises(BadAudio, match="silent"):
        normalise_peak(torch.zeros(16000))
    with pytest.raises(BadAudio, match="too short"):
        compute_features(np.ones(1000, dtype=np.float32), 16000)


def test_a_pause_inside_an_utterance_is_cut_from_its_features() -> None:
    rng = np.random.default_rng(2)
    speech = voice(120.0, (600, 1700), 1.0, 16000, rng)
    with_pause = np.concatenate([speech, np.zeros(16000), speech])
    frames = compute_features(with_pause.astype(np.float32), 16000)
    assert 200 <= frames.shape[0] <= 203  # 2 s of voice; the 1-s pause is gone
    assert int((frames.max(dim=1).values < -20).sum()) == 0  # no frame sits at the log floor


def test_features_match_the_recipe_computed_directly(prepared: Prepared, corpus: Corpus) -> None:
    out, _ = prepared
    root, clips = corpus
    recs = records(out)
    for clip in (clips[PER_SPEAKER + 3], clips[2 * PER_SPEAKER + 1], clips[0]):  # 44.1k stereo, 8k, 16k
        saved = torch.load(out / recs[clip.key]["feature"], weights_only=True)
        expected = reference_features(clip.path)
        assert saved.dtype == torch.float32 and saved.shape == expected.shape and saved.shape[1] == 40
        torch.testing.assert_close(saved, expected, atol=1e-4, rtol=1e-4)


def test_silence_trimming_shortens_padded_files(prepared: Prepared, corpus: Corpus) -> None:
    out, _ = prepared
    recs = records(out)
    for clip in corpus[1]:
        mel_len = recs[clip.key]["mel_len"]
        untrimmed = 1 + int((clip.lead + clip.voiced + clip.tail) * 16000) // 160
        assert mel_len <= untrimmed - 50, clip.key  # at least 0.6 s of padding removed
        assert abs(mel_len - clip.voiced * 100) <= 6, clip.key  # what is left is the voice


# --------------------------------------------------------------------------------------------------
# The layout
# --------------------------------------------------------------------------------------------------


def test_output_passes_read_layout_and_pack(prepared: Prepared, tmp_path: Path) -> None:
    out, report = prepared
    layout = read_layout(out)
    assert layout.n_mels == 40 and sorted(layout.speakers) == sorted(VOICES)
    assert (report.speakers, report.train, report.test) == (5, 5 * (PER_SPEAKER - 1), 5)
    assert len(layout.train) == report.train and len(layout.test) == report.test
    data = pack(out, tmp_path / "cache", progress=False)
    assert data.n_speakers == 5 and len(data.labelled) == 35 and len(data.test) == 5
    first = layout.train[0]
    assert np.allclose(data.utterance(0), torch.load(out / first.feature_path).numpy(), atol=0.02)


def test_json_files_have_the_hw4_format(prepared: Prepared, corpus: Corpus) -> None:
    out, _ = prepared
    mapping = json.loads((out / "mapping.json").read_text())
    meta = json.loads((out / "metadata.json").read_text())
    testdata = json.loads((out / "testdata.json").read_text())
    assert set(mapping) == {"speaker2id", "id2speaker"}
    assert sorted(mapping["speaker2id"].values()) == list(range(5))
    assert mapping["id2speaker"] == {str(i): s for s, i in mapping["speaker2id"].items()}
    assert all(isinstance(k, str) for k in mapping["id2speaker"])
    assert meta["n_mels"] == 40 and testdata["n_mels"] == 40 and set(meta["speakers"]) == set(VOICES)
    train = [e for entries in meta["speakers"].values() for e in entries]
    for entry in [*train, *testdata["utterances"]]:
        assert set(entry) == {"feature_path", "mel_len"} and NAME.match(entry["feature_path"])
        tensor = torch.load(out / entry["feature_path"], weights_only=True)
        assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (entry["mel_len"], 40)
        assert tensor.is_contiguous() and float(tensor.min()) >= np.log(1e-9) - 1e-3
    assert not {e["feature_path"] for e in train} & {e["feature_path"] for e in testdata["utterances"]}
    # answers.csv: Id,Category in testdata order, each Category the true speaker of that file.
    rows = list(csv.reader((out / "answers.csv").open()))
    assert rows[0] == ["Id", "Category"]
    assert [r[0] for r in rows[1:]] == [u["feature_path"] for u in testdata["utterances"]]
    speaker_of = {r["feature"]: r["speaker"] for r in records(out).values() if "feature" in r}
    assert all(speaker_of[fid] == spk for fid, spk in rows[1:])
    assert sorted(spk for _, spk in rows[1:]) == sorted(VOICES)  # one test utterance per speaker
    assert feature_name(corpus[1][0].key, 0) in speaker_of


def test_bad_files_are_listed_and_the_run_succeeds(prepared: Prepared) -> None:
    out, report = prepared
    reasons = dict(report.skipped)
    assert set(reasons) == {
        "id00012/sessA/empty.wav",
        "id00027/notes.wav",
        "id00031/sessA/silent.wav",
        "id00045/sessB/click.wav",
        "stray.wav",
    }
    assert "empty" in reasons["id00012/sessA/empty.wav"]
    assert "not a WAV or FLAC file inside" in reasons["id00027/notes.wav"]
    assert "silent" in reasons["id00031/sessA/silent.wav"]
    assert "too short" in reasons["id00045/sessB/click.wav"]
    assert "speaker folder" in reasons["stray.wav"]
    assert report.dropped == [("id00099", 1)]
    assert "id00099" not in json.loads((out / "mapping.json").read_text())["speaker2id"]
    console = Console(record=True, width=140)
    console.print(report.render())
    text = console.export_text()
    assert "skipped files" in text and "notes.wav" in text and "id00099 (1)" in text


def test_a_file_that_is_not_wav_or_flac_inside_is_named_so_before_libsndfile_tries_it(tmp_path: Path) -> None:
    """Random bytes named .wav were "not readable audio (File does not exist or is not a regular file
    (possibly a pipe?).)", with libsndfile's MP3 decoder's warnings on stderr."""
    from search.audio import BadAudio, read_audio

    noise = tmp_path / "noise.wav"
    noise.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(
        BadAudio, match=r"not a WAV or FLAC file inside .*ffmpeg -i IN -ac 1 -ar 16000 OUT.wav"
    ):
        read_audio(noise)
    clip = 0.5 * voice(150.0, (700, 1900), 0.5, 16000, np.random.default_rng(1))
    flac, cut = tmp_path / "named.wav", tmp_path / "cut.wav"
    write_clip(flac, clip, 16000, 1, "FLAC")  # FLAC inside, named .wav: read as what it is
    assert read_audio(flac)[1] == 16000
    write_clip(cut, clip, 16000, 1, "WAV")
    cut.write_bytes(cut.read_bytes()[:30])  # a WAV header cut short: libsndfile's own reason
    with pytest.raises(BadAudio, match=r"^not readable audio \("):
        read_audio(cut)


def test_one_speaker_left_when_the_others_files_are_bad_names_the_files_not_the_layout(
    tmp_path: Path,
) -> None:
    audio = tmp_path / "audio"
    small_corpus(audio)
    for wav in (audio / "spk1").iterdir():
        wav.write_bytes(b"not audio")
    with pytest.raises(UserError) as refused:
        prepare(audio, tmp_path / "out", progress=False)
    said = str(refused.value)
    assert "only one speaker ('spk0') has 2 usable utterances" in said and "1 other speaker(s)" in said
    assert "4 of 8 files usable; e.g. spk1/0.wav: not a WAV or FLAC file inside" in said
    assert "point it at the folder" not in said


def test_an_unfinished_prepare_folder_says_so_when_opened(tmp_path: Path) -> None:
    from search.data import open_data

    out = tmp_path / "out"
    out.mkdir()
    (out / STATE_NAME).write_text("{}\n")
    with pytest.raises(
        UserError, match=r"'prepare' has not finished this set .*run the same prepare command"
    ):
        open_data(out, cache_root=tmp_path / "cache", progress=False)


def test_rerun_skips_done_files_and_is_deterministic(
    prepared: Prepared, corpus: Corpus, tmp_path: Path
) -> None:
    out, first = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = {p.name: p.stat().st_mtime_ns for p in copy.glob("uttr-*.pt")}
    report = prepare(corpus[0], copy, progress=False)
    assert report.processed == 0 and report.reused == first.processed == 45
    assert {p.name: p.stat().st_mtime_ns for p in copy.glob("uttr-*.pt")} == before
    assert index_bytes(copy) == index_bytes(out)
    assert report.skipped == first.skipped and report.dropped == first.dropped
    assert not first.index_changed and not report.index_changed  # a first run, then the same set


def test_parallel_fresh_run_gives_identical_outputs(
    prepared: Prepared, corpus: Corpus, tmp_path: Path
) -> None:
    out, _ = prepared
    other = tmp_path / "parallel"
    report = prepare(corpus[0], other, workers=2, progress=False)
    assert report.processed == 45
    assert index_bytes(other) == index_bytes(out)
    names = sorted(p.name for p in out.glob("uttr-*.pt"))
    assert names == sorted(p.name for p in other.glob("uttr-*.pt"))
    for name in names:
        assert torch.equal(torch.load(out / name), torch.load(other / name)), name


# --------------------------------------------------------------------------------------------------
# Resuming after changes, other inputs, errors
# --------------------------------------------------------------------------------------------------


def small_corpus(root: Path, speakers: int = 2, per: int = 4) -> None:
    rng = np.random.default_rng(5)
    for s in range(speakers):
        for i in range(per):
            x = 0.5 * voice(120.0 + 60 * s, (500 + 300 * s, 1800), 0.8, 16000, rng)
            write_clip(root / f"spk{s}" / f"{i}.wav", padded(x, 16000, 0.2, 0.2, rng), 16000, 1, "WAV")


def test_a_set_no_speaker_can_validate_on_says_so_and_test_per_speaker_0_mends_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two files per speaker, one to test: one left to train on, none to hold out for validation. The
    command says so (train would refuse the set) and its advice, --test-per-speaker 0, is accepted."""
    from search.cli import main
    from search.data import make_split, open_data

    audio, out = tmp_path / "audio", tmp_path / "out"
    small_corpus(audio, speakers=3, per=2)
    assert main(["prepare", str(audio), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "no speaker keeps 2 or more training utterances" in err and "--test-per-speaker 0" in err
    with pytest.raises(UserError, match="no speaker has 2 or more labelled utterances"):
        make_split(open_data(out, cache_root=tmp_path / "cache", progress=False))

    argv = ["prepare", str(audio), "--out", str(out), "--quiet", "--workers", "1", "--test-per-speaker", "0"]
    assert main([*argv, "--force"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "no speaker keeps" not in err and f"train with --data {out}" in err
    layout = read_layout(out)
    assert (
        len(layout.test) == 0
        and len(make_split(open_data(out, cache_root=tmp_path / "cache", progress=False)).valid) == 3
    )

    # One file per speaker, none held out: the advice is more files, not what was already asked for.
    single = tmp_path / "single"
    small_corpus(single, speakers=3, per=1)
    argv = ["prepare", str(single), "--out", str(tmp_path / "out1"), "--quiet", "--workers", "1"]
    assert main([*argv, "--test-per-speaker", "0", "--min-utterances", "1"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "no speaker keeps 2 or more training utterances" in err and "--test-per-speaker" not in err
    with pytest.raises(UserError, match="give each speaker more utterances$"):
        make_split(open_data(tmp_path / "out1", cache_root=tmp_path / "cache", progress=False))


def test_a_link_to_a_speaker_folder_in_the_tree_does_not_relabel_it(tmp_path: Path) -> None:
    """``alias -> spk1`` sorts before spk1: its files were read once, as speaker ``alias``, and spk1 was
    gone from the set without a word. Links to folders outside the tree are still followed."""
    audio, elsewhere = tmp_path / "audio", tmp_path / "elsewhere"
    small_corpus(audio, speakers=2, per=2)
    small_corpus(elsewhere, speakers=3, per=2)
    (audio / "alias").symlink_to("spk1", target_is_directory=True)
    (audio / "ext").symlink_to(elsewhere / "spk2", target_is_directory=True)
    (audio / "spk0" / "loop").symlink_to(audio, target_is_directory=True)
    (audio / "spk0" / "borrowed.wav").symlink_to(audio / "spk1" / "0.wav")  # spk1's file, as spk0's too
    (audio / "spk0" / "pooled.wav").symlink_to(elsewhere / "spk0" / "0.wav")  # read nowhere else: kept
    report = prepare(audio, tmp_path / "out", test_per_speaker=0, progress=False, workers=1)
    assert sorted(read_layout(tmp_path / "out").speakers) == ["ext", "spk0", "spk1"]
    assert report.train == 7
    assert ("spk0/borrowed.wav", "a link to spk1/0.wav, which is read under its own name") in report.skipped
    assert ("alias/", "a link to spk1/, which is read under its own name") in report.skipped
    assert (
        "spk0/loop/",
        "a link to the audio folder itself, which is read under its own name",
    ) in report.skipped


def test_resume_after_changes_kills_and_seed_change(tmp_path: Path) -> None:
    audio, out = tmp_path / "audio", tmp_path / "out"
    small_corpus(audio)
    first = prepare(audio, out, test_fraction=0.5, progress=False)
    assert (first.speakers, first.train, first.test, first.processed) == (2, 4, 4, 8)
    recs = records(out)
    # A deleted feature, a rewritten source, a removed source, a torn state line from a killed run.
    (out / recs["spk0/0.wav"]["feature"]).unlink()
    os.utime(audio / "spk0/1.wav", ns=(1, 1))
    (audio / "spk1/3.wav").unlink()
    with (out / STATE_NAME).open("a") as fh:
        fh.write('{"source": "spk1/0.wav", "size": ')
    again = prepare(audio, out, test_fraction=0.5, progress=False)
    assert again.index_changed  # a source is gone: studies made on the first set will refuse this one
    assert (again.processed, again.reused) == (2, 5)
    assert (again.speakers, again.train + again.test) == (2, 7)
    assert not (out / recs["spk1/3.wav"]["feature"]).exists()  # stale feature pruned
    assert len(list(out.glob("uttr-*.pt"))) == 7 and not list(out.glob(".prepare-tmp-*"))
    read_layout(out)
    # Another seed or split would give the finished set a new index: refused, the set left as it was.
    before = index_bytes(out)
    with pytest.raises(
        UserError,
        match=r"holds a set prepared with other options \(--seed 0 -> 3, --test-per-speaker unset -> 1, "
        r"--test-fraction 0.5 -> unset\); .*pass --force to replace it",
    ):
        prepare(audio, out, seed=3, progress=False)
    assert index_bytes(out) == before
    # With --force, a new seed renames features instead of recomputing them; the old names are gone.
    third = prepare(audio, out, seed=3, progress=False, force=True)
    assert third.processed == 0 and third.reused == 7 and third.index_changed
    names = {p.name for p in out.glob("uttr-*.pt")}
    assert names == {feature_name(r, 3) for r in records(out)} and len(names) == 7
    assert (third.train, third.test) == (5, 2)
    read_layout(out)


def test_another_audio_dir_needs_force_and_a_refused_rerun_keeps_the_set(tmp_path: Path) -> None:
    """Another AUDIO_DIR replaced a finished set with one yellow note. With --force and only unreadable
    files it was refused, but had removed the set's index and pruned its features: nothing was left."""
    audio, other, out = tmp_path / "audio", tmp_path / "other", tmp_path / "out"
    small_corpus(audio)
    prepare(audio, out, progress=False)
    before = index_bytes(out)
    features = {p.name: p.read_bytes() for p in out.glob("uttr-*.pt")}
    for speaker in ("x", "y"):
        (other / speaker).mkdir(parents=True)
        (other / speaker / "0.wav").write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(
        UserError, match=rf"\(AUDIO_DIR {re.escape(str(audio))} -> {re.escape(str(other))}\);"
    ):
        prepare(other, out, progress=False)
    assert index_bytes(out) == before
    with pytest.raises(UserError, match="no speaker has 2 usable utterances .*nothing was written"):
        prepare(other, out, progress=False, force=True)
    index_only = {k: v for k, v in before.items() if k != STATE_NAME}
    assert {k: v for k, v in index_bytes(out).items() if k != STATE_NAME} == index_only  # put back
    assert {p.name: p.read_bytes() for p in out.glob("uttr-*.pt")} == features
    again = prepare(audio, out, progress=False)  # the same source as before: no --force needed
    assert (again.processed, again.reused, again.index_changed) == (0, 8, False)


def test_a_stopped_rerun_puts_the_index_back_or_remembers_the_set_it_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during a re-run left a finished set without its index (train: "mapping.json: file not
    found"), and the next run, seeing no index, took another --seed without --force."""
    import search.prepare as prepare_module

    audio, out = tmp_path / "audio", tmp_path / "out"
    small_corpus(audio)
    prepare(audio, out, progress=False)
    before = index_bytes(out)
    for i in range(4):  # new files to decode
        shutil.copy(audio / "spk0" / "0.wav", audio / "spk0" / f"new{i}.wav")
    real_process = prepare_module._process

    def stopped(todo: list[Any], *args: Any) -> None:
        real_process(todo[:2], *args)  # two decoded, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_process", stopped)
    with pytest.raises(KeyboardInterrupt):
        prepare(audio, out, progress=False)
    # No feature the index names was due to be written again: put back, the two new files recorded.
    assert {k: v for k, v in index_bytes(out).items() if k != STATE_NAME} == {
        k: v for k, v in before.items() if k != STATE_NAME
    }
    monkeypatch.undo()
    resumed = prepare(audio, out, progress=False)
    assert (resumed.processed, resumed.reused) == (2, 10)  # they were decoded once (the state kept them)
    for i in range(4):
        (audio / "spk0" / f"new{i}.wav").unlink()
    prepare(audio, out, progress=False)  # back to the set it was
    monkeypatch.setattr(prepare_module, "_process", stopped)
    for wav in audio.glob("*/*.wav"):
        os.utime(wav, ns=(1, 1))  # every file changed: each feature would be computed again
    with pytest.raises(KeyboardInterrupt):
        prepare(audio, out, progress=False)
    assert not (out / "metadata.json").exists()  # the old index no longer describes the features
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"other options \(--seed 0 -> 3\);.*--force"):
        prepare(audio, out, seed=3, progress=False)
    assert not (out / "metadata.json").exists()
    report = prepare(audio, out, progress=False)
    assert (report.processed, report.reused) == (6, 2) and report.train + report.test == 8
    read_layout(out)


def test_a_stopped_rerun_with_another_seed_never_leaves_a_stale_feature_for_the_next(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every source edited (same length), then a --force --seed 1 re-run stopped after two files: the
    old index went back with the new-seed records, and the next seed-0 run took the old-seed files of
    those two, still there and of the recorded size, for current: their features were the old audio's."""
    import search.prepare as prepare_module

    audio, out = tmp_path / "audio", tmp_path / "out"
    small_corpus(audio)
    prepare(audio, out, progress=False)
    rng = np.random.default_rng(9)
    for s in range(2):
        for i in range(4):
            x = 0.5 * voice(300.0 + 60 * s, (900, 2500), 0.8, 16000, rng)
            write_clip(audio / f"spk{s}" / f"{i}.wav", padded(x, 16000, 0.2, 0.2, rng), 16000, 1, "WAV")
    real_process = prepare_module._process

    def stopped(todo: list[Any], *args: Any) -> None:
        real_process(todo[:2], *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_process", stopped)
    with pytest.raises(KeyboardInterrupt):
        prepare(audio, out, seed=1, force=True, progress=False)
    monkeypatch.undo()
    assert (out / "metadata.json").exists()  # nothing it names was rewritten under its own names: put back
    prepare(audio, out, progress=False)
    for key in (f"spk{s}/{i}.wav" for s in range(2) for i in range(4)):
        got = torch.load(out / feature_name(key, 0), weights_only=True)
        assert torch.equal(got, features_from_file(audio / key)), key


def test_a_seed_change_stopped_after_its_renames_decodes_nothing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Features are renamed for a new --seed before the state file is rewritten; a stop in between left
    records naming files that were gone, and the next run decoded the whole set again."""
    import search.prepare as prepare_module

    audio, out = tmp_path / "audio", tmp_path / "out"
    small_corpus(audio)
    prepare(audio, out, progress=False)
    real_plan = prepare_module._plan

    def plan_then_stop(*args: Any) -> Any:
        real_plan(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "_plan", plan_then_stop)
    with pytest.raises(KeyboardInterrupt):
        prepare(audio, out, seed=1, force=True, progress=False)
    monkeypatch.undo()
    again = prepare(audio, out, seed=1, force=True, progress=False)
    assert (again.processed, again.reused) == (0, 8)
    assert {p.name for p in out.glob("uttr-*.pt")} == {feature_name(k, 1) for k in records(out)}


def test_a_set_made_by_an_earlier_recipe_is_recomputed_only_with_force(tmp_path: Path) -> None:
    audio, out = tmp_path / "audio", tmp_path / "out"
    small_corpus(audio)
    prepare(audio, out, test_fraction=0.5, progress=False)
    fresh = {
        name: (out / name).read_bytes() for name in (*INDEX, *(r["feature"] for r in records(out).values()))
    }
    # Make the finished set look like one that version 1 of the recipe (pauses kept) wrote.
    lines = (out / STATE_NAME).read_text().splitlines()
    header = json.loads(lines[0])
    header["recipe"] = "v1 mono/16000/norm-3/trim-rms0.01-w320-h160-run10/mel400-160-50-40/log+1e-9/min0.5s"
    (out / STATE_NAME).write_text("\n".join([json.dumps(header), *lines[1:]]) + "\n")
    stale = out / records(out)["spk0/0.wav"]["feature"]
    torch.save(torch.zeros(90, 40), stale)
    before = index_bytes(out)
    with pytest.raises(UserError, match=r"earlier feature recipe \(v1 .*pass --force to recompute it"):
        prepare(audio, out, test_fraction=0.5, progress=False)
    assert index_bytes(out) == before and torch.equal(
        torch.load(stale, weights_only=True), torch.zeros(90, 40)
    )
    again = prepare(audio, out, test_fraction=0.5, progress=False, force=True)
    assert (again.processed, again.reused) == (8, 0)  # nothing of the earlier recipe is reused
    assert {name: (out / name).read_bytes() for name in fresh} == fresh
    assert json.loads((out / STATE_NAME).read_text().splitlines()[0])["recipe"] == RECIPE


def test_a_refused_first_run_leaves_no_folder_behind(tmp_path: Path) -> None:
    """A list of files that are all missing was refused, but left --out holding a lock and a state file."""
    listing = tmp_path / "list.csv"
    listing.write_text("path,speaker\nmissing-a.wav,a\nmissing-b.wav,b\n")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="nothing was written"):
        prepare(listing, out, progress=False)
    assert not out.exists()
    out.mkdir()  # a folder the user made is theirs: kept
    with pytest.raises(UserError, match="nothing was written"):
        prepare(listing, out, progress=False)
    assert out.is_dir()


def test_audio_in_a_format_it_cannot_read_is_listed_not_silently_left_out(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    small_corpus(audio)
    (audio / "spk0" / "extra.ogg").write_bytes(b"OggS")  # never decoded: only its name matters
    (audio / "spk1" / "notes.txt").write_text("not audio")  # not audio at all: ignored
    (audio / "spk2" / "session").mkdir(parents=True)  # a speaker folder with no audio: listed
    (audio / "spk2" / "session" / "readme.txt").write_text("later")
    report = prepare(audio, tmp_path / "out", progress=False)
    assert [key for key, _ in report.skipped] == ["spk0/extra.ogg", "spk2/"]
    assert report.skipped[1][1] == "a folder with no .wav or .flac files in it"
    assert ".ogg is not read (only .wav and .flac)" in report.skipped[0][1]
    assert report.train + report.test == 8


def test_a_name_that_is_not_utf8_is_listed_not_a_traceback(tmp_path: Path) -> None:
    """A speaker folder named in Latin-1 (bytes no UTF-8 file can hold) stopped prepare with a
    UnicodeEncodeError traceback."""
    from search.cli import main

    audio, out = tmp_path / "audio", tmp_path / "out"
    small_corpus(audio, speakers=3, per=2)
    latin = os.fsencode(audio) + b"/J\xf6rg"
    os.rename(os.fsencode(audio / "spk2"), latin)
    assert main(["prepare", str(audio), "--out", str(out), "--quiet", "--workers", "1"]) == 0
    mapping = json.loads((out / "mapping.json").read_text(encoding="utf-8"))
    assert sorted(mapping["speaker2id"]) == ["spk0", "spk1"]
    report = prepare(audio, out, progress=False)
    assert [reason for _, reason in report.skipped] == [
        "its path is not valid UTF-8 (an old encoding?); rename it"
    ] * 2
    assert [key for key, _ in report.skipped] == ["J\\udcf6rg/0.wav", "J\\udcf6rg/1.wav"]


def test_out_inside_the_audio_folder_and_a_busy_lock(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    small_corpus(audio, speakers=2, per=2)
    out = audio / "features"  # would look like a speaker folder if it were not left out of the scan
    report = prepare(audio, out, test_per_speaker=0, progress=False)
    assert (report.speakers, report.train, report.test, report.skipped) == (2, 4, 0, [])
    assert sorted(read_layout(out).speakers) == ["spk0", "spk1"]
    assert prepare(audio, out, test_per_speaker=0, progress=False).processed == 0
    fcntl = pytest.importorskip("fcntl")
    with (out / ".prepare.lock").open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another 'prepare'"):
            prepare(audio, out, progress=False)


def test_csv_file_list(corpus: Corpus, tmp_path: Path) -> None:
    root, clips = corpus
    lists = tmp_path / "lists"
    lists.mkdir()
    rel = os.path.relpath(root, lists)
    rows = [["path", "speaker"]]
    rows += [[f"{rel}/{c.key}", "alice"] for c in clips[:3]]
    rows += [[f"{rel}/{c.key}", "bob"] for c in clips[PER_SPEAKER : PER_SPEAKER + 3]]
    rows += [[f"{rel}/missing.wav", "bob"], [f"{rel}/{clips[0].key}", "alice"], [f"{rel}/{clips[5].key}", ""]]
    with (lists / "files.csv").open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    report = prepare(lists / "files.csv", tmp_path / "out", test_per_speaker=2, progress=False)
    assert json.loads((tmp_path / "out/mapping.json").read_text())["speaker2id"].keys() == {"alice", "bob"}
    assert (report.speakers, report.train, report.test) == (2, 2, 4)
    reasons = [reason for _, reason in report.skipped]
    assert any("not found" in r for r in reasons) and any("listed twice" in r for r in reasons)
    assert any("empty speaker" in r for r in reasons)
    read_layout(tmp_path / "out")
    (lists / "bad.csv").write_text("file,label\nx.wav,alice\n")
    with pytest.raises(UserError, match="header 'path,speaker'"):
        prepare(lists / "bad.csv", tmp_path / "out2", progress=False)


def test_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found"):
        prepare(tmp_path / "nowhere", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .wav or .flac"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "empty" / "spk0").mkdir()  # speaker folders with nothing in them: not "files lie directly"
    with pytest.raises(UserError, match="no .wav or .flac files found; expected AUDIO_DIR/<speaker>/"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "empty" / "loose.wav").write_bytes(b"RIFF")
    with pytest.raises(UserError, match="audio files lie directly in the folder"):
        prepare(tmp_path / "empty", tmp_path / "out", progress=False)
    (tmp_path / "m4a/id1").mkdir(parents=True)
    (tmp_path / "m4a/id1/a.m4a").write_bytes(b"\0")
    with pytest.raises(UserError, match="convert them first"):
        prepare(tmp_path / "m4a", tmp_path / "out", progress=False)
    audio = tmp_path / "audio"
    small_corpus(audio, speakers=2, per=2)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("...")
    with pytest.raises(UserError, match="not empty"):
        prepare(audio, busy, progress=False)
    with pytest.raises(UserError, match="refusing to overwrite"):
        prepare(audio, make_hw4(tmp_path / "Dataset"), progress=False)
    with pytest.raises(UserError, match="not both"):
        prepare(audio, tmp_path / "out", test_per_speaker=1, test_fraction=0.2, progress=False)
    with pytest.raises(UserError, match="no speaker has 3 usable"):
        prepare(audio, tmp_path / "out", min_utterances=3, progress=False)
    assert not (tmp_path / "out/mapping.json").exists()
    # AUDIO_DIR one level too high: its only folder is taken for the one speaker (100% accuracy, trivially).
    shutil.copytree(audio, tmp_path / "wrapped" / "audio")
    with pytest.raises(
        UserError,
        match="only one speaker \\('audio'\\) has audio files.*at least two.*one folder per speaker",
    ):
        prepare(tmp_path / "wrapped", tmp_path / "out1", progress=False)
    assert not (tmp_path / "out1").exists()  # refused before decoding anything
    # Two speakers, one of them with too few usable files: refused after decoding, the set not written.
    small_corpus(tmp_path / "lopsided", speakers=2, per=2)
    (tmp_path / "lopsided/spk1/1.wav").unlink()
    with pytest.raises(UserError, match="only one speaker \\('spk0'\\) has 2 usable utterances"):
        prepare(tmp_path / "lopsided", tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2/mapping.json").exists()


# --------------------------------------------------------------------------------------------------
# The prepared set trains
# --------------------------------------------------------------------------------------------------


def test_short_training_run_beats_chance(prepared: Prepared, tmp_path: Path) -> None:
    from search.config import Config
    from search.train import train

    out, report = prepared
    config = Config.from_dict(
        {
            "encoder": "transformer", "d_model": 32, "heads": 2, "layers": 1, "ffn_dim": 64, "steps": 150,
            "batch_size": 16, "segment_len": 64, "valid_steps": 150, "lr": 2e-3, "warmup_steps": 10,
            "valid_ratio": 0.25,
        }
    )  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: more threads only spin, and 10x slower on a busy machine
    try:
        result = train(config, pack(out, tmp_path / "cache", progress=False), "cpu")
    finally:
        torch.set_num_threads(threads)
    assert result.best_accuracy > 2 / report.speakers, result


def _spawned_workers(pid: int) -> int:
    """How many multiprocessing workers ``pid`` has started (Linux /proc)."""
    count = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        count += parent == pid and b"spawn_main" in cmdline
    return count


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to see the workers")
def test_ctrl_c_while_workers_start_is_one_line_not_their_tracebacks(tmp_path: Path) -> None:
    """A terminal's Ctrl-C reaches the workers too; while they still import torch (before their own
    handler is set) each used to print a KeyboardInterrupt traceback."""
    import signal
    import subprocess
    import sys
    import time

    rng = np.random.default_rng(0)
    for spk in range(4):
        for utt in range(10):
            write_clip(
                tmp_path / "audio" / f"s{spk}" / f"u{utt}.wav",
                voice(120 + 40 * spk, (700, 1200), 1.0, 16000, rng),
                16000,
                1,
                "WAV",
            )
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.cli", "prepare", "audio", "--out", "out", "--workers", "2", "--quiet"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    try:
        deadline = time.monotonic() + 120
        # Both pool workers have started: they are importing torch right now.
        while _spawned_workers(proc.pid) < 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.005)
        assert proc.poll() is None, "prepare ended before its workers were seen"
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and out.strip().endswith("spkid-search prepare: interrupted"), out


def _slow_extract(path: str, out: str, name: str) -> tuple[str, int, int, str]:
    """A stand-in for one file's work that marks that it ran (in a pool worker: module level)."""
    import time

    (Path(out) / name).write_text(path)
    time.sleep(0.2)
    return "ok", 1, 1, ""


def test_ctrl_c_cancels_the_queue_and_records_every_file_it_finished(tmp_path: Path) -> None:
    """Ctrl-C stops the workers after the files in hand, and each file that ran is recorded.

    It used to leave the pool to a manager thread that fed every queued file to the workers until the
    interpreter's exit, the results unrecorded: a Ctrl-C on a large corpus went on decoding all of it.
    """
    import time

    from search.prepare import Job, Source, _run

    out = tmp_path / "out"
    out.mkdir()
    jobs: list[Job] = [(Source(f"s/{i}.wav", tmp_path / f"{i}.wav", "s"), f"f{i:03d}", {}) for i in range(40)]
    recorded: list[str] = []

    def on_result(job: Job, result: object) -> None:
        recorded.append(job[1])
        if len(recorded) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C in the main thread, where results are recorded

    with pytest.raises(KeyboardInterrupt):
        _run(jobs, out, 2, False, "test", on_result, extract=_slow_extract)
    time.sleep(1.0)  # room for any worker still fed from the queue to show itself
    ran = sorted(p.name for p in out.iterdir())
    assert sorted(recorded) == ran  # every file that ran is recorded, none ran unrecorded
    # The two recorded, plus those in the workers' hands and the pool's queue: a few, not the 40.
    assert 2 <= len(ran) < 20


def test_a_test_split_larger_than_a_speaker_allows_is_reported(tmp_path: Path) -> None:
    """--test-per-speaker 5 on speakers of 3 files keeps one file each for training (2 to test): said,
    not silent."""
    audio = tmp_path / "audio"
    small_corpus(audio, speakers=2, per=3)
    report = prepare(audio, tmp_path / "out", test_per_speaker=5, progress=False)
    assert (report.train, report.test, report.capped) == (2, 4, 2)
    shown = Console(width=120, record=True)
    shown.print(report.render())
    row = [line for line in shown.export_text().splitlines() if "fewer test than asked" in line]
    assert len(row) == 1 and "2 (too few files)" in row[0]
    assert prepare(audio, tmp_path / "out2", progress=False).capped == 0  # the default 1 fits
