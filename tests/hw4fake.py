"""Hand-built HW4 directories for tests that need exact control over files (bad tensors, bad JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch


def make_hw4(
    root: Path,
    speakers: int = 4,
    per_speaker: int = 6,
    test: int = 5,
    n_mels: int = 40,
    seed: int = 0,
    min_len: int = 60,
    max_len: int = 300,
) -> Path:
    """Write a small HW4 layout whose features encode the speaker as a per-speaker mean offset."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    names = [f"id{10000 + 37 * i:05d}" for i in range(speakers)]
    order = rng.permutation(speakers)  # ids deliberately not in sorted-name order
    speaker2id = {names[i]: int(order[i]) for i in range(speakers)}
    centres = rng.normal(0, 2, size=(speakers, n_mels))
    counter = 0

    def write(spk: int) -> dict[str, object]:
        nonlocal counter
        counter += 1
        mel_len = int(rng.integers(min_len, max_len + 1))
        feats = (centres[spk] - 8 + rng.normal(0, 1.5, size=(mel_len, n_mels))).astype(np.float32)
        name = f"uttr-{counter:032x}.pt"
        torch.save(torch.from_numpy(feats), root / name)
        return {"feature_path": name, "mel_len": mel_len}

    meta = {
        "n_mels": n_mels,
        "speakers": {names[s]: [write(s) for _ in range(per_speaker)] for s in range(speakers)},
    }
    test_spk = rng.integers(0, speakers, size=test)
    utts = [write(int(s)) for s in test_spk]
    (root / "mapping.json").write_text(
        json.dumps({"speaker2id": speaker2id, "id2speaker": {str(v): k for k, v in speaker2id.items()}})
    )
    (root / "metadata.json").write_text(json.dumps(meta))
    (root / "testdata.json").write_text(json.dumps({"n_mels": n_mels, "utterances": utts}))
    answers = "Id,Category\n" + "".join(
        f"{u['feature_path']},{names[int(s)]}\n" for u, s in zip(utts, test_spk, strict=True)
    )
    (root / "answers.csv").write_text(answers)
    return root
