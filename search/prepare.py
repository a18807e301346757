"""Turn a folder (or CSV list) of speaker audio into the exact HW4 feature layout.

Input: ``AUDIO_DIR/<speaker>/[<session>/...]<utt>.wav|.flac`` (VoxCeleb style; the speaker is the first
folder under AUDIO_DIR) or a CSV file list with the header ``path,speaker`` (relative paths are resolved
against the CSV's folder). WAV or FLAC files of any sample rate and sample format, mono or
multi-channel; another format is listed as skipped with the command that converts it.

Features are computed as :mod:`search.audio` says (the HW4 set's recipe, rebuilt without sox).

Output (``OUT``): ``mapping.json``, ``metadata.json``, ``testdata.json``, one ``uttr-<32 hex>.pt`` per
utterance, ``answers.csv`` (``Id,Category`` in testdata order, to score predictions) and
``prepare-state.jsonl``, the per-file record that makes a re-run resume: a source whose size and mtime
are unchanged and whose feature file exists with the recorded size is not decoded again (nor is a bad file
re-tried). Names, speaker ids and the test split depend only on the input and the seed, so the same input
and seed give byte-identical JSON files whatever the number of workers or interruptions. The JSON index
files are written last, each atomically.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from search.audio import (
    AUDIO_SUFFIXES,
    CONVERT,
    N_MELS,
    OTHER_AUDIO_SUFFIXES,
    RECIPE,
    BadAudio,
    features_from_file,
)
from search.errors import UserError, first_line
from search.layout import PREPARE_STATE, read_prepare_state
from search.stops import stops_deferred

STATE_NAME = PREPARE_STATE
STATE_VERSION = 1
LOCK_NAME = ".prepare.lock"
TEMP_PREFIX = ".prepare-tmp-"
INDEX_NAMES = ("mapping.json", "metadata.json", "testdata.json", "answers.csv")
FEATURE_RE = re.compile(r"^uttr-[0-9a-f]{32}\.pt$")


def feature_name(source: str, seed: int) -> str:
    """The ``uttr-<32 hex>.pt`` name of a source (its path relative to the input) for a seed."""
    digest = hashlib.sha256(f"spkid-prepare\n{seed}\n{source}".encode()).hexdigest()
    return f"uttr-{digest[:32]}.pt"


# --------------------------------------------------------------------------------------------------
# One file, in a worker process or inline
# --------------------------------------------------------------------------------------------------


def _extract(path: str, out: str, name: str) -> tuple[str, int, int, str]:
    """Compute and save one feature file: ``(status, mel_len, bytes, reason)``; status ok/skip/error."""
    try:
        feats = features_from_file(Path(path))
    except BadAudio as exc:
        return "skip", 0, 0, str(exc)
    except Exception as exc:  # one undecodable file must never stop the run
        return "skip", 0, 0, f"failed to process ({exc.__class__.__name__}: {first_line(exc)})"
    target = Path(out) / name
    tmp = Path(out) / f"{TEMP_PREFIX}{name}.{os.getpid()}"
    try:
        torch.save(feats, tmp)
        os.replace(tmp, target)
        nbytes = target.stat().st_size
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        return "error", 0, 0, f"cannot write {target} ({exc.strerror or first_line(exc)})"
    return "ok", int(feats.shape[0]), nbytes, ""


def _init_worker() -> None:
    # Ctrl-C is the parent's to handle (it cancels the queue); workers finish their file and exit quietly.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Same thread count inline as in workers, so results do not depend on ``workers``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------------
# Finding the input
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    key: str  # posix path relative to AUDIO_DIR (or the CSV's folder): reports and feature names use it
    path: Path
    speaker: str


def _relative_key(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive on Windows
        return path.as_posix()


def _dir_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def _walk(root: Path, exclude: Path | None) -> tuple[list[Source], list[tuple[str, str]], dict[str, int]]:
    """Audio files under ``root``, following links to folders outside it; each folder read once.

    A link to a folder inside the tree is not followed: the folder is read under its own path, so a
    link ``alias -> spkB`` cannot relabel spkB's files as speaker ``alias`` (which sorts first). It,
    and a second link to a folder read already, is listed as skipped with the path it duplicates.
    """

    def wanted(here: Path, d: str) -> bool:
        return not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)

    read: dict[tuple[int, int], str] = {}  # folders of the tree itself, then as read: id -> key
    for folder, dirnames, _ in os.walk(root):
        dirnames[:] = [d for d in dirnames if wanted(Path(folder), d)]
        with contextlib.suppress(OSError):
            read.setdefault(_dir_id(Path(folder)), _relative_key(Path(folder), root))
    sources: list[Source] = []
    skipped: list[tuple[str, str]] = []
    others: dict[str, int] = {}
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(folder)
        keep = []
        for d in sorted(d for d in dirnames if wanted(here, d)):
            if not (here / d).is_symlink():
                keep.append(d)
                continue
            try:
                ident = _dir_id(here / d)
            except OSError:
                continue  # a broken link: os.walk lists it as a folder only when it resolves
            key = _relative_key(here / d, root)
            if ident in read:
                target = "the audio folder itself" if read[ident] == "." else f"{read[ident]}/"
                skipped.append((key + "/", f"a link to {target}, which is read under its own name"))
                continue
            read[ident] = key
            keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            suffix = Path(name).suffix.lower()
            if name.startswith("."):
                continue
            if suffix not in AUDIO_SUFFIXES:
                if suffix in OTHER_AUDIO_SUFFIXES:  # audio it cannot read: listed, not silently left out
                    others[suffix] = others.get(suffix, 0) + 1
                    reason = f"{suffix} is not read (only .wav and .flac); {CONVERT}"
                    skipped.append((_relative_key(here / name, root), reason))
                continue
            path = here / name
            key = _relative_key(path, root)
            if not _is_utf8(key):  # its name would be the speaker's, in JSON and the CSV: UTF-8 only
                shown = key.encode("utf-8", "backslashreplace").decode()
                skipped.append((shown, "its path is not valid UTF-8 (an old encoding?); rename it"))
                continue
            if "/" not in key:
                skipped.append((key, "not inside a speaker folder (expected AUDIO_DIR/<speaker>/.../file)"))
                continue
            sources.append(Source(key, path, key.split("/", 1)[0]))
    speakers = {src.key.split("/", 1)[0] for src in sources}
    listed = {key.split("/", 1)[0] for key, _ in skipped}
    with contextlib.suppress(OSError):
        for entry in sorted(os.listdir(root)):  # a speaker folder with no audio: listed, not left out quietly
            known = entry in speakers | listed or not _is_utf8(entry)  # (its files are listed, escaped)
            if wanted(root, entry) and not known and (root / entry).is_dir():
                skipped.append((entry + "/", "a folder with no .wav or .flac files in it"))
    return _without_links_to_sources(sources, skipped), skipped, others


def _is_utf8(text: str) -> bool:
    """False for a name the file system gave as bytes that are not UTF-8 (Python holds them as
    surrogates, which no UTF-8 file can store: prepare stopped with a traceback on one)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _without_links_to_sources(sources: list[Source], skipped: list[tuple[str, str]]) -> list[Source]:
    """Drop file links to a file read under its own name (listed as skipped): ``alice/u9.wav ->
    ../bob/u0.wav`` made bob's utterance alice's too. Links to files read nowhere else are kept."""
    links = {src.key for src in sources if src.path.is_symlink()}
    if not links:  # the usual tree: no file needs resolving
        return sources
    own: dict[str, str] = {}
    for src in sources:
        if src.key not in links:
            own.setdefault(os.path.realpath(src.path), src.key)
    kept = []
    for src in sources:
        target = own.get(os.path.realpath(src.path)) if src.key in links else None
        if target is not None:
            skipped.append((src.key, f"a link to {target}, which is read under its own name"))
        else:
            kept.append(src)
    return kept


