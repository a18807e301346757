"""Synthetic speaker-identification data sets in the exact HW4 ``Dataset/`` layout.

The real set (README's Data section; the course's ``shared/hw4-format.md``, outside this repository)
cannot be downloaded here, so tests, benchmarks and dry runs use data made by :func:`generate`:
``mapping.json``, ``metadata.json``, ``testdata.json`` and one ``uttr-<32 hex>.pt`` per utterance
(``torch.save`` of a float32 ``(mel_len, 40)`` log-mel tensor), plus ``answers.csv`` (``Id,Category``,
the true speaker of every test utterance in ``testdata.json`` order) so that a prediction file can be
scored, and ``synth.json`` (how the set was made; it also marks the directory as a synth output that a
later run may replace when forced).

The features are a real learning problem rather than a lookup. Each frame is rendered directly on
the 40 mel bins (HTK mel, 50 Hz - 8 kHz, as the HW4 extractor) from a source-filter model:

* speakers differ in vocal-tract length (a warp of all formants), per-phone formant habits (accent),
  formant bandwidths and amplitudes, pitch and its range (harmonics resolved in the low mel bins),
  spectral tilt, breathiness, nasality, speaking rate, phone usage and a mild static timbre;
* every recording session (about 8 labelled utterances each) has its own channel: a mild colouring,
  sometimes a band limit (bins above the cut-off sit at or near the ``ln(1e-9)`` floor), a background
  noise spectrum and SNR, reverberation and, rarely, digitally silent pauses; on top, every utterance
  gets its own microphone colouring, sometimes a high-pass, and noise/SNR/reverb jitter. Test
  utterances come from held-out sessions of the same speakers, so they are somewhat harder than a
  random validation split;
* within an utterance, syllables of vowels, nasals, approximants, fricatives, stops and short pauses
  follow each other with coarticulated formant tracks, a pitch contour and a loudness contour, and
  periodogram-like noise is added to every bin, so a short crop carries less identity than the whole;
* each utterance is peak-normalised (as ``sox --norm``) so that its maximum lies between +5.8 and +7.3.

Speakers overlap: a linear classifier on per-utterance mean/std features is well above chance and well
below 100%, while models that can read formant positions per phone and pitch harmonics do better.
Everything is drawn from ``numpy.random.SeedSequence(seed)`` children keyed by what is being drawn (the
plan, each speaker, each session, each utterance), so a seed gives byte-identical files whatever the
number of worker processes. Files are written one at a time into a hidden sibling directory that is
renamed into place only when complete, so an interrupted run never looks like a finished set.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from search.errors import UserError, shown
from search.files import check_can_create, install_folder, one_at_a_time, studies_root
from search.layout import LOG_OFFSET

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

#: ``log(0 + 1e-9)``: the value of a bin with no energy at all, as in the HW4 features.
LOG_FLOOR = math.log(LOG_OFFSET)
#: Name of the provenance file that marks a directory as written by this module.
MARKER = "synth.json"
GENERATOR = "search.synth"
_JSON_NAMES = ("mapping.json", "metadata.json", "testdata.json")
_OWN_NAMES = frozenset((*_JSON_NAMES, "answers.csv", MARKER))

F_MIN, F_MAX = 50.0, 8000.0


@dataclass(frozen=True)
class SynthSpec:
    """Size and utterance-length shape of a synthetic set.

    ``utterances`` is the total number of labelled utterances (every speaker gets at least 3, the
    counts vary around the mean), ``test`` the number of unlabelled test utterances. Lengths in frames
    follow the HW4 ``mel_len`` quantiles with their log-distance from the median scaled by
    ``length_spread`` and centred on ``median_len``, then clipped to ``[min_len, max_len]``.
    """

    speakers: int
    utterances: int
    test: int
    median_len: int
    min_len: int
    max_len: int
    length_spread: float = 1.0
    n_mels: int = 40


PRESETS: dict[str, SynthSpec] = {
    "tiny": SynthSpec(
        speakers=8, utterances=96, test=16, median_len=180, min_len=100, max_len=300, length_spread=0.5
    ),
    "small": SynthSpec(
        speakers=40, utterances=2400, test=400, median_len=320, min_len=91, max_len=1200, length_spread=0.7
    ),
    "hw4": SynthSpec(speakers=600, utterances=56666, test=8000, median_len=540, min_len=91, max_len=7193),
}

# HW4 mel_len quantiles (train and test pooled, 64,666 utterances): probability -> frames. The two
# extreme knots sit half an utterance in from the ends, and p(<128) is 2/64,666 as in the real set.
_LEN_QUANTILES = (
    (0.5 / 64666, 91.0),
    (2.0 / 64666, 128.0),
    (0.05, 368.0),
    (0.25, 440.0),
    (0.50, 540.0),
    (0.75, 737.0),
    (0.95, 1337.0),
    (0.99, 2144.0),
    (0.999, 3300.0),
    (1.0 - 0.5 / 64666, 7193.0),
)
_LEN_Z = np.array([NormalDist().inv_cdf(p) for p, _ in _LEN_QUANTILES])
_LEN_LOG = np.log([v for _, v in _LEN_QUANTILES]) - math.log(540.0)


# ---------------------------------------------------------------------------------------------------
# Phone inventory. Formants are for an adult male average vocal tract; speakers warp them.
# Columns: name, class, voicing, F1..F4 (Hz), A1..A4 (dB), F5, B5 (Hz), A5 (dB), level (dB), duration
# (frames, mean). Slot 5 is a nasal murmur, frication band or burst. Classes: v vowel, c consonant,
# s stop (a burst preceded by a closure), x closure, p pause.
_PHONES: tuple[tuple[Any, ...], ...] = (
    ("iy", "v", 1.0, 270, 2290, 3010, 3500, 0, -6, -8, -14, 250, 100, -24, 0, 10),
    ("ih", "v", 1.0, 390, 1990, 2550, 3500, 0, -5, -10, -16, 250, 100, -24, 0, 7),
    ("eh", "v", 1.0, 530, 1840, 2480, 3500, 0, -4, -10, -16, 250, 100, -24, 0, 8),
    ("ae", "v", 1.0, 660, 1720, 2410, 3500, 0, -3, -10, -16, 250, 100, -24, 1, 11),
    ("aa", "v", 1.0, 730, 1090, 2440, 3500, 0, -2, -14, -18, 250, 100, -24, 1, 11),
    ("ao", "v", 1.0, 570, 840, 2410, 3400, 0, -1, -16, -20, 250, 100, -24, 1, 11),
    ("uh", "v", 1.0, 440, 1020, 2240, 3400, 0, -4, -16, -20, 250, 100, -24, 0, 7),
    ("uw", "v", 1.0, 300, 870, 2240, 3400, 0, -6, -18, -22, 250, 100, -24, 0, 10),
    ("ah", "v", 1.0, 640, 1190, 2390, 3500, 0, -3, -14, -18, 250, 100, -24, 0, 7),
    ("er", "v", 1.0, 490, 1350, 1690, 3300, 0, -4, -6, -16, 250, 100, -24, 0, 10),
    ("ax", "v", 1.0, 500, 1500, 2500, 3500, 0, -5, -12, -18, 250, 100, -24, -3, 5),
    ("m", "c", 1.0, 250, 1000, 2200, 3300, -4, -18, -22, -26, 250, 60, 0, -6, 6),
    ("n", "c", 1.0, 250, 1500, 2500, 3300, -4, -18, -22, -26, 250, 60, 0, -6, 6),
    ("ng", "c", 1.0, 250, 2000, 2700, 3300, -4, -18, -22, -26, 250, 60, 0, -6, 6),
    ("l", "c", 1.0, 360, 1300, 2700, 3400, 0, -6, -12, -18, 250, 100, -30, -3, 6),
    ("r", "c", 1.0, 420, 1300, 1600, 3200, 0, -5, -8, -18, 250, 100, -30, -3, 6),
    ("w", "c", 1.0, 300, 700, 2200, 3300, 0, -6, -18, -22, 250, 100, -30, -4, 5),
    ("y", "c", 1.0, 280, 2200, 2900, 3500, 0, -6, -8, -16, 250, 100, -30, -4, 5),
    ("v", "c", 0.6, 300, 1300, 2300, 3400, -6, -14, -18, -20, 4000, 3000, -10, -10, 6),
    ("z", "c", 0.6, 300, 1500, 2500, 3500, -8, -16, -20, -24, 5500, 1200, -2, -10, 7),
    ("dh", "c", 0.7, 300, 1400, 2500, 3500, -6, -14, -18, -22, 4000, 3000, -12, -10, 4),
    ("f", "c", 0.0, 500, 1500, 2500, 3500, -30, -30, -30, -30, 5000, 4000, -6, -16, 8),
    ("th", "c", 0.0, 500, 1500, 2500, 3500, -30, -30, -30, -30, 5500, 4000, -8, -18, 7),
    ("s", "c", 0.0, 500, 1500, 2500, 3500, -30, -30, -30, -30, 6200, 1200, 0, -8, 9),
    ("sh", "c", 0.0, 500, 1500, 2500, 3500, -30, -30, -30, -30, 3000, 700, 0, -8, 9),
    ("h", "c", 0.0, 600, 1300, 2400, 3400, 0, -4, -10, -16, 3000, 3000, -40, -15, 5),
    ("p", "s", 0.0, 500, 1500, 2500, 3500, -30, -30, -30, -30, 1000, 1500, 0, -14, 2),
    ("t", "s", 0.0, 500, 1500, 2500, 3500, -30, -30, -30, -30, 4500, 1500, 0, -14, 2),
    ("k", "s", 0.0, 500, 1500, 2500, 3500, -30, -30, -30, -30, 2200, 800, 0, -14, 2),
    ("b", "s", 0.3, 500, 1500, 2500, 3500, -20, -30, -30, -30, 1000, 1500, 0, -16, 2),
    ("d", "s", 0.3, 500, 1500, 2500, 3500, -20, -30, -30, -30, 4000, 1500, 0, -16, 2),
    ("g", "s", 0.3, 500, 1500, 2500, 3500, -20, -30, -30, -30, 2000, 800, 0, -16, 2),
    ("cl", "x", 0.0, 500, 1500, 2500, 3500, -40, -40, -40, -40, 1000, 1000, -40, -35, 5),
    ("vcl", "x", 0.8, 200, 1500, 2500, 3500, 0, -30, -40, -40, 1000, 1000, -40, -22, 5),
    ("pau", "p", 0.0, 500, 1500, 2500, 3500, -40, -40, -40, -40, 1000, 1000, -40, -50, 16),
)
_NAMES = [p[0] for p in _PHONES]
_CLASS = np.array([p[1] for p in _PHONES])
_VOICING = np.array([p[2] for p in _PHONES], dtype=np.float32)
_FORMANTS = np.array([p[3:7] for p in _PHONES], dtype=np.float64)
_FORMANT_DB = np.array([p[7:11] for p in _PHONES], dtype=np.float64)
_SLOT5 = np.array([p[11:14] for p in _PHONES], dtype=np.float64)
_LEVEL_DB = np.array([p[14] for p in _PHONES], dtype=np.float32)
_DURATION = np.array([p[15] for p in _PHONES], dtype=np.float64)
_VOWELS = np.flatnonzero(_CLASS == "v")
_CONSONANTS = np.flatnonzero((_CLASS == "c") | (_CLASS == "s"))
_IS_STOP = _CLASS == "s"
_CLOSURE = _NAMES.index("cl")
_VOICED_CLOSURE = _NAMES.index("vcl")
_PAUSE = _NAMES.index("pau")
_QUIET = (_CLASS == "x") | (_CLASS == "p")
_BANDWIDTHS = np.array([80.0, 100.0, 140.0, 200.0])
_N_RES = 5  # resonances per frame: F1..F4 and slot 5
_HARMONIC_BINS = 16  # only the lowest mel bins are narrow enough to resolve pitch harmonics


@dataclass(frozen=True)
class _Geometry:
    """Where the mel bins are and how wide, for ``n_mels`` HTK mel filters from 50 Hz to 8 kHz."""

    centre: F32  # Hz
    width: F32  # Lorentzian half-width equivalent of filter plus analysis window, Hz
    sigma: F32  # Gaussian std equivalent, Hz (how much harmonic ripple survives)
    octave: F32  # log2(centre / 100 Hz)
    jitter: F32  # std of the log-power fluctuation of a periodogram averaged over the filter


def _geometry(n_mels: int) -> _Geometry:
    def mel(f: float) -> float:
        return 2595.0 * math.log10(1.0 + f / 700.0)

    pts_mel = np.linspace(mel(F_MIN), mel(F_MAX), n_mels + 2)
    pts = 700.0 * (10.0 ** (pts_mel / 2595.0) - 1.0)
    centre = pts[1:-1]
    half_base = (pts[2:] - pts[:-2]) / 2.0
    width = np.sqrt((half_base / 2.0) ** 2 + 40.0**2)
    sigma = np.sqrt((half_base / math.sqrt(6.0)) ** 2 + 25.0**2)
    jitter = np.clip(0.8 / np.sqrt(half_base / 60.0), 0.2, 0.8)
    return _Geometry(
        centre=centre.astype(np.float32),
        width=width.astype(np.float32),
        sigma=sigma.astype(np.float32),
        octave=np.log2(centre / 100.0).astype(np.float32),
        jitter=jitter.astype(np.float32),
    )


@dataclass(frozen=True)
class _Voice:
    """One speaker: per-phone resonance tables (already warped) and source/prosody habits."""

    freq: F32  # (phones, 5) resonance centres, Hz
    band: F32  # (phones, 5) bandwidths, Hz
    amp: F32  # (phones, 5) linear peak amplitudes
    vowel_p: npt.NDArray[np.float64]
    consonant_p: npt.NDArray[np.float64]
    f0: float  # median pitch, Hz
    f0_range: float  # std of log pitch over an utterance
    tilt: float  # source slope, nats per octave
    breath: float  # aspiration noise relative to voicing
    harmonic_depth: float
    rate: float  # duration multiplier (1 = average)
    pause_rate: float
    timbre: F32  # (n_mels,) static log-spectral colouring


@dataclass(frozen=True)
class _Session:
    """One recording session: channel, noise and the speaker's state that day."""

    gain: F32  # (n_mels,) linear channel gain (colouring, band limits, speaker timbre folded in)
    noise: F32  # (n_mels,) log background-noise shape
    snr_db: float
    reverb: float
    gated: bool  # pauses are digital silence
    dither: float  # electrical noise floor relative to the peak
    f0_shift: float
    tilt_shift: float


