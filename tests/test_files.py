"""search.files: atomic writes never leave half a file or clobber one they should not."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

from search.files import atomic_write, disk_full, install_folder, sha256_file, umask


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as fh:
        fh.write(b"half of the new")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]


def test_disk_full_is_told_from_other_errors() -> None:
    assert disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = sqlite3.OperationalError("database or disk is full")
    assert disk_full(wrapped)
    assert not disk_full(OSError(errno.EROFS, "Read-only file system"))
    assert not disk_full(RuntimeError("unexpected pos 704 vs 598"))


def test_a_write_error_names_the_file(tmp_path: Path) -> None:
    """An error from writing (not opening) a file names none; atomic_write adds the one it writes."""
    target = tmp_path / "out.csv"
    with pytest.raises(OSError) as caught, atomic_write(target, text=True):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert caught.value.filename == str(target) and caught.value.errno == errno.ENOSPC


def test_a_finished_write_replaces_the_file(tmp_path: Path) -> None:
    target = tmp_path / "out.csv"
    target.write_text("old\n")
    with atomic_write(target, text=True) as fh:
        fh.write("Id,Category\n")
    assert target.read_text() == "Id,Category\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


def test_without_overwrite_an_existing_file_is_never_clobbered(tmp_path: Path) -> None:
    target = tmp_path / "submission.csv"
    with atomic_write(target, text=True, overwrite=False) as fh:
        fh.write("first\n")
    with pytest.raises(FileExistsError), atomic_write(target, text=True, overwrite=False) as fh:
        fh.write("second\n")
    assert target.read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


@pytest.mark.parametrize("errno_", [errno.EPERM, errno.EOPNOTSUPP])
def test_without_hard_links_a_new_file_is_still_placed_and_an_old_one_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int
) -> None:
    """FAT and exFAT drives and many FUSE mounts refuse link(): vote's CSV without --force ended in a
    traceback there, after all its inference."""

    def no_links(src: str, dst: str) -> None:
        raise OSError(errno_, os.strerror(errno_), src, None, dst)

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "submission.csv"
    with atomic_write(target, text=True, overwrite=False) as fh:
        fh.write("first\n")
    assert target.read_text() == "first\n"
    with pytest.raises(FileExistsError), atomic_write(target, text=True, overwrite=False) as fh:
        fh.write("second\n")
    assert target.read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.csv"]


def test_without_hard_links_a_failed_rename_leaves_no_empty_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "link", lambda src, dst: (_ for _ in ()).throw(OSError(errno.EPERM, "no links")))

    def interrupted(src: str, dst: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt), atomic_write(tmp_path / "s.csv", text=True, overwrite=False) as fh:
        fh.write("x\n")
    assert list(tmp_path.iterdir()) == []


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    blob = bytes(range(256)) * 10_000  # several read chunks
    path = tmp_path / "blob"
    path.write_bytes(blob)
    assert sha256_file(path) == hashlib.sha256(blob).hexdigest()


def test_written_files_get_the_mode_open_would_give(tmp_path: Path) -> None:
    """tempfile makes 0600 files; a checkpoint must stay readable to a dashboard run as another user."""
    import os

    previous = os.umask(0o027)
    try:
        assert umask() == 0o027
        with atomic_write(tmp_path / "best.pt") as fh:
            fh.write(b"x")
    finally:
        os.umask(previous)
    assert (tmp_path / "best.pt").stat().st_mode & 0o777 == 0o640


def test_an_output_that_cannot_be_created_is_refused_before_any_work(tmp_path: Path) -> None:
    from search.errors import UserError
    from search.files import check_can_create

    check_can_create(tmp_path / "new" / "deeper" / "submission.csv")  # folders to come: fine
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the check created nothing
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"^--out .*afile/sub/x.csv: cannot be created, .*afile is a file"):
        check_can_create(tmp_path / "afile" / "sub" / "x.csv")
    if Path("/proc/self").is_dir():  # a folder no one can create files in, even root
        with pytest.raises(
            UserError, match=r"^--data /proc/x: cannot be created, no file can be made in /proc"
        ):
            check_can_create(Path("/proc/x"), "--data")


def _folder(path: Path, files: dict[str, str]) -> Path:
    path.mkdir()
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def _contents(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def test_install_folder_swaps_a_folder_that_can_be_renamed(tmp_path: Path) -> None:
    new = {"a.pt": "new", "sub/b.json": "{}"}
    out = _folder(tmp_path / "out", {"old.pt": "old"})
    install_folder(_folder(tmp_path / ".tmp", new), out)
    assert _contents(out) == new and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    install_folder(_folder(tmp_path / ".tmp2", {"c": "c"}), tmp_path / "fresh")
    assert _contents(tmp_path / "fresh") == {"c": "c"}


def test_install_folder_fills_a_mount_point_or_the_current_folder_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither can be renamed or removed (EBUSY, EINVAL) without harm; both stay the same folder."""
    new = {"a.pt": "new", "sub/b.json": "{}"}
    out = _folder(tmp_path / "out", {"old.pt": "old", "olddir/x": "x"})
    inode = out.stat().st_ino
    real = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == out or real(p))
    install_folder(_folder(tmp_path / ".tmp", new), out)
    assert out.stat().st_ino == inode and _contents(out) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    monkeypatch.setattr(os.path, "ismount", real)
    monkeypatch.chdir(out / "sub")  # the current folder inside it: kept as well
    install_folder(_folder(tmp_path / ".tmp", {"c": "c"}), Path(".."))
    assert out.stat().st_ino == inode and _contents(out) == {"c": "c"}


def test_a_replaced_file_keeps_its_mode_and_a_new_one_gets_the_umasks(tmp_path: Path) -> None:
    """vote --force over a submission made private (0600) left it 0644: readable by every user."""
    private = tmp_path / "submission.csv"
    private.write_text("Id,Category\n")
    private.chmod(0o600)
    with atomic_write(private, text=True) as fh:
        fh.write("Id,Category\nuttr-1.pt,id00001\n")
    assert private.stat().st_mode & 0o777 == 0o600 and "uttr-1.pt" in private.read_text()
    new = tmp_path / "new.csv"
    with atomic_write(new, text=True) as fh:
        fh.write("x")
    assert new.stat().st_mode & 0o777 == 0o666 & ~umask()
