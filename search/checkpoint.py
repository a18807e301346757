"""Checkpoint files: written whole or not at all, read without running code, rebuilt into a model alone.

A checkpoint carries its resolved config, the speaker list and the data fingerprint, so any checkpoint
rebuilds its model by itself (:func:`load_model`) and can be checked against the data it is asked to
score (:func:`search.infer.check_compatible`). The trainer writes them; export, vote and predict read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any, cast

import torch

from search.config import Config
from search.errors import UserError
from search.files import UnloadableFile, atomic_write, load_tensors
from search.model import SpeakerNet, build_model


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
    """Load a checkpoint with :func:`~search.files.load_tensors`; a pickle payload or junk is refused."""
    path = Path(path)
    if path.is_dir():
        shown = f" (e.g. {path / 'best.pt'})" if (path / "best.pt").is_file() else ""
        raise UnreadableCheckpoint(path, "is a folder", f"pass a checkpoint file{shown}")
    try:
        ckpt = load_tensors(path)
    except FileNotFoundError:
        raise UnreadableCheckpoint(path, "checkpoint not found") from None
    except UnloadableFile as exc:
        raise UnreadableCheckpoint(
            path, f"not a loadable checkpoint: {exc}", "replace it with one you trust"
        ) from None
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