def _smooth_curve(rng: np.random.Generator, n: int, std: float, terms: int = 5) -> F32:
    """A random smooth curve over ``n`` bins: a few cosines with decaying amplitudes, overall ``std``."""
    x = np.linspace(0.0, math.pi, n)
    k = np.arange(1, terms + 1)
    coef = rng.normal(0.0, 1.0, terms) / k
    curve = np.cos(np.outer(x, k) + rng.uniform(0, 2 * math.pi, terms)) @ coef
    curve -= curve.mean()
    scale = float(np.sqrt(np.sum((coef**2) / 2.0)))
    return (curve * (std / max(scale, 1e-6))).astype(np.float32)


def _make_voice(rng: np.random.Generator, n_mels: int) -> _Voice:
    female = rng.random() < 0.5
    warp = rng.normal(1.15 if female else 1.0, 0.055)
    n_ph = len(_PHONES)
    accent = rng.normal(0.0, [0.05, 0.045, 0.035, 0.03], size=(n_ph, 4))
    shape = rng.normal(0.0, [0.03, 0.03, 0.025, 0.02])
    freq = np.empty((n_ph, _N_RES))
    freq[:, :4] = _FORMANTS * warp * (1.0 + shape) * (1.0 + accent)
    freq[:, 4] = _SLOT5[:, 0] * warp * (1.0 + rng.normal(0.0, 0.04, n_ph))
    band = np.empty((n_ph, _N_RES))
    band[:, :4] = _BANDWIDTHS * math.exp(rng.normal(0.0, 0.2)) * np.exp(rng.normal(0.0, 0.1, (n_ph, 4)))
    band[:, 4] = _SLOT5[:, 1] * math.exp(rng.normal(0.0, 0.15))
    amp_db = np.empty((n_ph, _N_RES))
    amp_db[:, :4] = _FORMANT_DB + rng.normal(0.0, 2.0, 4) + rng.normal(0.0, 1.0, (n_ph, 4))
    nasality = rng.uniform(0.0, 12.0)
    amp_db[:, 4] = _SLOT5[:, 2] + np.where(_CLASS == "v", nasality, 0.0) + rng.normal(0.0, 1.5, n_ph)
    f0 = math.exp(rng.normal(math.log(210.0 if female else 120.0), 0.16))
    return _Voice(
        freq=freq.astype(np.float32),
        band=band.astype(np.float32),
        amp=(10.0 ** (amp_db / 10.0)).astype(np.float32),
        vowel_p=rng.dirichlet(np.full(len(_VOWELS), 20.0)),
        consonant_p=rng.dirichlet(np.full(len(_CONSONANTS), 20.0)),
        f0=f0,
        f0_range=rng.uniform(0.04, 0.16),
        tilt=rng.normal(-1.2, 0.3),
        breath=math.exp(rng.normal(math.log(0.05), 0.7)),
        harmonic_depth=rng.uniform(0.5, 0.9),
        rate=math.exp(rng.normal(0.0, 0.12)),
        pause_rate=rng.uniform(0.02, 0.1),
        timbre=_smooth_curve(rng, n_mels, 0.35),
    )


