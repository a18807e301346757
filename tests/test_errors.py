"""search.errors: the few words a one-line report gives for an unreadable tensor file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search.checkpoint import read_checkpoint
from search.errors import UserError, broken_install, load_failure


def _refusal(path: Path) -> str:
    try:
        torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever torch raises is what load_failure explains
        return load_failure(exc, path)
    raise AssertionError(f"{path} loaded")


def test_an_empty_or_junk_file_is_named_for_what_it_is(tmp_path: Path) -> None:
    empty, junk = tmp_path / "empty.pt", tmp_path / "junk.pt"
    empty.write_bytes(b"")
    junk.write_bytes(bytes(range(256)) * 3)
    assert _refusal(empty) == "the file is empty or cut short"  # was torch's bare "EOFError"
    assert _refusal(junk) == "not a PyTorch file (neither a zip archive nor a pickle)"  # not "unsafe"
    with pytest.raises(
        UserError, match=r"empty\.pt: not a loadable checkpoint: the file is empty or cut short"
    ):
        read_checkpoint(empty)


def test_a_cut_short_zip_is_named_for_what_it_is(tmp_path: Path) -> None:
    """A tensor file cut short said "[Errno 22] Invalid argument" or half of miniz's paragraph."""
    whole = tmp_path / "whole.pt"
    torch.save({"x": torch.zeros(4000)}, whole)
    for size in (100, 3000, whole.stat().st_size - 10):
        cut = tmp_path / f"cut{size}.pt"
        cut.write_bytes(whole.read_bytes()[:size])
        assert _refusal(cut) == "the zip archive is cut short or corrupt", size


def test_broken_install_tells_torch_failures_from_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib
    import sys

    # A torchaudio that fails as its import runs (built for another torch), first on the path.
    fake = tmp_path / "site" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise OSError("libtorchaudio.so: undefined symbol: torch_x")\n')
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torchaudio", raising=False)
    with pytest.raises(OSError) as loaded:
        importlib.import_module("torchaudio")
    assert broken_install(loaded.value) == "libtorchaudio.so: undefined symbol: torch_x"
    monkeypatch.undo()
    assert (
        broken_install(ModuleNotFoundError("No module named 'torch'", name="torch"))
        == "no module named 'torch'"
    )
    assert broken_install(ModuleNotFoundError("No module named 'yaml'", name="yaml")) == ""
    # Not a broken install: torch.load's own OSError, or a module-level one in a folder called torch.
    with pytest.raises(OSError) as missing:
        torch.load(tmp_path / "missing.pt", weights_only=True)
    assert broken_install(missing.value) == ""
    elsewhere = tmp_path / "work" / "torch" / "proj"
    elsewhere.mkdir(parents=True)
    (elsewhere / "full.py").write_text(
        "import errno\nraise OSError(errno.ENOSPC, 'No space left on device')\n"
    )
    monkeypatch.syspath_prepend(str(elsewhere))
    with pytest.raises(OSError) as full:
        importlib.import_module("full")
    assert broken_install(full.value) == ""
    assert broken_install(ValueError("torch")) == ""


def test_a_reason_keeps_the_quotes_of_a_path_it_names(tmp_path: Path) -> None:
    """'... Is a directory: '/x/uttr.pt' lost its closing quote (both ends were stripped of quotes);
    only a reason that is all one quoted word (a KeyError's) is unquoted."""
    folder = tmp_path / "uttr-1.pt"
    folder.mkdir()
    assert _refusal(folder).endswith(f"Is a directory: '{folder}'")
    assert load_failure(KeyError("storages")) == "storages"
