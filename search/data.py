"""The HW4 data layer: pack a set (read by :mod:`search.layout`) once into a shared memmap, batch from it.

The real set is 64,666 small ``.pt`` files (6.85 GB). Reading them per item in a training loop wastes
the GPU, so the set is packed once into one contiguous float16 array plus an index (offsets, lengths,
labels), named by the set's files (names, sizes, times) and identified by its content. Every worker
process maps the same file, so N workers share one copy in the page cache, and batches are gathered
with vectorised indexing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search.errors import UserError
from search.files import (
    LOCAL_FS,
    filesystem_type,
    one_at_a_time,
    pid_alive,
    studies_root,
    usual_mode,
)
from search.layout import LISTED, HW4Layout, Utterance, load_feature, read_layout

PAD_VALUE = -20.0
CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# Packing into a shared memory-mapped cache
# --------------------------------------------------------------------------------------------------


def cache_key(layout: HW4Layout, index: Any, sizes: list[int] | None = None) -> str:
    """Name a set's packed cache by its JSON files (``index``: their :func:`_hash_of_json`, consumed)
    and each feature file's name, size and mtime.

    One ``stat`` per file, so opening an unchanged set costs milliseconds; an edited, added or rewritten
    file changes its size or mtime, and the set is re-packed. The set's identity (what studies,
    checkpoints and exports record) is its content, hashed while packing: a copy whose files got new
    times is re-packed once here and is still the same set.
    """
    h = index
    for utt in [*layout.train, *layout.test]:
        path = layout.root / utt.feature_path
        try:
            st = path.stat()
        except FileNotFoundError:
            raise UserError(f"{path}: feature file not found; {LISTED}") from None
        except OSError as exc:  # a link loop, a folder the user may not search
            raise UserError(
                f"{path}: cannot read ({exc.strerror or exc}); fix its permissions or link"
            ) from None
        if not stat.S_ISREG(st.st_mode):
            raise UserError(f"{path}: not a file (a folder or device in its place); {LISTED}")
        h.update(f"{utt.feature_path}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        if sizes is not None:  # (for packing: each file's size, in layout order)
            sizes.append(st.st_size)
    return h.hexdigest()[:16]


def _hash_of_json(layout: HW4Layout) -> Any:
    """A sha256 begun with the cache version and the set's three JSON files (cache key and fingerprint)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for name in ("mapping.json", "metadata.json", "testdata.json"):
        h.update(name.encode() + b"\0" + (layout.root / name).read_bytes())
    return h


def index_digest(root: Path) -> str:
    """A digest of a set's three JSON files (read and checked, no feature file opened): what a study
    records so that another set given to ``export-top --data`` is refused before it is packed."""
    return _hash_of_json(read_layout(Path(root))).hexdigest()[:16]


def check_index(
    root: Path,
    recorded: str | None,
    whose: str,
    was_at: str | None,
    fix: str,
    speakers: Callable[[], list[str]] | None = None,
) -> None:
    """Refuse ``--data root`` whose JSON index is not ``recorded`` (the digest a study or export keeps),
    before minutes of packing another set; nothing recorded (made before it was): the fingerprint,
    after packing, decides. ``speakers`` given: another set of the speakers it returns, in that id
    order, is accepted (what vote and predict can score); asked only then (it reads a checkpoint)."""
    if recorded and index_digest(root) != recorded:
        if speakers is not None and read_layout(Path(root)).speakers == speakers():
            return
        raise UserError(
            f"--data {root}: not the data set {whose} was run on (its mapping, metadata or test list differ "
            f"from those of {was_at or '?'}); {fix}"
        )


