"""Whole-utterance inference, shared by the trainer's validation, export and vote.

Batched by length under a frame budget; :func:`checkpoint_logits` scores a checkpoint (see
:mod:`search.checkpoint`) after checking that its speakers and features are the data set's.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search.checkpoint import model_from_checkpoint
from search.data import FeatureStore, PackedData, eval_batches
from search.errors import UserError
from search.model import SpeakerNet

# On CPU a batch amortises nothing (the per-frame compute dominates, not per-call overhead) and large
# batches push activations and (batch x T x T) attention maps out of cache: bench/infer_bench.py measured
# a 224-wide conformer at 0.4x the batch-1 speed with 65,536 frames per batch and 0.9x with 2,048.
CPU_FRAME_BUDGET = 2048


def frame_budget(configured: int, device: torch.device) -> int:
    """Frames per inference batch: the config's on a GPU, at most :data:`CPU_FRAME_BUDGET` on CPU."""
    return configured if device.type == "cuda" else min(configured, CPU_FRAME_BUDGET)


@torch.no_grad()
def predict_logits(
    model: SpeakerNet, store: FeatureStore, indices: np.ndarray, budget: int = 65536
) -> np.ndarray:
    """Whole-utterance logits (float32, rows in the order of ``indices``), batched by length.

    ``budget`` caps batch size x longest utterance (frames); on CPU it is capped further (see above).
    """
    was_training = model.training
    model.eval()
    out = np.zeros((len(indices), 0), dtype=np.float32)
    position = {int(i): k for k, i in enumerate(indices)}
    use_bf16 = store.device.type == "cuda"
    for batch, x, lengths in eval_batches(store, indices, frame_budget(budget, store.device)):
        with torch.autocast(store.device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x, lengths)
        logits_np = logits.float().cpu().numpy()
        if out.shape[1] == 0:
            out = np.zeros((len(indices), logits_np.shape[1]), dtype=np.float32)
        out[[position[int(i)] for i in batch]] = logits_np
    model.train(was_training)
    return out


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy; 0.0 for an empty set rather than NaN."""
    if len(labels) == 0:
        return 0.0
    return float((logits.argmax(axis=1) == labels).mean())


# --------------------------------------------------------------------------------------------------
# Scoring a checkpoint on a data set (export and vote)
# --------------------------------------------------------------------------------------------------


def check_compatible(ckpt: dict[str, Any], path: Path, data: PackedData) -> None:
    """Refuse a checkpoint whose class ids would mean other speakers on ``data``, or that expects other
    features. Another data set of the same speakers (new recordings of them) is fine: see
    :func:`unseen_split`."""
    if int(ckpt["n_mels"]) != data.n_mels:
        raise UserError(f"{path}: expects {ckpt['n_mels']} mel bins, --data {data.root} has {data.n_mels}")
    if list(ckpt["speakers"]) != list(data.speakers):
        fp = ckpt.get("fingerprint")
        other = f"trained on data set {fp}, " if fp not in (None, data.fingerprint) else ""
        raise UserError(
            f"{path}: {other}its speaker list differs from {data.root}/mapping.json; pass the data folder "
            "the model was trained on, or one of the same speakers"
        )


def checkpoint_logits(
    ckpt: dict[str, Any], path: Path, data: PackedData, store: FeatureStore, index_sets: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Whole-utterance logits of one checkpoint for each index set, in one batched pass."""
    check_compatible(ckpt, path, data)
    model, config = model_from_checkpoint(ckpt, path)
    model.to(store.device)
    index = np.concatenate([np.asarray(s, dtype=np.int64) for s in index_sets]) if index_sets else np.zeros(0)
    n_classes = len(ckpt["speakers"])
    logits = predict_logits(model, store, index, config.train.eval_frame_budget)
    if logits.shape[0] == 0:
        logits = np.zeros((0, n_classes), dtype=np.float32)
    out, start = [], 0
    for s in index_sets:
        out.append(logits[start : start + len(s)])
        start += len(s)
    del model
    if store.device.type == "cuda":
        torch.cuda.empty_cache()
    return out