def _make_session(rng: np.random.Generator, voice: _Voice, geo: _Geometry) -> _Session:
    n = len(geo.centre)
    log_gain = voice.timbre + _smooth_curve(rng, n, rng.uniform(0.05, 0.15))
    u = rng.random()
    if u < 0.02:  # narrow-band / telephone-like
        cutoff = rng.uniform(3400.0, 4200.0)
    elif u < 0.08:  # lossy codec
        cutoff = rng.uniform(5000.0, 7600.0)
    else:
        cutoff = 0.0
    if cutoff:
        log_gain = log_gain - 30.0 * np.clip((geo.centre - cutoff) / (0.12 * cutoff), 0.0, 1.0)
    return _Session(
        gain=np.exp(log_gain).astype(np.float32),
        noise=(_smooth_curve(rng, n, 0.4) + rng.normal(-0.8, 0.3) * geo.octave).astype(np.float32),
        snr_db=rng.uniform(10.0, 40.0),
        reverb=rng.uniform(0.0, 0.6) if rng.random() < 0.6 else 0.0,
        gated=bool(rng.random() < 0.05),
        dither=10.0 ** rng.uniform(-9.5, -6.5) if rng.random() < 0.5 else 0.0,
        f0_shift=rng.normal(0.0, 0.03),
        tilt_shift=rng.normal(0.0, 0.06),
    )