@dataclass
class PackedData:
    """A packed HW4 set: ``features[offsets[i]: offsets[i] + lengths[i]]`` is utterance ``i``.

    Labelled utterances come first (``labels >= 0``), then the test utterances in testdata.json order.
    """

    root: Path
    cache_dir: Path
    fingerprint: str  # the set's content (see cache_key); caches packed before it was, their cache key
    n_mels: int
    speakers: list[str]
    ids: list[str]
    features: np.ndarray  # (total_frames, n_mels) float16 memmap
    offsets: np.ndarray  # (N,) int64
    lengths: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N,) int64, -1 for test
    index_digest: str = ""  # its JSON files' digest (:func:`index_digest`); set by pack, not open_cache

    @property
    def n_speakers(self) -> int:
        return len(self.speakers)

    @property
    def labelled(self) -> np.ndarray:
        return np.flatnonzero(self.labels >= 0)

    @property
    def test(self) -> np.ndarray:
        return np.flatnonzero(self.labels < 0)

    def utterance(self, i: int) -> np.ndarray:
        start = int(self.offsets[i])
        return np.asarray(self.features[start : start + int(self.lengths[i])], dtype=np.float32)


def default_cache_root(studies: Path | None = None) -> Path:
    """``$SPKID_SEARCH_CACHE``, else ``cache`` in ``studies`` (the folder holding a study's folder, so
    a command on an existing study from another working folder reuses the cache its run packed)."""
    env = os.environ.get("SPKID_SEARCH_CACHE")
    return Path(env) if env else (studies if studies is not None else studies_root()) / "cache"


def pack(
    root: Path, cache_root: Path | None = None, progress: bool = True, reuse_from: Path | None = None
) -> PackedData:
    """Open an HW4 directory through its packed cache, packing it first if the set is new or changed.

    ``reuse_from``: another cache folder whose packing of this set is read if it has one that this user
    made (vote's, named by an export's manifest, which no checksum covers); nothing is packed there.
    """
    layout = read_layout(Path(root))
    index = _hash_of_json(layout)
    digest = index.hexdigest()[:16]  # index_digest(root), without reading the layout twice
    sizes: list[int] = []
    key = cache_key(layout, index, sizes)
    if reuse_from is not None and _is_own_packing(Path(reuse_from) / key):
        return dataclasses.replace(open_cache(Path(reuse_from) / key, layout.root), index_digest=digest)
    cache_root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = cache_root / key
    if _is_packed(target) and not _all_finite(target):
        shutil.rmtree(target, ignore_errors=True)  # packed before values were checked: the file is named
    if not _is_packed(target):
        with _packing_turn(cache_root, key, layout.root, progress):
            if not _is_packed(target):  # else another command packed it while this one waited
                _build_cache(layout, key, target, progress, sizes)
    return dataclasses.replace(open_cache(target, layout.root), index_digest=digest)


@contextlib.contextmanager
def _packing_turn(cache_root: Path, key: str, root: Path, progress: bool) -> Iterator[None]:
    """One packing of a set at a time in a cache folder: a second command waits, then uses the first's.

    Why: the workers of a Docker set-up, or two runs, started together each packed the set in full at
    the same time (for HW4, twice the 6.85 GB read and twice 3.4 GB of temp files) and one packing was
    thrown away. Where no lock file can be made (a folder this user cannot write), packing says why.
    """

    def say_waiting() -> None:
        if progress:
            from search.progress import note

            note(f"waiting for another command that is packing {root} into {cache_root}")

    with contextlib.ExitStack() as held:
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
            held.enter_context(one_at_a_time(cache_root / f".{key}.packing-turn", say_waiting))
        except OSError:
            pass  # _build_cache says what is wrong with the folder
        yield


def _is_own_packing(target: Path) -> bool:
    """A finished packing in ``target`` whose folder and files this user owns, its values checked."""
    try:
        owned = all(
            (target / name).lstat().st_uid == os.getuid()
            for name in ("", "features.npy", "index.npz", "meta.json")
        )
        return owned and _is_packed(target) and _all_finite(target)
    except (OSError, UserError):
        return False


def _is_packed(target: Path) -> bool:
    """Whether ``target`` holds a finished packing (its index is written last).

    ``stat``, not ``Path.exists``: that hides a permission error as "absent" from Python 3.14 on, and the
    set would be packed again over a cache another user made private.
    """
    try:
        (target / "index.npz").stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:  # caches were private (0700) to the user who packed them before usual_mode
        raise UserError(
            f"{target}: cannot read this packed cache ({exc.strerror or exc}): another user packed it; make "
            f"it readable to you (chmod -R a+rX {target}) or delete it to pack the set again"
        ) from None
    return True


