"""Safe file writing and reading, and checksums, shared by the trainer, the artifact store, export and vote.

The files a later step trusts whole (checkpoints, artifacts, cached logits, the study folder's mark, the
submission CSV) go through :func:`atomic_write`, so a crash, a full disk or Ctrl-C never leaves half a
file where a complete one is expected. A few writers rename a temp file into place themselves, for a
reason given there: workers' status files (rewritten every few seconds, not worth a sync), the packed
cache (a whole folder renamed), prepare's feature and index files (temp names of prepare's own).
:func:`load_tensors` is the one place a file is unpickled, always with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from search.errors import UserError, exception_chain, load_failure


def studies_root() -> Path:
    """Where the commands keep their work by default: ``studies/``, or ``$SPKID_SEARCH_STUDIES`` (study
    folders, the packed-data cache, the generated data set and train's runs, all of it)."""
    return Path(os.environ.get("SPKID_SEARCH_STUDIES", "studies"))


def require_data_dir(root: Path) -> None:
    """Refuse a ``--data`` that is not a folder, in the words of every command that reads one."""
    if not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "data directory not found"
        raise UserError(f"{root}: {what}; pass --data DIR with the HW4 layout")


def disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an error it arose from) is a full disk or a spent quota.

    Why: no trial can succeed until space is freed, so the search stops rather than failing trial after
    trial; SQLite says so only in words ("database or disk is full").
    """
    return any(
        (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT))
        or "database or disk is full" in str(e)
        for e in exception_chain(exc)
    )


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def usual_mode(path: Path | int, folder: bool = False) -> None:
    """Give a file (path or fd) made by ``tempfile`` (0600, folders 0700) the mode ``open``/``mkdir`` would.

    Without this, checkpoints and exports stay private to their owner, and a dashboard or worker that
    runs as another user (as in the Docker set-up) cannot read them.
    """
    mode = (0o777 if folder else 0o666) & ~umask()
    if isinstance(path, int):
        os.fchmod(path, mode)
    else:
        os.chmod(path, mode)


@contextlib.contextmanager
def atomic_write(path: Path, text: bool = False, overwrite: bool = True) -> Iterator[IO[Any]]:
    """Write ``path`` through a temp file beside it, synced and then renamed into place.

    With ``overwrite=False`` it raises ``FileExistsError`` instead if ``path`` appeared in the meantime:
    an existing file is never clobbered. A file replaced keeps its permissions; a new one gets the
    umask's (not mkstemp's 0600).
    On any error (or interrupt) the temp file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:  # a file replaced keeps its mode: a submission made private (0600) is not made 0644
            os.fchmod(fd, stat.S_IMODE(os.stat(path).st_mode))
        except OSError:  # none there yet (or unreadable): what a new file gets
            usual_mode(fd)
        fh: IO[Any] = os.fdopen(fd, "w", newline="", encoding="utf-8") if text else os.fdopen(fd, "wb")
        try:
            with fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            if exc.filename is None:  # a write's error names no file: say which one it was
                raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
            raise
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


# What link() answers on a file system without hard links (FAT and exFAT drives, many FUSE mounts).
NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}


def _place_new(tmp: str, path: Path) -> None:
    """Move ``tmp`` to ``path``, raising ``FileExistsError`` if ``path`` exists: a hard link where the
    file system has them; elsewhere ``path`` is claimed with an exclusive create and then replaced by
    the rename (the claim is removed again if the rename does not happen)."""
    try:
        os.link(tmp, path)
        return
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno not in NO_HARD_LINKS:
            raise
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    placed = False
    try:
        os.replace(tmp, path)
        placed = True
    finally:
        if not placed:
            with contextlib.suppress(OSError):
                os.unlink(path)