def _read_csv(csv_path: Path) -> tuple[list[Source], list[tuple[str, str]]]:
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(
            f"{csv_path}: not a UTF-8 text file; pass a folder of audio or a CSV with header 'path,speaker'"
        ) from None
    except OSError as exc:
        raise UserError(f"{csv_path}: cannot read ({exc.strerror or first_line(exc)})") from None
    try:
        rows = list(csv.reader(io.StringIO(text)))
    except csv.Error as exc:
        raise UserError(f"{csv_path}: malformed CSV ({exc})") from None
    if not rows:
        raise UserError(
            f"{csv_path}: empty file; expected the header 'path,speaker' and one row per audio file"
        )
    header = [h.strip().lower() for h in rows[0]]
    if "path" not in header or "speaker" not in header:
        got = ",".join(rows[0])[:80]
        raise UserError(f"{csv_path}: the first line must be the header 'path,speaker' (found '{got}')")
    ip, isp = header.index("path"), header.index("speaker")
    base = csv_path.parent
    sources: list[Source] = []
    skipped: list[tuple[str, str]] = []
    first_seen: dict[str, int] = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        where = f"{csv_path.name}:{lineno}"
        if len(row) <= max(ip, isp):
            skipped.append((where, "row has too few columns (expected path,speaker)"))
            continue
        raw, speaker = row[ip].strip(), row[isp].strip()
        if not raw or not speaker:
            skipped.append((raw or where, "empty path" if not raw else "empty speaker"))
            continue
        path = Path(os.path.normpath(base / Path(raw).expanduser()))
        key = _relative_key(path, base)
        if key in first_seen:
            skipped.append((key, f"listed twice (first on line {first_seen[key]} of {csv_path.name})"))
            continue
        first_seen[key] = lineno
        sources.append(Source(key, path, speaker))
    return sources, skipped


