"""Feature recipe cost: ``audio.compute_features`` per 8-s utterance with pauses, one thread.

Usage: ``python bench/prepare_bench.py [--against OLD_AUDIO.py] [--utterances N] [--rounds R]``

``--against`` loads another version of search/audio.py (e.g. ``git show REV:search/audio.py >
/tmp/old.py``; before the recipe moved out of prepare.py, ``REV:search/prepare.py``) and times both,
interleaved, so the two share the machine's state. Each utterance is speech-like tone bursts of 0.3-1.2 s
separated by near-silent pauses of 0.05-0.6 s, at 16 kHz (no resampling), so the figures are the
recipe's own: silence removal and the log-mel.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search import audio  # noqa: E402
from tests.test_prepare import voice  # noqa: E402


def load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("audio_other", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["audio_other"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def utterances(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    clips = []
    for i in range(n):
        parts: list[np.ndarray] = []
        while sum(map(len, parts)) < 8 * 16000:
            parts.append(0.5 * voice(120 + 5 * i, (600, 1700), rng.uniform(0.3, 1.2), 16000, rng))
            parts.append(rng.normal(0, 1e-4, int(rng.uniform(0.05, 0.6) * 16000)))
        clips.append(np.concatenate(parts).astype(np.float32))
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", type=Path, help="another version of search/audio.py to time too")
    parser.add_argument("--utterances", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clips = utterances(args.utterances)
    versions = [("current", audio)] + ([("against", load_module(args.against))] if args.against else [])
    for rnd in range(args.rounds):
        for name, module in versions:
            start = time.perf_counter()
            frames = sum(module.compute_features(c, 16000).shape[0] for c in clips)
            ms = (time.perf_counter() - start) / len(clips) * 1000
            print(f"round {rnd} {name}: {ms:.1f} ms per 8-s utterance, {frames / len(clips):.0f} frames kept")


if __name__ == "__main__":
    main()