def _knots(rng: np.random.Generator, n: int, spacing: int) -> npt.NDArray[np.float64]:
    """Slow random wiggle of unit std over ``n`` frames, one random value per ``spacing`` frames."""
    m = n // spacing + 3
    return np.interp(np.arange(n), np.arange(m) * spacing - rng.uniform(0, spacing), rng.normal(0.0, 1.0, m))


def _smooth_rows(x: F32, width: int) -> F32:
    """Centred moving average over time (axis 0) with an odd window, edges held."""
    if width <= 1 or len(x) < 2:
        return x
    pad = width // 2
    xp = np.concatenate([np.repeat(x[:1], pad, 0), x, np.repeat(x[-1:], pad, 0)])
    cs = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(xp, axis=0, dtype=np.float64)])
    return ((cs[width:] - cs[:-width]) / width).astype(np.float32)


def _phone_track(rng: np.random.Generator, voice: _Voice, n: int, rate: float) -> tuple[I64, F32]:
    """Per-frame phone index and per-frame level jitter (dB) for ``n`` frames of syllables."""
    frames: list[I64] = []
    jitters: list[F32] = []
    total = 0
    offset = int(rng.integers(0, 12))
    while total < n + offset:
        n_syl = (n + offset - total) // 10 + 8
        onset = np.where(rng.random(n_syl) < 0.8, rng.choice(_CONSONANTS, n_syl, p=voice.consonant_p), -1)
        coda = np.where(rng.random(n_syl) < 0.35, rng.choice(_CONSONANTS, n_syl, p=voice.consonant_p), -1)
        pause = np.where(rng.random(n_syl) < voice.pause_rate, _PAUSE, -1)
        vowel = rng.choice(_VOWELS, n_syl, p=voice.vowel_p)
        grid = np.stack([onset, vowel, coda, pause], axis=1).ravel()
        seq = grid[grid >= 0]
        stop = _IS_STOP[seq]
        counts = 1 + stop.astype(np.int64)
        phones = np.repeat(seq, counts)
        first = np.cumsum(counts)[stop] - 2
        phones[first] = np.where(_VOICING[seq[stop]] > 0, _VOICED_CLOSURE, _CLOSURE)
        mean = _DURATION[phones] * rate
        dur = np.maximum(1, np.rint(rng.gamma(4.0, mean / 4.0))).astype(np.int64)
        frames.append(np.repeat(phones, dur))
        jitters.append(np.repeat(rng.normal(0.0, 2.5, len(phones)).astype(np.float32), dur))
        total += int(dur.sum())
    track = np.concatenate(frames)[offset : offset + n]
    jitter = np.concatenate(jitters)[offset : offset + n]
    return track.astype(np.int64), jitter