def discover(source: Path, exclude: Path | None = None) -> tuple[list[Source], list[tuple[str, str]]]:
    """The audio files to prepare (sorted by key) and the entries skipped while listing them."""
    source = Path(source).expanduser()
    if not source.exists():
        raise UserError(
            f"{source}: not found; pass a folder of speaker folders (AUDIO_DIR/<speaker>/.../x.wav) "
            "or a CSV file list with the header 'path,speaker'"
        )
    if source.is_file():
        sources, skipped = _read_csv(source)
        if not sources:
            why = f" (line {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
            raise UserError(f"{source}: the file list names no usable audio files{why}")
    else:
        sources, skipped, others = _walk(source, exclude.resolve() if exclude is not None else None)
        if not sources:
            if others:
                found = ", ".join(f"{n} {s}" for s, n in sorted(others.items()))
                raise UserError(
                    f"{source}: found {found} files but no .wav or .flac; convert them first, e.g. "
                    "ffmpeg -i in.m4a -ac 1 -ar 16000 out.wav"
                )
            if any("/" not in key for key, _ in skipped):  # files right in AUDIO_DIR, none in a folder
                raise UserError(
                    f"{source}: audio files lie directly in the folder; put each speaker's files in "
                    "AUDIO_DIR/<speaker>/ (the first folder names the speaker)"
                )
            raise UserError(
                f"{source}: no .wav or .flac files found; expected AUDIO_DIR/<speaker>/[<session>/]<utt>.wav"
            )
    sources.sort(key=lambda s: s.key)
    return sources, skipped


# --------------------------------------------------------------------------------------------------
# The output folder and its state
# --------------------------------------------------------------------------------------------------


def _is_ours(name: str) -> bool:
    return name in (STATE_NAME, LOCK_NAME) or name.startswith(TEMP_PREFIX)


def check_out(out: Path) -> None:
    """Refuse an OUT that is a file, or a non-empty folder that a previous prepare did not write."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder; pass a new or empty --out folder")
    if not out.exists():
        return
    names = sorted(os.listdir(out))
    if STATE_NAME in names or all(_is_ours(n) for n in names):
        return
    if "metadata.json" in names:
        raise UserError(
            f"{out}: holds a data set that 'prepare' did not write (no {STATE_NAME}); refusing to overwrite "
            "it, pass a new or empty --out folder"
        )
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise UserError(f"{out}: folder is not empty ({shown}); pass a new or empty --out folder")


def _write_atomic(path: Path, text: str) -> None:
    """Through a temp file named as prepare's own (a folder holding only those is still prepare's), removed
    if the write fails."""
    tmp = path.with_name(f"{TEMP_PREFIX}{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _state_text(header: dict[str, Any], records: list[dict[str, Any]]) -> str:
    lines = [json.dumps(header, sort_keys=True)]
    lines += [
        json.dumps(r, sort_keys=True, ensure_ascii=False) for r in sorted(records, key=lambda r: r["source"])
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUT so two prepares never interleave their writes."""
    with open(out / LOCK_NAME, "a") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{out}: another 'prepare' is writing this folder; wait for it or use another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