# A packing's temp folder: ".<cache key>-<pid>@<host>-" + mkdtemp's letters. The packing holds an
# exclusive flock on its PACKING_LOCK file while it runs, and a later packing in the same cache folder
# removes a folder whose lock it can take: that packing died (SIGKILL, the OOM killer, a power cut).
# On a file system that may be shared between machines (anything but a known local disk) flock may be
# local to each (NFS with local_lock, FUSE), so there the folder must also name this host and a process
# that is gone. A folder without a lock file (killed before it made one, or no flock there) is left alone.
_PACKING = re.compile(r"^\.[0-9a-f]{16}-(?:(\d+)@(.+)-)?[a-z0-9_]{8}$")
PACKING_LOCK = ".packing"


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


def _packing_prefix(key: str) -> str:
    return f".{key}-{os.getpid()}@{_host()}-"


def _hold_packing_lock(tmp: Path) -> int | None:
    """Take the lock that marks ``tmp`` as in use; the fd (closed by the caller) holds it.

    The file is locked under another name and then renamed, so a sweep never finds an unlocked
    ``PACKING_LOCK`` in a live packing's folder. None where the file system has no flock: the folder
    then has no ``PACKING_LOCK``, and no sweep removes it.
    """
    fd = os.open(tmp / f"{PACKING_LOCK}.new", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp / f"{PACKING_LOCK}.new", tmp / PACKING_LOCK)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep_abandoned_packings(cache_root: Path) -> list[Path]:
    """Remove the temp folders of packings that died in ``cache_root``; returns those removed.

    Why: an interrupted packing removes its own folder, but a killed one cannot; each left a hidden
    partial copy of the set (up to 3.4 GB for HW4) that nothing used or named.
    """
    removed: list[Path] = []
    try:
        entries = [(e, _PACKING.match(e.name)) for e in cache_root.iterdir()]
    except OSError:
        return removed
    host, shared = _host(), filesystem_type(cache_root) not in LOCAL_FS
    for folder, name in entries:
        if name is None:
            continue
        # A container restarted or made anew has another host name, or the dead one's pid: flock decides
        # on a local disk (a Docker volume), and only there.
        pid, where = name.group(1), name.group(2)
        if shared and (pid is None or where != host or pid_alive(int(pid))):  # (this process: alive)
            continue
        try:  # for writing: NFS grants an exclusive lock only on a file open for writing
            fd = os.open(folder / PACKING_LOCK, os.O_RDWR)
        except OSError:  # no lock file (killed before it was made, or no flock here): left alone
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # taken: no live packing holds it
            shutil.rmtree(folder)
            removed.append(folder)
        except OSError:  # held (BlockingIOError), or not ours to remove
            pass
        finally:
            os.close(fd)
    return removed