def _render(rng: np.random.Generator, voice: _Voice, session: _Session, geo: _Geometry, n: int) -> F32:
    """One utterance: ``(n, n_mels)`` float32 log-mel features."""
    fc = geo.centre[None, :]
    rate = voice.rate * math.exp(rng.normal(0.0, 0.08))
    track, level_jitter = _phone_track(rng, voice, n, rate)

    # Per-frame resonances, coarticulated: tracks glide between phone targets.
    warp = float(math.exp(rng.normal(0.0, 0.01)))
    cols = np.concatenate(
        [
            voice.freq[track] * warp,
            voice.amp[track],
            _VOICING[track, None],
            (_LEVEL_DB[track] + level_jitter)[:, None],
        ],
        axis=1,
    )
    cols = _smooth_rows(cols, 5)
    freq, amp = cols[:, :_N_RES], cols[:, _N_RES : 2 * _N_RES]
    voicing = np.clip(cols[:, 2 * _N_RES], 0.0, 1.0)
    level_db = cols[:, 2 * _N_RES + 1]
    band = voice.band[track]

    env = np.zeros((n, len(geo.centre)), dtype=np.float32)
    for k in range(_N_RES):
        s = band[:, k : k + 1] + geo.width[None, :]
        x = (fc - freq[:, k : k + 1]) / s
        x *= x
        x += 1.0
        x *= s
        env += (amp[:, k : k + 1] * band[:, k : k + 1]) / x

    # Source: harmonic comb (pitch) with tilt where voiced, flatter noise where not, plus breath.
    f0 = voice.f0 * math.exp(session.f0_shift + rng.normal(0.0, 0.04))
    log_f0 = voice.f0_range * _knots(rng, n, 25) - 0.08 * np.linspace(0.0, 1.0, n)
    f0_track = np.clip(f0 * np.exp(log_f0), 60.0, 450.0).astype(np.float32)[:, None]
    tilt = voice.tilt + session.tilt_shift + rng.normal(0.0, 0.06)
    voiced_src = np.exp(tilt * geo.octave)
    noise_src = np.exp(0.3 * tilt * geo.octave)
    h = _HARMONIC_BINS
    depth = np.exp(-0.5 * (2.0 * math.pi * geo.sigma[None, :h] / f0_track) ** 2) * voice.harmonic_depth
    comb = 1.0 + np.minimum(depth, 0.9) * np.cos((2.0 * math.pi) * (fc[:, :h] / f0_track))
    src = voicing[:, None] * voiced_src[None, :]
    src[:, :h] *= comb
    src += (1.0 - voicing + voice.breath * voicing)[:, None] * noise_src[None, :]

    # Loudness: phone levels, a slow drift, the phrase; then background noise at the session's SNR.
    level = np.exp((0.23026 * level_db + 0.35 * _knots(rng, n, 60)).astype(np.float32))
    power = env * src
    power *= level[:, None]
    snr = session.snr_db + rng.normal(0.0, 4.0)
    noise_level = float(power.mean()) * 10.0 ** (-snr / 10.0)
    noise_shape = np.exp(session.noise + _smooth_curve(rng, len(geo.centre), 0.4))
    noise_shape *= noise_level / noise_shape.mean()
    noise_track = np.exp(0.3 * _knots(rng, n, 40)).astype(np.float32)
    power += noise_track[:, None] * noise_shape[None, :]

    # Periodogram-like fluctuation per bin (wider filters average more FFT bins: less spread).
    wobble = rng.standard_normal(power.shape, dtype=np.float32)
    wobble *= geo.jitter[None, :]
    np.exp(wobble, out=wobble)
    power *= wobble

    reverb = min(0.7, session.reverb * rng.uniform(0.5, 1.3))
    if reverb > 0.0:
        tail = power.copy()
        for k in range(1, 5):
            tail[k:] += (reverb**k) * power[:-k]
        power = tail
    if session.gated:
        power[_QUIET[track]] = 0.0
    # Channel: the session's colouring and band limit, this take's microphone colouring and high-pass.
    log_gain = _smooth_curve(rng, len(geo.centre), rng.uniform(0.1, 0.35))
    if rng.random() < 0.3:
        corner = rng.uniform(80.0, 250.0)
        log_gain -= 3.0 * np.clip(np.log2(corner / geo.centre), 0.0, None)
    power *= session.gain[None, :] * np.exp(log_gain)[None, :]
    peak = float(power.max()) or 1.0  # all-silent is impossible for real lengths; stay finite anyway
    power += peak * session.dither
    power *= math.exp(rng.uniform(5.8, 7.3)) / (peak * (1.0 + session.dither))
    power += LOG_OFFSET
    return np.log(power).astype(np.float32, copy=False)