@dataclass
class PrepareReport:
    """What a prepare run produced and what it left out, with a rich summary."""

    out: Path
    speakers: int
    train: int
    test: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (source, reason)
    dropped: list[tuple[str, int]] = field(default_factory=list)  # (speaker, usable utterances)
    processed: int = 0  # files decoded in this run
    reused: int = 0  # files whose earlier result (feature or skip) was kept
    frames: int = 0  # total frames kept (train + test), 100 per second
    min_utterances: int = 2
    index_changed: bool = False  # the folder held a set whose index (speakers, split) this run changed
    capped: int = 0  # speakers with fewer test utterances than asked (one always stays for training)
    validatable: int = 0  # speakers keeping 2+ training utterances: training holds some out to validate on

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def hours(self) -> float:
        return self.frames / 100 / 3600

    def render(self, limit: int = 20) -> RenderableType:
        table = Table(title=f"prepare -> {self.out}", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column(justify="right")
        table.add_row("speakers", f"{self.speakers:,}")
        table.add_row("train utterances", f"{self.train:,}")
        table.add_row("test utterances", f"{self.test:,}")
        if self.capped:
            table.add_row("speakers with fewer test than asked", f"[yellow]{self.capped:,} (too few files)")
        amount = f"{self.hours:.2f} h" if self.hours >= 1 else f"{self.frames / 6000:.1f} min"
        table.add_row("speech kept", f"{amount} ({self.frames:,} frames)")
        table.add_row("skipped files", f"[yellow]{self.n_skipped:,}" if self.skipped else "0")
        table.add_row("speakers left out", f"[yellow]{len(self.dropped):,}" if self.dropped else "0")
        table.add_row("decoded / reused", f"{self.processed:,} / {self.reused:,}")
        parts: list[RenderableType] = [table]
        if self.skipped:
            skipped = Table(title="skipped files", title_justify="left")
            skipped.add_column("file", overflow="fold")
            skipped.add_column("reason", overflow="fold")
            for path, reason in self.skipped[:limit]:
                skipped.add_row(path, reason)
            parts.append(skipped)
            if len(self.skipped) > limit:
                parts.append(
                    Text(f"... and {len(self.skipped) - limit:,} more (see {self.out / STATE_NAME})")
                )
        if self.dropped:
            names = ", ".join(f"{name} ({n})" for name, n in self.dropped[:limit])
            more = f", ... and {len(self.dropped) - limit:,} more" if len(self.dropped) > limit else ""
            parts.append(
                Text(
                    f"Left out, fewer than {self.min_utterances} usable utterances: {names}{more}",
                    style="yellow",
                )
            )
        return Group(*parts)


# --------------------------------------------------------------------------------------------------
# prepare()
# --------------------------------------------------------------------------------------------------


def _check_args(
    test_per_speaker: int | None, test_fraction: float | None, workers: int, seed: int, min_utterances: int
) -> None:
    if test_per_speaker is not None and test_fraction is not None:
        raise UserError("give either --test-per-speaker or --test-fraction, not both")
    if test_per_speaker is not None and (isinstance(test_per_speaker, bool) or test_per_speaker < 0):
        raise UserError(f"--test-per-speaker must be a whole number >= 0, got {test_per_speaker}")
    if test_fraction is not None and not 0.0 < test_fraction < 1.0:
        raise UserError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    if min_utterances < 1:
        raise UserError(f"--min-utterances must be at least 1, got {min_utterances}")


def _asked_test(n: int, test_per_speaker: int | None, test_fraction: float | None) -> int:
    """Test utterances the options ask of a speaker with ``n`` usable ones."""
    if test_fraction is not None:
        return max(1, int(math.floor(test_fraction * n + 0.5)))
    return 1 if test_per_speaker is None else test_per_speaker


def _n_test(n: int, test_per_speaker: int | None, test_fraction: float | None) -> int:
    """Test utterances for a speaker with ``n`` usable ones; at least one always stays for training."""
    return max(0, min(_asked_test(n, test_per_speaker, test_fraction), n - 1))


def _speaker_rng(seed: int, speaker: str) -> np.random.Generator:
    """One generator per speaker, so adding a speaker does not reshuffle the others' test picks."""
    digest = int.from_bytes(hashlib.sha256(speaker.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


Job = tuple[Source, str, dict[str, Any]]  # source, feature name, its stat as recorded in the state
Result = tuple[str, int, int, str]  # status (ok, skip, error), mel_len, bytes, reason


def _run(
    todo: list[Job],
    out: Path,
    workers: int,
    progress: bool,
    description: str,
    on_result: Callable[[Job, Result], None],
    extract: Callable[[str, str, str], Result] = _extract,
) -> None:
    """Extract every job, calling ``on_result(job, result)`` as each finishes.

    On Ctrl-C the queue is cancelled, the files in the workers' hands are finished and recorded, and the
    interrupt goes on. ``extract`` is the work for one file (a picklable function when ``workers`` > 1).
    """
    from search.progress import progress_bar

    with progress_bar(description, total=len(todo), enabled=progress and bool(todo)) as advance:
        if workers <= 1 or len(todo) <= 1:
            with _single_thread():
                for job in todo:
                    on_result(job, extract(str(job[0].path), str(out), job[1]))
                    advance(1)
            return
        ctx = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(
            max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_init_worker
        )
        futures: dict[Future[Result], Job] = {}
        recorded: set[Future[Result]] = set()
        try:
            # The workers start as the jobs are submitted. Started with SIGINT blocked, they inherit the
            # block, so a Ctrl-C while they import torch (before _init_worker runs) does not print a
            # traceback from each; here it waits until they have started (held back in Python too: the
            # mask covers this thread only), then stops the queue.
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                with stops_deferred():
                    for job in todo:
                        futures[pool.submit(extract, str(job[0].path), str(out), job[1])] = job
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fut in as_completed(futures):
                recorded.add(fut)
                on_result(futures[fut], fut.result())
                advance(1)
        except BrokenProcessPool:
            pool.shutdown(wait=False, cancel_futures=True)
            raise UserError(
                "a worker process died (out of memory, a crash in the decoder, or a script calling prepare() "
                "without an `if __name__ == '__main__':` guard); finished files are kept: re-run, with "
                "--workers 1 to see which file it is"
            ) from None
        except BaseException as exc:
            # Waited for: an executor dropped at once (wait=False) never had its queue cancelled, and its
            # manager thread fed every remaining file to the workers until the interpreter's exit, the
            # results unrecorded (a Ctrl-C went on decoding the whole corpus). Now the workers finish only
            # the files in hand, and those are recorded, so a resumed run does not decode them again.
            pool.shutdown(wait=True, cancel_futures=True)
            if isinstance(exc, KeyboardInterrupt):
                with contextlib.suppress(Exception):  # a failed write is the next run's to report
                    for fut, job in futures.items():
                        if fut.done() and not fut.cancelled() and fut not in recorded and not fut.exception():
                            on_result(job, fut.result())
            raise
        pool.shutdown(wait=True)


def prepare(
    audio_dir_or_csv: Path,
    out: Path,
    test_per_speaker: int | None = None,
    test_fraction: float | None = None,
    workers: int = 1,
    seed: int = 0,
    progress: bool = True,
    min_utterances: int = 2,
    force: bool = False,
) -> PrepareReport:
    """Compute HW4 features for a speaker-labelled audio corpus and write the HW4 layout into ``out``.

    ``test_per_speaker`` (default 1) or ``test_fraction`` utterances of every speaker go to
    testdata.json (their labels to answers.csv); speakers with fewer than ``min_utterances`` usable
    files are left out. Bad files are skipped with a reason, never fatal. Re-running resumes; a re-run
    from another source or with another seed, split option or ``min_utterances`` would change a
    finished set's index (studies made on it then refuse it), so it needs ``force``.
    ``workers > 1`` starts spawned processes, so a script calling this needs the usual
    ``if __name__ == "__main__":`` guard (the CLI has it).
    """
    _check_args(test_per_speaker, test_fraction, workers, seed, min_utterances)
    source_path, out = Path(audio_dir_or_csv).expanduser(), Path(out).expanduser()
    sources, skipped = discover(source_path, exclude=out)
    speakers = {src.speaker for src in sources}
    if len(speakers) == 1:  # said before any file is decoded (see _one_speaker)
        raise UserError(_one_speaker(source_path, next(iter(speakers)), "has audio files"))
    check_out(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{out}: cannot create the folder ({exc.strerror or first_line(exc)})") from None

    try:
        with _locked(out):
            return _prepare_locked(
                source_path,
                out,
                sources,
                skipped,
                test_per_speaker,
                test_fraction,
                workers,
                seed,
                progress,
                min_utterances,
                force,
            )
    except UserError:
        if created:  # refused with nothing to show for it: leave no folder of bookkeeping behind
            _remove_if_bookkeeping_only(out)
        raise


def _remove_if_bookkeeping_only(out: Path) -> None:
    """Remove ``out`` if it holds only this module's state, lock and temp files."""
    with contextlib.suppress(OSError):
        names = [p.name for p in out.iterdir()]
        if all(n in (STATE_NAME, LOCK_NAME) or n.startswith(TEMP_PREFIX) for n in names):
            shutil.rmtree(out)


# The options that shape a set's index, as the CLI names them (recorded in the state file's header).
INDEX_OPTIONS = {
    "seed": "--seed",
    "test_per_speaker": "--test-per-speaker",
    "test_fraction": "--test-fraction",
    "min_utterances": "--min-utterances",
    "source": "AUDIO_DIR",
}


def _held_a_set(out: Path, old_header: dict[str, Any]) -> bool:
    """Whether ``out`` holds a finished set, or held one when a re-run was cut off before it wrote the
    index again (the header's ``finished`` says so then: the run after such a stop took another seed
    without --force)."""
    return (out / "metadata.json").is_file() or bool(old_header.get("finished"))


def _check_same_options(out: Path, old_header: dict[str, Any], options: dict[str, Any]) -> None:
    """Refuse, before anything changes, a re-run whose options or source would give a finished set a
    new index (another AUDIO_DIR had replaced a whole set with only a note)."""
    if not _held_a_set(out, old_header):
        return  # no finished set yet: an interrupted first run may go on with other options
    changed = [key for key, value in options.items() if key in old_header and old_header[key] != value]
    if changed:

        def shown(value: Any) -> str:
            return "unset" if value is None else str(value)

        what = ", ".join(f"{INDEX_OPTIONS[k]} {shown(old_header[k])} -> {shown(options[k])}" for k in changed)
        moved = (
            " (the same audio at a new path gives the same set: --force then reuses every feature)"
            if "source" in changed
            else ""
        )
        raise UserError(
            f"{out}: holds a set prepared with other options ({what}); studies made on it would refuse "
            f"the new one: pass --force to replace it, or choose another --out (nothing was changed){moved}"
        )


def _check_same_recipe(out: Path, old_header: dict[str, Any]) -> None:
    """Refuse, before anything changes, to recompute a finished set whose features an earlier version
    of the recipe made (version 1 kept pauses inside utterances): every feature would change, and
    studies made on the set would refuse it."""
    if not _held_a_set(out, old_header) or "recipe" not in old_header:
        return
    raise UserError(
        f"{out}: holds a set prepared with an earlier feature recipe ({old_header['recipe']}); this version "
        "computes every feature again, and studies made on the set would refuse the new one: "
        "pass --force to recompute it, or choose another --out (nothing was changed)"
    )


def _one_speaker(source: Path, speaker: str, what: str) -> str:
    """Why a one-speaker set is refused: it trains to a trivial 100% accuracy."""
    return (
        f"{source}: only one speaker ('{speaker}') {what}; speaker identification needs at least two. "
        "The folders directly under AUDIO_DIR are the speakers: point it at the folder that holds one "
        "folder per speaker"
    )


def _prepare_locked(
    source_path: Path,
    out: Path,
    sources: list[Source],
    skipped: list[tuple[str, str]],
    test_per_speaker: int | None,
    test_fraction: float | None,
    workers: int,
    seed: int,
    progress: bool,
    min_utterances: int,
    force: bool,
) -> PrepareReport:
    state_path = out / STATE_NAME
    old_header, old_records = read_prepare_state(state_path)
    reusable = old_records
    if old_header.get("recipe") != RECIPE or old_header.get("prepare_state") != STATE_VERSION:
        if not force:
            _check_same_recipe(out, old_header)
        reusable = {}  # features from another recipe cannot be reused
    default_split = test_per_speaker is None and test_fraction is None
    options = {
        "seed": seed,
        "test_per_speaker": 1 if default_split else test_per_speaker,
        "test_fraction": test_fraction,
        "min_utterances": min_utterances,
        "source": str(source_path.resolve()),
    }
    if not force:
        _check_same_options(out, old_header, options)
    header = {"prepare_state": STATE_VERSION, "recipe": RECIPE, **options}
    header["finished"] = _held_a_set(out, old_header)
    records, todo, reused = _plan(out, sources, skipped, reusable, seed)

    # To tell the user if the index changes, and to put it back if this run ends before it writes its own.
    old_index = {name: _read_text(out / name) for name in INDEX_NAMES}
    for index_name in INDEX_NAMES:  # the old index no longer describes the folder until rewritten
        with contextlib.suppress(FileNotFoundError):
            (out / index_name).unlink()
    _write_atomic(state_path, _state_text(header, list(records.values())))
    try:
        with open(state_path, "a", encoding="utf-8") as log:
            _process(todo, out, workers, progress, source_path, records, log)
        for key, rec in records.items():
            if "skip" in rec:
                skipped.append((key, rec["skip"]))
        skipped.sort()
        usable, kept = _speakers(source_path, sources, records, skipped, min_utterances)
    except BaseException:  # refused, stopped or a full disk: the folder keeps the set it held, if it can
        if _restore_index(out, old_index, {name for _, name, _ in todo}):
            # The set it held, with what this run decoded so far (a re-run that adds files resumes).
            with contextlib.suppress(OSError):  # a full disk: what stopped the run is what is said
                _write_atomic(state_path, _state_text(old_header, list({**old_records, **records}.values())))
        _prune(out, None)
        raise
    header["finished"] = True  # the index is written next (the records appended so far, compacted)
    _write_atomic(state_path, _state_text(header, list(records.values())))

    dropped = sorted((s, len(recs)) for s, recs in usable.items() if len(recs) < min_utterances)
    expected = {rec["feature"] for recs in usable.values() for rec in recs}
    order = np.random.default_rng(seed).permutation(len(kept))
    speaker2id = {name: int(order[i]) for i, name in enumerate(kept)}

    train_by_speaker: dict[str, list[dict[str, Any]]] = {}
    test_entries: list[tuple[dict[str, Any], str]] = []
    capped = 0
    for name in kept:
        recs = sorted(usable[name], key=lambda r: r["source"])
        k = _n_test(len(recs), test_per_speaker, test_fraction)
        capped += k < _asked_test(len(recs), test_per_speaker, test_fraction)
        pick = set(_speaker_rng(seed, name).permutation(len(recs))[:k].tolist())
        train_by_speaker[name] = [r for i, r in enumerate(recs) if i not in pick]
        test_entries += [(r, name) for i, r in enumerate(recs) if i in pick]
    test_entries.sort(key=lambda e: e[0]["feature"])

    def entry(rec: dict[str, Any]) -> dict[str, Any]:
        return {"feature_path": rec["feature"], "mel_len": int(rec["mel_len"])}

    metadata = {
        "n_mels": N_MELS,
        "speakers": {
            name: [entry(r) for r in sorted(train_by_speaker[name], key=lambda r: r["feature"])]
            for name in kept
        },
    }
    testdata = {"n_mels": N_MELS, "utterances": [entry(r) for r, _ in test_entries]}
    mapping = {
        "speaker2id": speaker2id,
        "id2speaker": {str(sid): name for name, sid in sorted(speaker2id.items(), key=lambda kv: kv[1])},
    }
    answers = io.StringIO()
    writer = csv.writer(answers, lineterminator="\n")
    writer.writerow(["Id", "Category"])
    writer.writerows([r["feature"], name] for r, name in test_entries)

    index = {
        "testdata.json": json.dumps(testdata, ensure_ascii=False) + "\n",
        "metadata.json": json.dumps(metadata, ensure_ascii=False) + "\n",
        "mapping.json": json.dumps(mapping, ensure_ascii=False) + "\n",
    }
    index_changed = any(old_index[name] not in (None, text) for name, text in index.items())
    _write_atomic(out / "answers.csv", answers.getvalue())
    for name, text in index.items():
        _write_atomic(out / name, text)
    _prune(out, expected)

    n_train = sum(len(v) for v in train_by_speaker.values())
    frames = sum(int(r["mel_len"]) for recs in train_by_speaker.values() for r in recs)
    frames += sum(int(r["mel_len"]) for r, _ in test_entries)
    return PrepareReport(
        out=out,
        speakers=len(kept),
        train=n_train,
        test=len(test_entries),
        skipped=skipped,
        dropped=dropped,
        processed=len(todo),
        reused=reused,
        frames=frames,
        min_utterances=min_utterances,
        index_changed=index_changed,
        capped=capped,
        validatable=sum(len(recs) >= 2 for recs in train_by_speaker.values()),
    )


def _plan(
    out: Path,
    sources: list[Source],
    skipped: list[tuple[str, str]],
    old_records: dict[str, dict[str, Any]],
    seed: int,
) -> tuple[dict[str, dict[str, Any]], list[Job], int]:
    """What an earlier run finished and this one reuses (features renamed if only the seed changed),
    and the files left to decode; a source that cannot be read is added to ``skipped``.

    A renamed feature's record is appended to the state file at once: stopped before the state was
    rewritten, the next run found the recorded files gone and decoded the whole set again.
    """
    records: dict[str, dict[str, Any]] = {}
    todo: list[Job] = []
    reused = 0
    with contextlib.ExitStack() as stack:
        log: IO[str] | None = None
        for src in sources:
            planned = _plan_one(out, src, skipped, old_records.get(src.key), seed)
            if planned is None:
                continue
            if isinstance(planned, dict):
                records[src.key] = planned
                reused += 1
                old = old_records[src.key]
                if "feature" in planned and old.get("feature") != planned["feature"]:
                    log = log or stack.enter_context(open(out / STATE_NAME, "a", encoding="utf-8"))
                    log.write(json.dumps(planned, sort_keys=True, ensure_ascii=False) + "\n")
                    log.flush()
            else:
                todo.append(planned)
    return records, todo, reused


def _plan_one(
    out: Path, src: Source, skipped: list[tuple[str, str]], old: dict[str, Any] | None, seed: int
) -> dict[str, Any] | Job | None:
    """One source's plan: its reused record, its job, or None (skipped, and said why)."""
    try:
        st = src.path.stat()
    except FileNotFoundError:
        skipped.append((src.key, "file not found"))
        return None
    except OSError as exc:
        skipped.append((src.key, f"cannot read ({exc.strerror or first_line(exc)})"))
        return None
    if not src.path.is_file():
        skipped.append((src.key, "not a regular file"))
        return None
    name = feature_name(src.key, seed)
    base = {"source": src.key, "speaker": src.speaker, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    if old is not None and old.get("size") == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
        if "skip" in old:
            return {**base, "skip": old["skip"]}
        if _reuse_feature(out, old, name):
            return {**base, "feature": name, "mel_len": old["mel_len"], "bytes": old["bytes"]}
    return (src, name, base)


def _speakers(
    source_path: Path,
    sources: list[Source],
    records: dict[str, dict[str, Any]],
    skipped: list[tuple[str, str]],
    min_utterances: int,
) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    """Each speaker's usable utterances, and the speakers kept (sorted); refuses a set of fewer than two."""
    usable: dict[str, list[dict[str, Any]]] = {}
    for src in sources:
        usable.setdefault(src.speaker, [])
        found = records.get(src.key)
        if found is not None and "feature" in found:
            usable[src.speaker].append(found)
    kept = sorted(s for s, recs in usable.items() if len(recs) >= min_utterances)
    if len(kept) >= 2:
        return usable, kept
    n_usable = sum(len(recs) for recs in usable.values())
    keys = {src.key for src in sources}
    bad = [(key, why) for key, why in skipped if key in keys]  # not the other formats listing skipped
    example = f"; e.g. {bad[0][0]}: {bad[0][1]}" if bad else ""
    if not kept:
        raise UserError(
            f"{source_path}: no speaker has {min_utterances} usable utterances ({n_usable} of "
            f"{len(sources)} .wav/.flac files usable{example}); nothing was written"
        )
    raise UserError(  # prepare() refused a list of one speaker: the others had too few usable files
        f"{source_path}: only one speaker ('{kept[0]}') has {min_utterances} usable utterances, and speaker "
        f"identification needs two; {len(usable) - 1} other speaker(s) had too few usable files ({n_usable} "
        f"of {len(sources)} files usable{example}); nothing was written"
    )


def _restore_index(out: Path, old_index: dict[str, str | None], rewritten: set[str]) -> bool:
    """Put back the index a run removed and then did not replace (refused, stopped, a full disk), when
    every feature file it names is still there and none was due to be written again: a failed re-run
    had left a usable set without its index, and pruned its features. Whether it was put back."""
    texts = {name: text for name, text in old_index.items() if text is not None}
    try:
        named = {
            entry["feature_path"]
            for entries in json.loads(texts["metadata.json"])["speakers"].values()
            for entry in entries
        }
        named |= {entry["feature_path"] for entry in json.loads(texts["testdata.json"])["utterances"]}
    except (KeyError, TypeError, ValueError):  # none, or not one this module wrote
        return False
    if named & rewritten or not all((out / name).is_file() for name in named):
        return False
    try:
        for name, text in texts.items():
            _write_atomic(out / name, text)
    except OSError:  # a full disk, say: what stopped the run is what the user is told
        return False
    return True


def _read_text(path: Path) -> str | None:
    """``path``'s text, or None when it is missing or unreadable (a first or interrupted run)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _reuse_feature(out: Path, old: dict[str, Any], name: str) -> bool:
    """True when the recorded feature file is there intact (renamed to ``name`` if the seed changed).

    Only the recorded file counts: a file already under ``name`` may hold an older decoding of the
    source (a stopped run with another seed recorded new names, and the old-seed files stayed).
    """
    nbytes, mel_len = old.get("bytes"), old.get("mel_len")
    if not isinstance(nbytes, int) or not isinstance(mel_len, int) or not isinstance(old.get("feature"), str):
        return False
    target = out / name
    if old["feature"] == name:
        try:
            return target.stat().st_size == nbytes
        except OSError:
            return False
    previous = out / old["feature"]
    if not FEATURE_RE.match(old["feature"]):
        return False
    try:
        if previous.stat().st_size != nbytes:
            return False
        os.replace(previous, target)
    except OSError:
        return False
    return True


def _process(
    todo: list[Job],
    out: Path,
    workers: int,
    progress: bool,
    source_path: Path,
    records: dict[str, dict[str, Any]],
    log: IO[str],
) -> None:
    """Run the extraction and append each result to the state file as soon as it is known."""

    def on_result(job: Job, result: Result) -> None:
        src, name, base = job
        status, mel_len, nbytes, reason = result
        if status == "error":
            raise UserError(f"{reason}; check free space and permissions (finished files are kept)")
        if status == "ok":
            rec = {**base, "feature": name, "mel_len": mel_len, "bytes": nbytes}
        else:
            rec = {**base, "skip": reason}
        records[src.key] = rec
        log.write(json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n")
        log.flush()

    _run(todo, out, workers, progress, f"prepare {source_path.name or source_path}", on_result)


def _prune(out: Path, expected: set[str] | None) -> None:
    """Remove temp files and feature files no current source produces (a removed file, an old seed);
    ``expected`` None: temp files only."""
    for name in os.listdir(out):
        stale = expected is not None and FEATURE_RE.match(name) is not None and name not in expected
        if stale or name.startswith(TEMP_PREFIX):
            with contextlib.suppress(OSError):
                (out / name).unlink()