def _all_finite(cache_dir: Path) -> bool:
    """Whether a cache holds only finite values; checked once, then recorded in its ``meta.json``.

    Why: versions before the float16 range check packed a value past 65504 as inf, and a cache is
    reused as long as its set's files are unchanged. Such a cache is packed again, which names the file.
    """
    meta_path = cache_dir / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("finite"):
            return True
        features = np.load(cache_dir / "features.npy", mmap_mode="r")
    except (OSError, ValueError, TypeError, AttributeError):
        return True  # open_cache says what is wrong with it
    rows = max(1, (1 << 24) // max(1, features.shape[1]))  # 32 MB of float16 at a time
    for start in range(0, features.shape[0], rows):
        if not np.isfinite(features[start : start + rows]).all():
            return False
    with contextlib.suppress(OSError):  # a read-only cache is checked again next time
        tmp = cache_dir / f".meta.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({**meta, "finite": True}))
        os.replace(tmp, meta_path)
    return True


def _build_cache(layout: HW4Layout, key: str, target: Path, progress: bool, sizes: list[int]) -> None:
    """Stream every tensor into a preallocated memmap in a temp dir, then rename it into place.

    The set's fingerprint is hashed on the way: the JSON files, then each utterance's name and packed
    float16 frames in order, i.e. exactly what training and inference read from the cache.
    """
    from search.progress import progress_bar

    utts = [*layout.train, *layout.test]
    _check_lengths_fit(layout, utts, sizes)
    lengths = np.array([u.mel_len for u in utts], dtype=np.int64)
    offsets = np.zeros(len(utts), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    total = int(lengths.sum())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_abandoned_packings(target.parent)
        tmp = Path(tempfile.mkdtemp(prefix=_packing_prefix(key), dir=target.parent))
    except OSError as exc:
        fix = (
            "set $SPKID_SEARCH_CACHE to a folder you can write to"
            if os.environ.get("SPKID_SEARCH_CACHE")
            else "run from a folder you can write to (the cache is ./studies/cache, or $SPKID_SEARCH_CACHE)"
        )
        raise UserError(
            f"{target.parent}: cannot write the packed feature cache there ({exc.strerror or exc}); {fix}"
        ) from None
    lock = None
    try:
        usual_mode(tmp, folder=True)  # mkdtemp's 0700 kept other users (a Docker worker) out of the cache
        lock = _hold_packing_lock(tmp)
        feats = np.lib.format.open_memmap(
            tmp / "features.npy", mode="w+", dtype=np.float16, shape=(max(total, 1), layout.n_mels)
        )
        content = _hash_of_json(layout)
        with progress_bar(f"packing {layout.root}", total=len(utts), enabled=progress) as advance:
            for i, utt in enumerate(utts):
                tensor = load_feature(layout.root / utt.feature_path, layout.n_mels, utt.mel_len)
                half = tensor.numpy().astype(np.float16, order="C")  # C order: hashed as a buffer
                feats[offsets[i] : offsets[i] + lengths[i]] = half
                content.update(f"{utt.feature_path}:{half.shape[0]}\n".encode())
                content.update(half.data)
                advance(1)
        feats.flush()
        del feats
        np.savez(
            tmp / "index.npz",
            offsets=offsets,
            lengths=lengths,
            labels=np.array([u.label for u in utts], dtype=np.int64),
        )
        meta = {
            "version": CACHE_VERSION,
            "fingerprint": content.hexdigest()[:16],
            "cache_key": key,
            "root": str(layout.root.resolve()),
            "n_mels": layout.n_mels,
            "speakers": layout.speakers,
            "ids": [u.feature_path for u in utts],
            "finite": True,  # every value checked as it was packed (load_feature)
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        # On disk before the folder is renamed into place: pack() trusts any cache folder it finds, so a
        # power cut must not leave one whose files were never written out.
        for name in ("features.npy", "index.npz", "meta.json"):
            _fsync(tmp / name)
        for name in (PACKING_LOCK, f"{PACKING_LOCK}.new"):  # (.new: a file system without flock)
            with contextlib.suppress(FileNotFoundError):
                (tmp / name).unlink()  # the fd still holds the lock; a folder without the file is never swept
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_packed(target):  # another process did not win the race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def _check_lengths_fit(layout: HW4Layout, utts: list[Utterance], sizes: list[int]) -> None:
    """Refuse a mel_len that its file is too small to hold, before the cache is sized from them.

    Why: a length in samples rather than frames (x160) made a cache file of terabytes, or failed inside
    numpy with a traceback, before any feature file was read. Such a file is loaded, which names what is
    wrong with it (its frames against mel_len, its shape or contents).
    """
    for utt, size in zip(utts, sizes, strict=True):
        path = layout.root / utt.feature_path
        if utt.mel_len * layout.n_mels * 2 > size:  # at least 2 bytes a value, even at half precision
            load_feature(path, layout.n_mels, utt.mel_len)
            raise UserError(
                f"{path}: the metadata says mel_len {utt.mel_len}, more frames than its {size:,} bytes can "
                f"hold ({layout.n_mels} values a frame); correct the mel_len"
            )


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_cache(cache_dir: Path, root: Path | None = None) -> PackedData:
    """Map a packed cache read-only-shared (copy-on-write, so torch can wrap it without copying)."""
    try:
        meta = json.loads((cache_dir / "meta.json").read_text())
        with np.load(cache_dir / "index.npz") as index:
            offsets, lengths, labels = index["offsets"], index["lengths"], index["labels"]
        features = np.load(cache_dir / "features.npy", mmap_mode="c")
        return PackedData(
            root=Path(root) if root is not None else Path(meta["root"]),
            cache_dir=cache_dir,
            fingerprint=meta["fingerprint"],
            n_mels=int(meta["n_mels"]),
            speakers=list(meta["speakers"]),
            ids=list(meta["ids"]),
            features=features,
            offsets=offsets,
            lengths=lengths,
            labels=labels,
        )
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise UserError(
            f"{cache_dir}: packed cache is damaged ({what}); delete that folder to re-pack"
        ) from None


# --------------------------------------------------------------------------------------------------
# Train/valid split
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Split:
    """Which labelled utterances train and which validate; ``split_id`` lets a study check it later."""

    train: np.ndarray
    valid: np.ndarray
    ratio: float
    seed: int
    split_id: str


def unvalidated_note(data: PackedData) -> str | None:
    """A note when some speakers have a single labelled utterance: :func:`make_split` cannot hold one
    out, so validation accuracy, which ranks trials and picks checkpoints, says nothing about them."""
    counts = np.bincount(data.labels[data.labelled], minlength=data.n_speakers)
    lone = int((counts == 1).sum())
    if not lone:
        return None
    return (
        f"{lone} of the {int((counts > 0).sum())} speakers in {data.root} have one labelled utterance: they "
        "are trained on but never validated, so validation accuracy leaves them out"
    )


def make_split(data: PackedData, ratio: float = 0.1, seed: int = 0) -> Split:
    """Stratified by speaker: each speaker with 2+ utterances gives round(ratio*n) (at least 1) to valid."""
    rng = np.random.default_rng(seed)
    labelled = data.labelled
    labels = data.labels[labelled]
    valid_parts = []
    for spk in range(data.n_speakers):
        members = labelled[labels == spk]
        if len(members) < 2:
            continue
        k = min(len(members) - 1, max(1, int(round(ratio * len(members)))))
        valid_parts.append(rng.permutation(members)[:k])
    if not valid_parts:  # accuracy on no utterances would read 0.0 and rank every trial the same
        held_out = bool((data.labels < 0).any())  # test utterances prepare could have left for training
        raise UserError(
            f"{data.root}: no speaker has 2 or more labelled utterances, so none can be held out to "
            "validate on; give each speaker more utterances"
            + (
                " (or prepare it with fewer test utterances: --test-per-speaker 0 keeps them all)"
                if held_out
                else ""
            )
        )
    valid = np.sort(np.concatenate(valid_parts))
    train = np.setdiff1d(labelled, valid)
    digest = hashlib.sha256(data.fingerprint.encode() + valid.astype(np.int64).tobytes()).hexdigest()[:16]
    return Split(train=train, valid=valid, ratio=ratio, seed=seed, split_id=digest)


# --------------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------------


def rebuild_split(data: PackedData, ratio: float, seed: int, split_id: str, source: str) -> Split:
    """The validation split a study used, refused if it no longer reproduces (other data or code)."""
    split = make_split(data, ratio, seed)
    if split.split_id != split_id:
        raise UserError(
            f"{source}: validation split {split_id} (ratio {ratio}, seed {seed}) does not reproduce on "
            f"{data.root} (got {split.split_id}); pass the data folder the study was trained on"
        )
    return split


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


class FeatureStore:
    """The packed features as one torch tensor, so crops are gathered with one indexing op.

    On CPU this wraps the memmap without copying. On CUDA the whole float16 array is moved to the GPU
    once when it fits in half the free memory (HW4 is about 3 GB), so a batch never crosses the PCIe
    bus; otherwise it stays in host memory (``resident`` is False), crops are gathered there into
    pinned memory and copied asynchronously, and :class:`CropSampler` prepares the next batch while
    the GPU works on the current one.
    """

    def __init__(
        self, data: PackedData, device: torch.device | str = "cpu", resident: bool | None = None
    ) -> None:
        self.data = data
        self.device = self.resolve(device)
        feats = torch.from_numpy(data.features)
        if resident is None:
            resident = (
                self.device.type == "cpu" or feats.nbytes < 0.5 * torch.cuda.mem_get_info(self.device)[0]
            )
        self.resident = resident
        self.home = self.device if resident else torch.device("cpu")  # where features and index live
        self.features = feats.to(self.home)
        self.offsets = torch.from_numpy(data.offsets).to(self.home)
        self.lengths = torch.from_numpy(data.lengths).to(self.home)
        self.labels = torch.from_numpy(data.labels).to(self.home)
        # A plain ndarray view of the memmap (no copy): np.memmap's subclass hooks make fancy indexing
        # on it several times slower.
        self._host = np.asarray(data.features).view(np.ndarray)

    @staticmethod
    def resolve(device: torch.device | str) -> torch.device:
        """``device`` with its index: "cuda" means the current GPU.

        Tensors' devices compare equal only to an indexed device (torch.device("cuda") != cuda:0, which
        once sent CUDA tensors to pinning).
        """
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return device

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Move a tensor from ``home`` to the compute device (pinned + non-blocking from the host)."""
        if t.device == self.device:
            return t
        if self.device.type == "cuda" and t.device.type == "cpu":  # only host memory can be pinned
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def gather(
        self, index: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, width: int
    ) -> torch.Tensor:
        """Frames ``starts[b] .. starts[b] + lengths[b]`` of utterances ``index[b]``, padded to ``width``.

        Inputs live on ``home``; the result is on the compute device.
        """
        if self.home.type == "cpu":
            return self.gather_host(index.numpy(), starts.numpy(), lengths.numpy(), width)
        steps = torch.arange(width, device=self.home)
        mask = steps[None, :] < lengths[:, None]
        rows = self.offsets[index][:, None] + starts[:, None] + torch.where(mask, steps[None, :], 0)
        x = self.features[rows.reshape(-1)].reshape(len(index), width, -1)
        return x.float().masked_fill(~mask[:, :, None], PAD_VALUE)

    def gather_host(
        self, index: np.ndarray, starts: np.ndarray, lengths: np.ndarray, width: int
    ) -> torch.Tensor:
        """:meth:`gather` for host-resident features, in numpy: one ``np.take`` on the memmap.

        A handful of numpy calls on small index arrays instead of a dozen torch CPU ops: about 30 us
        per 32 x 128 batch, most of it the gather itself. Positions past an utterance's end read its
        last frame and are then overwritten with the pad value, so no index ever leaves the utterance.
        """
        steps = np.arange(width)
        rows = (self.data.offsets[index] + starts)[:, None] + np.minimum(steps, lengths[:, None] - 1)
        x = torch.from_numpy(np.take(self._host, rows, axis=0))  # (B, width, n_mels) float16
        short = lengths < width
        if short.any():
            x[torch.from_numpy(steps[None, :] >= lengths[:, None])] = PAD_VALUE  # exact in float16
        if self.device.type == "cpu":
            return x.float()
        return self.to_device(x).float()  # copy float16 (half the bytes), convert on the device


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def restore_generator(generator: torch.Generator, state: torch.Tensor | None, seed: int, step: int) -> bool:
    """Set ``generator`` to a saved ``state``, or, where that state is another device's (or none was
    saved), seed it anew from ``seed`` and ``step``; whether the saved stream goes on.

    Why: a generator's state is its device's (CUDA: 16 bytes of seed and offset; CPU: 5,056 of
    Mersenne Twister), so a trial killed on a GPU and retried on a CPU worker (or on a GPU whose set
    stayed in host memory) failed for good and lost its training. A fresh stream is a statistically
    equal continuation, as a resumed run on CUDA already is (see ``search.train._rng_state``); the step
    in its seed keeps it off the stream the trial began with.
    """
    if state is not None and state.dtype == torch.uint8 and state.numel() == generator.get_state().numel():
        generator.set_state(state)
        return True
    generator.manual_seed(hash((seed, step)) & (2**63 - 1))
    return False


class CropSampler:
    """Random fixed-length crops of training utterances (shorter ones kept whole, padded, with lengths)."""

    def __init__(
        self, store: FeatureStore, indices: np.ndarray, batch_size: int, segment_len: int, seed: int
    ) -> None:
        if len(indices) == 0:
            raise UserError("no training utterances: the data set or split is empty")
        self.store = store
        self.indices = torch.as_tensor(indices, dtype=torch.int64, device=store.home)
        self._host_indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.segment_len = segment_len
        self.seed = seed
        self.generator = torch.Generator(device=store.home)
        self.generator.manual_seed(seed)
        self._ahead: Batch | None = None
        self._before_ahead = self.generator.get_state()

    def state(self) -> torch.Tensor:
        """RNG state as of the last batch handed out (a prefetched batch is drawn again on resume)."""
        return self._before_ahead if self._ahead is not None else self.generator.get_state()

    def set_state(self, state: torch.Tensor, step: int) -> None:
        """Continue from ``state`` (saved at ``step``), or from a seed of its own where it does not fit
        (see :func:`restore_generator`)."""
        restore_generator(self.generator, state, self.seed, step)
        self._ahead = None

    def _draw(self) -> Batch:
        home, g = self.store.home, self.generator
        pick = torch.randint(len(self.indices), (self.batch_size,), device=home, generator=g)
        unit = torch.rand(self.batch_size, device=home, generator=g)
        if home.type == "cpu":  # same draws, index arithmetic in numpy (torch's per-op cost dominates here)
            return self._draw_host(pick.numpy(), unit.numpy())
        index = self.indices[pick]
        full = self.store.lengths[index]
        lengths = full.clamp(max=self.segment_len)
        spare = full - lengths
        starts = torch.minimum((unit * (spare + 1).float()).long(), spare)
        x = self.store.gather(index, starts, lengths, self.segment_len)
        return x, lengths, self.store.labels[index]

    def _draw_host(self, pick: np.ndarray, unit: np.ndarray) -> Batch:
        data = self.store.data
        index = self._host_indices[pick]
        full = data.lengths[index]
        lengths = np.minimum(full, self.segment_len)
        spare = full - lengths
        starts = np.minimum((unit * (spare + 1).astype(np.float32)).astype(np.int64), spare)
        x = self.store.gather_host(index, starts, lengths, self.segment_len)
        to_device = self.store.to_device
        return x, to_device(torch.from_numpy(lengths)), to_device(torch.from_numpy(data.labels[index]))

    def next(self) -> Batch:
        """One batch: features (B, T, n_mels) float32, lengths (B,), labels (B,), on the compute device.

        From a host-resident store the following batch is gathered and its copy started right away,
        so it overlaps the GPU's work on this one (double buffering).
        """
        if self.store.resident:
            return self._draw()
        batch = self._ahead if self._ahead is not None else self._draw()
        self._before_ahead = self.generator.get_state()
        self._ahead = self._draw()
        return batch


def eval_batches(
    store: FeatureStore, indices: np.ndarray, frame_budget: int = 65536
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Whole utterances, sorted by length and bucketed so batch * longest <= frame_budget.

    Yields (indices of the batch, features (B, T, n_mels), lengths (B,)); a single utterance longer
    than the budget still gets a batch of its own, so nothing is dropped.
    """
    lengths = store.data.lengths[indices]
    order = np.asarray(indices)[np.argsort(lengths, kind="stable")]
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * int(store.data.lengths[order[end]]) <= frame_budget:
            end += 1
        batch = order[start:end]
        lens = torch.as_tensor(store.data.lengths[batch], device=store.home)
        width = int(store.data.lengths[batch].max())
        index = torch.as_tensor(batch, device=store.home)
        x = store.gather(index, torch.zeros_like(lens), lens, width)
        yield batch, x, store.to_device(lens)
        start = end


def open_data(
    root: Path, cache_root: Path | None = None, progress: bool = True, reuse_from: Path | None = None
) -> PackedData:
    """Pack (once) and open the data set in ``root``; :func:`search.synth.default_set` is the one used
    when a command is given no --data."""
    return pack(root, cache_root, progress=progress, reuse_from=reuse_from)
