"""Checkpoints and whole-utterance inference, shared by the trainer's validation, export and vote.

A checkpoint carries its resolved config, the speaker list and the data fingerprint, so any
checkpoint rebuilds its model alone and can be checked against the data it is asked to score.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch

from search.config import Config
from search.data import FeatureStore, PackedData, Split, eval_batches, make_split
from search.errors import UserError, load_failure
from search.files import atomic_write
from search.model import SpeakerNet, build_model

# On CPU a batch amortises nothing (the per-frame compute dominates, not per-call overhead) and large
# batches push activations and (batch x T x T) attention maps out of cache: bench/infer_bench.py measured
# a 224-wide conformer at 0.4x the batch-1 speed with 65,536 frames per batch and 0.9x with 2,048.
CPU_FRAME_BUDGET = 2048


def frame_budget(configured: int, device: torch.device) -> int:
    """Frames per inference batch: the config's on a GPU, at most :data:`CPU_FRAME_BUDGET` on CPU."""
    return configured if device.type == "cuda" else min(configured, CPU_FRAME_BUDGET)


class _KeepsWriteError:
    """A file whose ``write`` remembers the OSError it raised.

    torch.save reports a failed write only as "[enforce fail at inline_container.cc] unexpected pos N
    vs M": a full disk read like a bug in the checkpoint writer (an audit found 39 such fail reasons).
    """

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return int(self.fh.write(data))
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save through :func:`~search.files.atomic_write`: a crash never leaves half a checkpoint, and
    a failed write (a full disk) raises its own OSError, which atomic_write makes name ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as fh:
        out = _KeepsWriteError(fh)
        try:
            torch.save(obj, cast(IO[bytes], out))  # it only writes and flushes
        except RuntimeError:
            if out.error is None:
                raise
            raise out.error from None  # atomic_write names the file


class UnreadableCheckpoint(UserError):
    """A checkpoint that cannot be used: ``what`` is why, ``advice`` what to do about it.

    Apart so that a caller can give other advice: ``train``'s own interrupted run, whose last.pt was
    cut short, starts over with --force rather than being replaced "with one you trust".
    """

    def __init__(self, path: Path, what: str, advice: str = "") -> None:
        super().__init__(f"{path}: {what}{f'; {advice}' if advice else ''}")
        self.what = what


def read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; anything else (a pickle payload, junk) is refused."""
    path = Path(path)
    if path.is_dir():
        shown = f" (e.g. {path / 'best.pt'})" if (path / "best.pt").is_file() else ""
        raise UnreadableCheckpoint(path, "is a folder", f"pass a checkpoint file{shown}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a refused legacy pickle is reported below in one line
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UnreadableCheckpoint(path, "checkpoint not found") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        what = f"not a loadable checkpoint: {load_failure(exc, path)}"
        raise UnreadableCheckpoint(path, what, "replace it with one you trust") from None
    if not isinstance(ckpt, dict) or not {"config", "model", "n_mels", "speakers"} <= set(ckpt):
        raise UnreadableCheckpoint(
            path, "not an spkid-search checkpoint (needs config, model, n_mels, speakers)"
        )
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: Path | str = "checkpoint") -> tuple[SpeakerNet, Config]:
    """Rebuild the model a checkpoint describes and load its weights (eval mode)."""
    config = Config.from_dict(dict(ckpt["config"]), source=f"{path} (config)", stored=True)
    model = build_model(config.model, int(ckpt["n_mels"]), len(ckpt["speakers"]))
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as exc:
        raise UserError(
            f"{path}: weights do not match the stored config ({str(exc).splitlines()[0][:160]})"
        ) from None
    model.eval()
    return model, config


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[SpeakerNet, Config, dict[str, Any]]:
    """Read a checkpoint file and return (model on device, config, checkpoint dict)."""
    ckpt = read_checkpoint(path)
    model, config = model_from_checkpoint(ckpt, path)
    return model.to(device), config, ckpt


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


UNSEEN_VALID = 5000  # labelled utterances of another set of the same speakers that validate (at most)


def unseen_split(data: PackedData, seen: Collection[str] = ()) -> Split:
    """The validation split on another data set of the models' speakers: its labelled utterances (up to
    ``UNSEEN_VALID``, a seeded sample) but those named in ``seen`` (the training set's, where it can be
    read: a set prepared again from the same audio keeps its files' names), so they measure and
    calibrate as a study's own validation split does."""
    labelled = data.labelled
    if seen:
        labelled = np.array([i for i in labelled if data.ids[int(i)] not in seen], dtype=np.int64)
    if len(labelled) > UNSEEN_VALID:
        labelled = np.sort(np.random.default_rng(0).choice(labelled, UNSEEN_VALID, replace=False))
    return Split(
        train=np.zeros(0, dtype=np.int64),
        valid=labelled,
        ratio=1.0,
        seed=0,
        split_id=f"unseen-{data.fingerprint}",
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


def rebuild_split(data: PackedData, ratio: float, seed: int, split_id: str, source: str) -> Split:
    """The validation split a study used, refused if it no longer reproduces (other data or code)."""
    split = make_split(data, ratio, seed)
    if split.split_id != split_id:
        raise UserError(
            f"{source}: validation split {split_id} (ratio {ratio}, seed {seed}) does not reproduce on "
            f"{data.root} (got {split.split_id}); pass the data folder the study was trained on"
        )
    return split