def utterance_lengths(spec: SynthSpec, rng: np.random.Generator, count: int) -> I64:
    """``count`` utterance lengths (frames) with the HW4 quantile shape described by ``spec``."""
    z = rng.standard_normal(count)
    log_len = math.log(spec.median_len) + spec.length_spread * np.interp(z, _LEN_Z, _LEN_LOG)
    return np.clip(np.rint(np.exp(log_len)), spec.min_len, spec.max_len).astype(np.int64)


# ---------------------------------------------------------------------------------------------------
# The plan: who says what, in which session, how long, in which file. Small; made before any file.


@dataclass(frozen=True)
class _Plan:
    names: list[str]  # speaker names in metadata / mapping-id order
    speaker: I64  # per utterance (labelled first, then test in testdata order)
    session: I64
    length: I64
    files: list[str]
    sessions: list[int]  # sessions per speaker (train + held-out)
    labelled: int


def _plan(spec: SynthSpec, seed: int) -> _Plan:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    s, u, t = spec.speakers, spec.utterances, spec.test
    pool = min(100000, max(10000, 10 * s))
    numbers = rng.choice(pool, size=s, replace=False)
    if s > 1 and bool(np.all(np.diff(numbers) > 0)):
        numbers[[0, 1]] = numbers[[1, 0]]
    names = [f"id{k:05d}" for k in numbers]

    weight = np.exp(rng.normal(0.0, 0.35, s))
    counts = 3 + rng.multinomial(u - 3 * s, weight / weight.sum())
    test_weight = weight * np.exp(rng.normal(0.0, 0.3, s))
    test_counts = rng.multinomial(t, test_weight / test_weight.sum()) if t else np.zeros(s, np.int64)

    speaker_l, session_l, sessions = [], [], []
    test_speaker, test_session = [], []
    for i in range(s):
        n_train = int(np.clip(np.rint(counts[i] / 8.0 * math.exp(rng.normal(0.0, 0.3))), 1, counts[i]))
        sess = rng.permutation(
            np.concatenate([np.arange(n_train), rng.integers(0, n_train, counts[i] - n_train)])
        )
        speaker_l.append(np.full(counts[i], i))
        session_l.append(sess)
        n_held = 0
        if test_counts[i]:
            n_held = 1 + int(test_counts[i] > 6)
            test_speaker.append(np.full(test_counts[i], i))
            test_session.append(n_train + rng.integers(0, n_held, test_counts[i]))
        sessions.append(n_train + n_held)
    order = rng.permutation(t)
    speaker = np.concatenate(
        [*speaker_l, np.concatenate(test_speaker)[order] if t else np.zeros(0, np.int64)]
    )
    session = np.concatenate(
        [*session_l, np.concatenate(test_session)[order] if t else np.zeros(0, np.int64)]
    )
    length = utterance_lengths(spec, rng, u + t)
    files: list[str] = []
    seen: set[str] = set()
    while len(files) < u + t:
        name = f"uttr-{rng.bytes(16).hex()}.pt"
        if name not in seen:
            seen.add(name)
            files.append(name)
    return _Plan(
        names=names,
        speaker=speaker.astype(np.int64),
        session=session.astype(np.int64),
        length=length,
        files=files,
        sessions=sessions,
        labelled=u,
    )


# ---------------------------------------------------------------------------------------------------
# Public entry point.


