"""search.checkpoint: checkpoints written whole, read without running code, rebuilt into a model alone."""

from __future__ import annotations

import contextlib
import errno
import io
import os
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
import torch

from search.checkpoint import UnreadableCheckpoint, load_model, read_checkpoint, save_atomic
from search.config import Config
from search.errors import UserError
from search.files import disk_full
from search.model import build_model


def _checkpoint(config: Config, n_mels: int = 40, speakers: int = 3) -> dict[str, Any]:
    model = build_model(config.model, n_mels, speakers)
    return {
        "config": config.to_dict(),
        "model": model.state_dict(),
        "n_mels": n_mels,
        "speakers": [f"id{i:05d}" for i in range(speakers)],
    }


def test_a_checkpoint_rebuilds_its_model_alone(tmp_path: Path) -> None:
    """Its stored config is enough: no YAML, no study, the same outputs as the model that was saved."""
    config = Config.from_dict({"d_model": 16, "heads": 2, "ffn_dim": 32, "layers": 1})
    torch.manual_seed(0)
    saved = _checkpoint(config)
    save_atomic(saved, tmp_path / "runs" / "best.pt")  # its folder is made
    model, loaded_config, ckpt = load_model(tmp_path / "runs" / "best.pt")
    assert loaded_config == config and ckpt["speakers"] == saved["speakers"] and not model.training
    original = build_model(config.model, 40, 3)
    original.load_state_dict(saved["model"])
    original.eval()
    x = torch.randn(2, 50, 40)
    lengths = torch.tensor([50, 30])
    with torch.no_grad():
        assert np.allclose(model(x, lengths).numpy(), original(x, lengths).numpy(), atol=1e-6)


def test_what_is_not_a_checkpoint_is_refused_in_one_line(tmp_path: Path) -> None:
    config = Config.from_dict({"d_model": 16, "heads": 2, "ffn_dim": 32, "layers": 1})
    with pytest.raises(UnreadableCheckpoint, match="nosuch.pt: checkpoint not found$"):
        read_checkpoint(tmp_path / "nosuch.pt")
    run = tmp_path / "run"
    save_atomic(_checkpoint(config), run / "best.pt")
    with pytest.raises(
        UnreadableCheckpoint, match=r"run: is a folder; pass a checkpoint file \(e.g. .*best.pt\)$"
    ):
        read_checkpoint(run)
    torch.save({"model": {}}, tmp_path / "weights.pt")  # a bare state dict's file: no config
    with pytest.raises(UnreadableCheckpoint, match="not an spkid-search checkpoint"):
        read_checkpoint(tmp_path / "weights.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UnreadableCheckpoint, match="junk.pt: not a loadable checkpoint: not a PyTorch file"):
        read_checkpoint(tmp_path / "junk.pt")
    other = _checkpoint(Config.from_dict({"d_model": 32, "heads": 2, "ffn_dim": 32, "layers": 1}))
    torch.save({**_checkpoint(config), "model": other["model"]}, tmp_path / "mismatch.pt")
    with pytest.raises(UserError, match="mismatch.pt: weights do not match the stored config"):
        load_model(tmp_path / "mismatch.pt")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, a file every write to fails")
def test_a_checkpoint_on_a_full_disk_says_so_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save reported a failed write as "unexpected pos N vs M"; now its own OSError, with the file."""

    class FullDisk(io.BufferedWriter):
        """As on a real full disk, a failed write leaves nothing for close to write again."""

        def close(self) -> None:
            with contextlib.suppress(OSError):
                self.flush()
            self.raw.close()

    def full_disk(fd: int, mode: str = "r", *args: Any, **kwargs: Any) -> IO[Any]:
        os.close(fd)  # atomic_write's temp file, written instead to a disk that is always full
        return FullDisk(open("/dev/full", "wb", buffering=0))  # noqa: SIM115 - atomic_write closes it

    monkeypatch.setattr(os, "fdopen", full_disk)
    target = tmp_path / "last.pt"
    with pytest.raises(OSError) as caught:
        save_atomic({"w": torch.zeros(100_000)}, target)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert disk_full(caught.value)