def check_can_create(path: Path, flag: str = "--out") -> None:
    """Refuse, before any long work, an output that cannot be created where it is asked for.

    Why: export, vote, predict, synth and train write their output last; a path under a file or in a
    folder that cannot be written would fail only after the work, with a traceback. The nearest
    existing folder above ``path`` must take a new file (tried with a probe file, which also catches a
    read-only mount); nothing is created.
    """
    path = Path(path)
    ancestor = path.absolute().parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{flag} {path}: cannot be created, {ancestor} is a file; choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".spkid-probe-", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"{flag} {path}: cannot be created, no file can be made in {ancestor} ({exc.strerror or exc}); "
            f"choose another {flag}"
        ) from None


def install_folder(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` in ``out``'s place; an ``out`` already there is replaced.

    The caller has checked that ``out``, if present, may be replaced (it is empty, or an earlier output
    of the same command). Renames keep the swap atomic where they can. A folder that is a mount point,
    or that holds the current directory, cannot be renamed away (EBUSY, EINVAL) or should not be (the
    user's shell would sit in a deleted folder): it stays, its entries are removed and ``tmp``'s moved
    in (copied where ``tmp`` is on another file system).
    """
    out = Path(os.path.abspath(out))
    if not out.exists():
        os.replace(tmp, out)
        return
    if os.path.ismount(out) or _holds_cwd(out):
        for entry in list(out.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        for entry in list(Path(tmp).iterdir()):
            shutil.move(entry, out / entry.name)  # a rename where it can be
        Path(tmp).rmdir()
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _holds_cwd(folder: Path) -> bool:
    """Whether the current directory is ``folder`` or inside it (False when it has been deleted)."""
    try:
        return Path.cwd().resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine: what a folder named for its process (a run's status
    folder, a packing's temp folder) is kept or cleared by."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


# File systems shared between machines, on which locks (SQLite's, flock) may not hold across them.
NETWORK_FS = {
    "nfs",
    "nfs4",
    "cifs",
    "smbfs",
    "smb3",
    "fuse.sshfs",
    "9p",
    "afs",
    "lustre",
    "glusterfs",
    "ceph",
}
# File systems of one machine's disks and memory, where a flock is seen by every process that could use
# the folder (a Docker volume is one of these on its host). Anything else may be shared (gpfs, beegfs,
# FUSE mounts of many kinds) or cannot be told (no /proc/mounts).
LOCAL_FS = {
    "ext2",
    "ext3",
    "ext4",
    "xfs",
    "btrfs",
    "zfs",
    "f2fs",
    "jfs",
    "reiserfs",
    "tmpfs",
    "overlay",
    "bcachefs",
}


def filesystem_type(path: Path) -> str | None:
    """The mount's filesystem type from /proc/mounts (Linux), longest matching mount point wins."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        inside = len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/"))
        if inside and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


class UnloadableFile(Exception):
    """A file :func:`load_tensors` refused; its text says why in a few words (see ``load_failure``)."""


def load_tensors(path: Path) -> object:
    """``torch.load(path, weights_only=True)`` onto the CPU: tensors and plain containers, never code.

    The one place this package unpickles a file (feature files, checkpoints), so none is ever read
    without ``weights_only``. Raises FileNotFoundError, or :class:`UnloadableFile` saying why.
    """
    import torch  # here: files.py is imported by commands that never read a tensor

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a refused legacy pickle is reported in one line instead
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling and zip errors come in many types
        raise UnloadableFile(load_failure(exc, path)) from None


@contextlib.contextmanager
def one_at_a_time(lock: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``lock`` (made for it, removed as it ends).

    For work that two processes must not do at once and that the second should not repeat (generating
    or packing one data set): the second waits its turn, calling ``on_wait`` first, and then finds the
    work done. Without ``on_wait`` a busy lock raises BlockingIOError at once. The holder removes the
    file before its lock goes, and a waiter that then holds a removed file's lock opens the new one.
    """
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is None:
                    raise
                on_wait()
                on_wait = _nothing  # said once
                fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(FileNotFoundError):
                if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                    break  # the file still in place: the lock is this process's
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed it as it ended: lock the new one
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # before the lock is released: no one can hold a removed file's lock then
        os.close(fd)


def _nothing() -> None:
    pass