def resolve_spec(
    preset: str = "tiny", speakers: int | None = None, utterances: int | None = None, test: int | None = None
) -> SynthSpec:
    """The preset's spec with any of its counts replaced, validated (UserError when impossible)."""
    if preset not in PRESETS:
        raise UserError(f"unknown synth preset '{preset}' (choose one of: {', '.join(PRESETS)})")
    spec = PRESETS[preset]
    for key, value in (("speakers", speakers), ("utterances", utterances), ("test", test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise UserError(f"synth: {key} must be an integer, got {shown(value)}")
    if speakers is not None and utterances is None:
        per = spec.utterances / spec.speakers
        spec = replace(spec, speakers=speakers, utterances=max(3 * speakers, round(per * speakers)))
    elif speakers is not None:
        spec = replace(spec, speakers=speakers)
    if utterances is not None:
        spec = replace(spec, utterances=utterances)
    if test is not None:
        spec = replace(spec, test=test)
    if not 2 <= spec.speakers <= 100000:  # one speaker: every utterance is "identified", trivially
        raise UserError(f"synth: --speakers must be between 2 and 100000, got {spec.speakers}")
    if spec.utterances < 3 * spec.speakers:
        raise UserError(
            f"synth: --utterances {spec.utterances} is too few: the labelled utterances in all need 3 per "
            f"speaker, {3 * spec.speakers} for {spec.speakers} speakers"
        )
    if spec.test < 0:
        raise UserError(f"synth: --test must be 0 or more, got {spec.test}")
    return spec


def _is_own(path: Path) -> bool:
    """Whether every entry of directory ``path`` is a file this module writes."""
    return all(
        p.is_file() and (p.name in _OWN_NAMES or (p.name.startswith("uttr-") and p.suffix == ".pt"))
        for p in path.iterdir()
    )


def _is_synth_output(path: Path) -> bool:
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("generator") == GENERATOR and _is_own(path)


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f)


def generate(
    out: Path,
    preset: str = "tiny",
    speakers: int | None = None,
    utterances: int | None = None,
    test: int | None = None,
    seed: int = 0,
    progress: bool = True,
    workers: int | None = None,
    force: bool = False,
) -> Path:
    """Write a synthetic HW4-layout data set into directory ``out`` and return ``out``.

    ``preset`` picks a :data:`PRESETS` entry; ``speakers``, ``utterances`` (labelled, total) and
    ``test`` replace its counts (giving only ``speakers`` keeps the preset's utterances per speaker).
    ``out`` must be missing, empty, or (only with ``force``) an earlier synth output, which is replaced
    once the new set is complete: studies and caches key on the set's fingerprint, so silently replacing
    it would orphan them. The same arguments and ``seed`` give byte-identical files whatever ``workers``
    is: ``None`` uses one process for small sets and up to 8 for large ones, an integer forces that many.
    """
    out = Path(out)
    spec = resolve_spec(preset, speakers, utterances, test)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"synth: seed must be a non-negative integer, got {shown(seed)}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise UserError(f"synth: workers must be a positive integer, got {shown(workers)}")
    check_can_create(out)
    with generating(out, wait=False):
        return _generate(out, spec, preset, seed, progress, workers, force)


@contextlib.contextmanager
def generating(out: Path, wait: bool) -> Iterator[None]:
    """Hold the lock on generating ``out`` (a hidden file beside it while held): one generator at a time.

    Why: two commands that needed the default set at once wrote the same partial folder; one removed
    the other's as a leftover (a traceback), or installed it half-written, and every later command used
    that. ``wait``: wait for the other (and say so) rather than refuse.
    """
    whole = Path(os.path.realpath(out))  # one lock for a folder, whatever links name it
    whole.parent.mkdir(parents=True, exist_ok=True)

    def say_waiting() -> None:
        from search.progress import note

        note(f"waiting for another command that is generating {out}")

    with contextlib.ExitStack() as held:
        try:
            held.enter_context(
                one_at_a_time(whole.parent / f".{whole.name}.synth-lock", say_waiting if wait else None)
            )
        except BlockingIOError:
            raise UserError(
                f"synth: another command is generating {out}; wait for it, or choose another --out"
            ) from None
        yield


def _generate(
    out: Path, spec: SynthSpec, preset: str, seed: int, progress: bool, workers: int | None, force: bool
) -> Path:
    """:func:`generate`'s work, with its arguments checked and its lock held."""
    if out.exists() and not out.is_dir():
        raise UserError(f"synth: {out} exists and is not a directory; choose a new or empty directory")
    replacing = out.is_dir() and any(out.iterdir())
    if replacing and not _is_synth_output(out):
        raise UserError(
            f"synth: {out} is not empty and is not an earlier synth output; "
            "choose a new or empty directory (nothing was written)"
        )
    if replacing and not force:
        raise UserError(
            f"synth: {out} already holds a generated set (studies trained on it would no longer match); "
            "pass --force to replace it or choose a new or empty --out (nothing was written)"
        )
    whole = Path(os.path.abspath(out))  # "." has no name to put the partial folder beside
    partial = whole.parent / f".{whole.name}.synth-partial"
    if partial.exists():
        if not partial.is_dir() or not _is_own(partial):
            raise UserError(f"synth: {partial} is in the way and is not a synth leftover; remove it")
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    plan = _plan(spec, seed)
    geo = _geometry(spec.n_mels)
    voices = [
        _make_voice(np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, i))), spec.n_mels)
        for i in range(spec.speakers)
    ]
    sessions = {
        (i, j): _make_session(
            np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, i, j))), voices[i], geo
        )
        for i in range(spec.speakers)
        for j in range(plan.sessions[i])
    }
    world = _World(partial, plan, voices, sessions, geo, seed)
    if workers is None:
        workers = 1 if len(plan.files) < 4000 else max(1, min(8, os.cpu_count() or 1))
    try:
        _write_features(world, workers, progress)
        _write_index(partial, plan, spec, preset, seed)
        install_folder(partial, out)
    except BaseException:  # Ctrl-C or a full disk: leave no hidden half-written set beside out
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _write_index(folder: Path, plan: _Plan, spec: SynthSpec, preset: str, seed: int) -> None:
    """The JSON files, answers and the marker: written after every feature file exists."""
    u = plan.labelled
    test_rows = [(plan.files[k], plan.names[plan.speaker[k]]) for k in range(u, len(plan.files))]
    with open(folder / "answers.csv", "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["Id", "Category"])
        writer.writerows(test_rows)
    n_mels = spec.n_mels
    _write_json(
        folder / "testdata.json",
        {
            "n_mels": n_mels,
            "utterances": [
                {"feature_path": plan.files[k], "mel_len": int(plan.length[k])}
                for k in range(u, len(plan.files))
            ],
        },
    )
    per_speaker: list[list[dict[str, Any]]] = [[] for _ in plan.names]
    for k in range(u):
        per_speaker[plan.speaker[k]].append({"feature_path": plan.files[k], "mel_len": int(plan.length[k])})
    _write_json(
        folder / "metadata.json",
        {"n_mels": n_mels, "speakers": {name: per_speaker[i] for i, name in enumerate(plan.names)}},
    )
    _write_json(
        folder / "mapping.json",
        {
            "speaker2id": {name: i for i, name in enumerate(plan.names)},
            "id2speaker": {str(i): name for i, name in enumerate(plan.names)},
        },
    )
    _write_json(
        folder / MARKER,
        {
            "generator": GENERATOR,
            "preset": preset,
            "seed": seed,
            "spec": asdict(spec),
            "frames": int(plan.length.sum()),
        },
    )


@dataclass(frozen=True)
class _World:
    """Everything a (worker) process needs to render and save any utterance of the plan."""

    folder: Path
    plan: _Plan
    voices: list[_Voice]
    sessions: dict[tuple[int, int], _Session]
    geo: _Geometry
    seed: int


_WORKER_WORLD: _World | None = None


def _init_worker(world: _World) -> None:
    global _WORKER_WORLD
    _WORKER_WORLD = world


def _write_range(world: _World, start: int, stop: int) -> int:
    """Render and save utterances ``start..stop-1`` of the plan; each has its own seed, so any order works."""
    plan = world.plan
    for k in range(start, stop):
        i, j = int(plan.speaker[k]), int(plan.session[k])
        rng = np.random.default_rng(np.random.SeedSequence(world.seed, spawn_key=(3, k)))
        feats = _render(rng, world.voices[i], world.sessions[(i, j)], world.geo, int(plan.length[k]))
        torch.save(torch.from_numpy(feats), world.folder / plan.files[k])
    return stop - start


def _worker_range(bounds: tuple[int, int]) -> int:
    assert _WORKER_WORLD is not None
    return _write_range(_WORKER_WORLD, *bounds)


def _write_features(world: _World, workers: int, progress: bool) -> None:
    from search.progress import progress_bar

    total = len(world.plan.files)
    if workers <= 1:
        with progress_bar("synth utterances", total, enabled=progress) as advance:
            for k in range(total):
                advance(_write_range(world, k, k + 1))
        return
    import multiprocessing

    # fork where there is one: no re-import of the caller's __main__, nothing to pickle. The pool is made
    # before the progress bar starts its refresh thread; workers only use numpy and torch.save.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    chunk = 200
    bounds = [(a, min(a + chunk, total)) for a in range(0, total, chunk)]
    with warnings.catch_warnings():  # Python 3.12+ warns about fork in threaded processes; see above
        warnings.filterwarnings("ignore", message=".*fork", category=DeprecationWarning)
        pool = multiprocessing.get_context(method).Pool(workers, _init_worker, (world,))
    with pool, progress_bar("synth utterances", total, enabled=progress) as advance:
        for done in pool.imap_unordered(_worker_range, bounds):
            advance(done)


def default_synth_preset() -> str:
    """The generated set used when no --data is given (``$SPKID_SEARCH_SYNTH_PRESET``, default small)."""
    preset = os.environ.get("SPKID_SEARCH_SYNTH_PRESET", "small")
    if preset not in PRESETS:  # said before "generating the synthetic 'huge' set", naming the variable
        raise UserError(
            f"SPKID_SEARCH_SYNTH_PRESET={preset}: unknown synth preset (choose one of: "
            f"{', '.join(PRESETS)}), or unset it for 'small'"
        )
    return preset


def default_data_dir() -> Path:
    data = os.environ.get("SPKID_SEARCH_DATA")
    return (Path(data) if data else studies_root() / "data") / f"synth-{default_synth_preset()}"


def default_set(progress: bool = True) -> Path:
    """The data set a command uses when given no --data: the default synthetic set, generated once.

    Why here and not in ``data.open_data``: generating a set is the commands' policy for a missing
    --data (they say so), not something opening a data set should do.
    """
    from search.progress import note

    preset = default_synth_preset()
    root = default_data_dir()
    using = f"No --data given: using the synthetic '{preset}' set in {root}"
    if (root / "testdata.json").exists():  # written last, and the set installed whole after it
        note(using)
        return root
    check_can_create(root)
    with generating(root, wait=True):  # another command generating it: wait, then use its set
        if (root / "testdata.json").exists():
            note(using)
        else:
            note(f"No --data given: generating the synthetic '{preset}' set in {root}")
            _generate(root, resolve_spec(preset, None, None, None), preset, 0, progress, None, False)
    return root
