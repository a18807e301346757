"""The search service's driver: create or resume an Optuna study on SQL storage and run its workers.

:func:`run` checks the space, the data and the storage, records what the study compares its trials on
(data set, split, space, step budget), starts one worker process per GPU (or ``--workers`` CPU
processes; see :mod:`search.worker`) and waits until the study holds its budget of finished trials,
showing progress through ``on_update``.

Faults the service rides out: a worker killed by a signal is restarted by the driver (a bounded number
of times) while the budget is not met; a database that goes away (a PostgreSQL restart, a busy SQLite
file) is waited for with exponential backoff for at most ``storage_patience`` seconds, after which the
worker stops with one line saying so; a trial whose result could not be recorded during the outage
goes stale and is retried from its checkpoint like a killed one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import optuna

from search.errors import UserError
from search.files import atomic_write, require_data_dir
from search.progress import note
from search.states import clear_state_lock, requeue_stopped, serialize_state_changes, state_lock
from search.stops import stops_deferred
from search.storage import GRACE_BEATS, STORAGE_PATIENCE, StorageWait
from search.supervise import (
    OutageLog,
    exit_text,
    run_status_dir,
    start_worker_server,
    supervise,
)
from search.trials import Counts, count_trials
from search.worker import DISK_FULL_EXIT, WorkerSpec, read_status

if TYPE_CHECKING:
    from search.data import PackedData, Split
    from search.space import Space

DEFAULT_HEARTBEAT = 20
MAX_TRIALS = 100_000
MAX_STEPS = 10_000_000
MAX_WORKERS = 64
DEFAULT_PER_GPU = 4  # measured (bench/RESULTS.md): 1.5x one trial's steps/s at steady state (H200, H100),
# 2.4-2.9x one trial per GPU through run on short trials (H100); K = 8 no more at steady state


IDENTITY = {"fingerprint": "data set", "split_id": "train/valid split", "space_digest": "search space"}


def _steps_text(steps: int | None) -> str:
    return "the space's own steps (no --steps)" if steps is None else f"--steps {steps}"


def identity_changes(study: optuna.Study, attrs: dict[str, Any], allow_changed: bool) -> dict[str, Any]:
    """The user attrs this run must record: all of them on a new study, the changed ones on an old one.

    A study compares trials trained on one data set, split, space and step budget; another of any of
    them is refused unless ``allow_changed``. A study from before ``steps_override`` was recorded ran
    with no ``--steps`` override (None).
    """
    current = study.user_attrs
    if not current.get("fingerprint"):
        return dict(attrs)
    if not allow_changed:
        for key, label in IDENTITY.items():
            if current.get(key) != attrs.get(key):
                where = {
                    "fingerprint": f" in {current.get('data_root', '?')}",
                    "space_digest": f" from {current.get('space_path', '?')}",
                }.get(key, "")
                what = f"{key} {current.get(key)}{where}, now {attrs.get(key)}"
                changed = ""
                if key == "space_digest" and current.get("space_body") and attrs.get("space_body"):
                    from search.space import space_changes

                    changed = space_changes(current["space_body"], attrs["space_body"])
                if changed:  # a study recorded since the space's body is: say what changed, not two hashes
                    # Both files when they differ: the recorded one alone read as if it had been edited.
                    old_path, new_path = current.get("space_path", "?"), attrs.get("space_path")
                    what = f"{old_path if old_path == new_path else f'{old_path} -> {new_path}'}: {changed}"
                raise UserError(
                    f"study '{study.study_name}' was run with another {label} ({what}); use a new --study "
                    "name, or --allow-changed to continue anyway"
                )
        old, new = current.get("steps_override"), attrs.get("steps_override")
        if old != new:
            raise UserError(
                f"--steps: study '{study.study_name}' was run with {_steps_text(old)}, this run asks "
                f"for {_steps_text(new)}; use the same value, a new --study name, or --allow-changed "
                "to mix training budgets anyway"
            )
        old, new = current.get("pruner"), attrs.get("pruner")
        if old is not None and old != new:  # a study from before the pruner was recorded records it now
            raise UserError(
                f"study '{study.study_name}' was run with pruner {old}, this run's space has {new}: pruned "
                "and full-budget trials would be ranked together; use the same pruner, a new --study name, "
                "or --allow-changed to go on anyway"
            )
    # The study goes on with the new values: workers split the new data set by the recorded ratio and
    # seed, and export-top validates on it (each trial records the data set it trained on).
    keys = (
        *IDENTITY,
        "valid_ratio",
        "split_seed",
        "space_path",
        "space_body",
        "data_root",
        "steps_override",
        "pruner",
        "index_digest",
    )
    return {key: attrs.get(key) for key in keys if current.get(key) != attrs.get(key)}


def _distribution_text(d: optuna.distributions.BaseDistribution) -> str:
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return f"choices {list(d.choices)}"
    kind = "integer" if isinstance(d, optuna.distributions.IntDistribution) else "float"
    return f"a {'log-scale' if getattr(d, 'log', False) else 'linear'} {kind} range"


def check_space_fits_study(study: optuna.Study, space: Space) -> None:
    """Refuse a changed space that Optuna cannot record beside the study's trials (before any trial).

    Why: Optuna keeps one distribution per parameter name in a study; other choices for a categorical,
    another kind or another log setting fail every new trial with "dynamic value space". Numeric
    ranges may change.
    """
    new = {param.name: param.distribution for param in space.params}
    for trial in study.get_trials(deepcopy=False):
        for name, old in trial.distributions.items():
            if name not in new:
                continue
            try:
                optuna.distributions.check_distribution_compatibility(old, new[name])
            except ValueError:
                raise UserError(
                    f"{space.path}: '{name}' was searched with {_distribution_text(old)} in study "
                    f"'{study.study_name}', this space has {_distribution_text(new[name])}; one study "
                    "cannot hold both (only numeric ranges may change): use a new --study name"
                ) from None


def effective_steps(space: Space, steps: int | None) -> int | None:
    """``--steps`` as the trials see it: None when it changes nothing (the space fixes that very budget).

    So ``--steps 200`` on a space whose steps are 200 is not refused as another budget.
    """
    if steps is None:
        return None
    base = space.config_for({}).train
    if not space.searched & {"steps", "valid_steps"} and base.steps == steps and base.valid_steps <= steps:
        return None
    return steps


def nothing_to_do(name: str, finished: int, trials: int) -> str:
    """The line shown instead of starting workers that would each stop at once."""
    held = f"{finished} finished trial{'' if finished == 1 else 's'}"
    return (
        f"study '{name}' already has {held} (>= --trials {trials}); nothing to do: raise --trials to run more"
    )


@dataclass
class RunOptions:
    space: str
    trials: int
    data: Path | None = None
    study: str | None = None
    storage: str | None = None
    gpus: list[int] | None = None
    per_gpu: int | None = None  # trials at once per GPU (None: DEFAULT_PER_GPU); no effect without GPUs
    workers: int | None = None  # CPU worker processes (None: 1); no effect when GPUs are used
    steps: int | None = None
    seed: int | None = None  # added to the space's sampler seed; None and no space seed: unseeded
    allow_changed: bool = False
    heartbeat: int | None = None
    max_failures: int | None = None
    display: bool = True
    # Restarts of signal-killed workers in a row, with no trial finishing in between (default 5 per worker).
    max_respawns: int | None = None
    storage_patience: float = STORAGE_PATIENCE
    lanes: int | None = None  # trials per worker process, as threads (default: per_gpu on a GPU, 1 on CPU)

    @property
    def failure_limit(self) -> int:
        """--max-failures, by default the trial budget (at least 3): failed trials that end the run."""
        return self.max_failures or max(self.trials, 3)


def plan_devices(opts: RunOptions) -> tuple[list[str], int]:
    """The workers' devices (one process per GPU, or ``workers`` CPU processes) and trials per worker.

    On a GPU the ``per_gpu`` trials are threads of one process (see :func:`search.worker.worker_main`);
    CPU workers run one trial each, as separate processes, since threads would only share the same cores.
    """
    from search.devices import visible_gpus

    visible = visible_gpus()
    gpus = visible if opts.gpus is None else opts.gpus
    for g in gpus:
        if g not in visible:
            raise UserError(f"--gpus: GPU {g} is not visible here (visible: {visible or 'none'})")
    if gpus:
        if opts.workers is not None:
            note(f"--workers {opts.workers} has no effect with GPUs: --per-gpu sets the trials per GPU")
        return [f"cuda:{g}" for g in gpus], opts.lanes or opts.per_gpu or DEFAULT_PER_GPU
    if opts.per_gpu is not None:
        note(f"no GPU visible: --per-gpu {opts.per_gpu} has no effect; --workers N runs N CPU trials at once")
    return ["cpu"] * (opts.workers or 1), opts.lanes or 1


def _recorded_data_root(url: str, name: str) -> Path | None:
    """The data folder an existing study was run on, for a run without ``--data`` (None: a new study).

    Why: resuming a study on the real set without repeating ``--data`` would otherwise generate the
    default synthetic set, only to refuse it as another data set.
    """
    from search.storage import open_storage, sqlite_file, study_names

    db = sqlite_file(url)
    if db is not None and not db.is_file():
        return None  # no database yet: a new study (and no file is created just to look)
    storage = open_storage(url)
    try:
        if name not in study_names(storage):
            return None
        recorded = optuna.load_study(study_name=name, storage=storage).user_attrs.get("data_root")
    finally:
        storage.engine.dispose()
    if not recorded:
        return None
    root = Path(recorded)
    if not root.is_dir():
        raise UserError(
            f"--data: study '{name}' was run on {root}, which is not there any more; give --data with "
            "the same data set (or a new --study name)"
        )
    note(f"No --data given: using the data set study '{name}' was run on, {root}")
    return root


def _may_compile(space: Space) -> bool:
    """Whether any trial of ``space`` may run with ``compile: true``."""
    return (
        bool(space.fixed.get("compile"))
        or any(p.name == "compile" for p in space.params)
        or any(e.get("compile") for e in space.enqueue)
    )


def run(
    opts: RunOptions,
    on_update: Callable[[optuna.Study, Counts, list[dict[str, Any]]], None] | None = None,
    on_nothing: Callable[[str], None] | None = None,
) -> Counts:
    """Create or resume the study, start the workers, and wait until the budget is met.

    A study that already holds ``opts.trials`` finished trials starts no worker: ``on_nothing`` (default:
    a line on stderr) gets the line that says so, and the counts come back as they are.

    A worker killed by a signal (SIGKILL, the OOM killer) while the budget is not met is started again,
    at most ``max_respawns`` times in a row without a trial finishing
    (:class:`search.supervise.RestartBudget`); its
    trial is failed and retried from its checkpoint.
    """
    try:
        with contextlib.ExitStack() as closing:
            return _run(opts, on_update, on_nothing, closing)
    finally:
        clear_state_lock()  # this study's: a later run in this process (a test, a library) gets its own


def _run(
    opts: RunOptions,
    on_update: Callable[[optuna.Study, Counts, list[dict[str, Any]]], None] | None,
    on_nothing: Callable[[str], None] | None,
    closing: contextlib.ExitStack,
) -> Counts:
    from search.space import load_space
    from search.storage import (
        artifact_dir,
        check_server,
        check_storage_url,
        check_study_name,
        default_storage_url,
        open_storage,
        study_dir,
        study_home,
        trials_dir,
    )

    space = load_space(opts.space)
    try:
        name = check_study_name(space.name if opts.study is None else opts.study)
    except UserError as exc:
        if opts.study is not None:
            raise
        named = "key 'name'" if "name" in space.raw else "its file name (no 'name' key)"
        raise UserError(f"{space.path}: {named} names the study without --study: {exc}") from None
    url = opts.storage or default_storage_url(name)
    check_storage_url(url)  # its form now; connecting (and creating a SQLite file) once the data is good
    _check_budget(opts)
    if opts.study is None and opts.storage is not None:
        _check_default_study(url, name)
    done = _already_done(url, name, opts.trials)
    if done is not None:
        if opts.data is not None:  # a typo is said even when the study needs no more trials
            require_data_dir(Path(opts.data))
        (on_nothing or note)(nothing_to_do(name, done.finished, opts.trials))
        return done
    check_server(url)  # a server that does not answer: said now, not after the data set is packed
    for text in space.notes:  # before any trial: what may fail them
        note(f"note: {text}")
    start_worker_server()  # it imports torch for the workers while the driver does so and opens the data
    devices, lanes = _check_run(opts, space)
    heartbeat = opts.heartbeat or int(space.study.get("heartbeat_interval", DEFAULT_HEARTBEAT))
    grace = int(space.study.get("grace_period", GRACE_BEATS * heartbeat))
    # torch: after the checks that need none; the model too, as the workers will: a broken install
    # (search.errors.broken_install) fails here, in one line, not in every worker
    from search import model  # noqa: F401
    from search.data import make_split, open_data, unvalidated_note

    data_root = opts.data if opts.data is not None else _recorded_data_root(url, name)
    if data_root is None:  # a new study without --data
        from search.synth import default_set

        data_root = default_set(opts.display)
    data = open_data(data_root, progress=opts.display)
    base = space.config_for({})
    split = make_split(data, base.train.valid_ratio, base.train.split_seed)
    if lone := unvalidated_note(data):
        note(f"note: {lone}")
    storage = open_storage(url, heartbeat, grace)
    # Closed as the run ends: SQLite folds its write-ahead log back into study.db only when the last
    # connection closes, and the command's exit does not close them (it skips the final collection).
    # study.db alone, copied or backed up after a run, lacked its trials.
    closing.callback(_close, storage)
    # The driver fails a killed worker's trials: under the workers' state lock.
    serialize_state_changes(storage, url)
    home = study_dir(name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Created, checked and recorded as one step among the runs sharing the storage: a second machine
    # starting at the same moment read a half-written identity and refused the study ("another search
    # space", "--steps ... with the space's own steps"), seen in 2 of 7 simultaneous starts.
    with state_lock():
        study = optuna.create_study(
            study_name=name, storage=storage, direction="maximize", load_if_exists=True
        )
        fresh = not study.user_attrs.get("fingerprint")
        held = count_trials(study.get_trials(deepcopy=False))
        if not fresh and held.finished >= opts.trials:
            # Workers would each stop at once and nothing is recorded: another data set, space or --steps
            # here changes nothing, so it is not refused either.
            (on_nothing or note)(nothing_to_do(name, held.finished, opts.trials))
            return held
        steps = _record_identity(study, space, data, split, home, opts, fresh)
    requeue_stopped(study, opts.trials)  # before the sweep: a stopped trial's folder is its resume point
    _sweep_leftovers(study, trials_dir(study), artifact_dir(study))
    status_dir = run_status_dir(home)
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if devices[0] == "cpu" else 2
    specs = [
        WorkerSpec(
            worker=f"w{i}",
            device=dev,
            storage_url=url,
            study_name=name,
            space_path=str(space.path),
            cache_dir=str(data.cache_dir),
            data_root=str(data.root),
            trials=opts.trials,
            steps=steps,
            seed=opts.seed,
            heartbeat=heartbeat,
            grace=grace,
            status_dir=str(status_dir),
            threads=threads,
            max_failures=opts.failure_limit,
            lanes=lanes,
            storage_patience=opts.storage_patience,
        )
        for i, dev in enumerate(devices)
    ]
    outage = OutageLog(opts.storage_patience)
    exits, respawns = supervise(specs, study, opts.trials, opts.max_respawns, status_dir, outage, on_update)
    errors = [s.get("error") for s in read_status(status_dir) if s.get("error")]
    if errors:
        raise UserError(str(errors[0]))
    wait = StorageWait(url, opts.storage_patience, on_wait=outage.lost)
    counts = wait.call(lambda: count_trials(study.get_trials(deepcopy=False)))
    # Again now: a finished study is not run again, so what this run's killed workers left (a trial
    # killed on each of its retries keeps its checkpoints) would stay for the life of the study.
    wait.call(lambda: _sweep_leftovers(study, trials_dir(study), artifact_dir(study)))
    if on_update is not None:  # the display's last frame shows how the run ended, not its last poll
        on_update(study, counts, read_status(status_dir))
    _check_ended(study.study_name, opts, counts, exits, respawns, status_dir, study_home(study))
    return counts


def _close(storage: Any) -> None:
    """Close the run's connections; a stop that comes meanwhile is dropped, not raised.

    Why: closing runs as the run ends, also while its first stop (WorkersStopped) unwinds; a second
    Ctrl-C there interrupted SQLite's close (a SQLAlchemy traceback) and replaced that stop, so the
    command said no trial had been running.
    """
    with contextlib.suppress(KeyboardInterrupt), stops_deferred():
        storage.engine.dispose()


def _record_identity(
    study: optuna.Study,
    space: Space,
    data: PackedData,
    split: Split,
    home: Path,
    opts: RunOptions,
    fresh: bool,
) -> int | None:
    """Check this run's data set, split, space and budget against the study's record and record them
    (all of them on a new study, which also gets the space's enqueued trials); the steps the trials get.

    The caller holds the state lock: create, check and record are one step among the runs sharing the
    storage.
    """
    name = study.study_name
    steps = effective_steps(space, opts.steps)  # what the study records is what reaches the trials
    changes = identity_changes(
        study,
        {
            "fingerprint": data.fingerprint,
            "index_digest": data.index_digest,
            "split_id": split.split_id,
            "valid_ratio": split.ratio,
            "split_seed": split.seed,
            "space_digest": space.digest,
            "space_body": space.body,
            "space_path": str(Path(space.path).resolve()),
            "space_name": space.name,
            "data_root": str(Path(data.root).resolve()),
            "home_dir": str(home.resolve()),
            "artifact_dir": str((home / "artifacts").resolve()),
            "trials_dir": str(
                (home / "trials").resolve()
            ),  # read by older versions only: see storage.trials_dir
            "steps_override": steps,
            "pruner": json.dumps(space.pruner, sort_keys=True),
        },
        opts.allow_changed,
    )
    changes.update(_check_study_folder(study, home, fresh, opts.allow_changed))
    if "space_digest" in changes and not fresh:
        check_space_fits_study(study, space)
    if not fresh and "fingerprint" in changes:  # --allow-changed on another data set
        note(
            f"note: study '{name}' goes on with the data set in {data.root} (it was run on "
            f"{study.user_attrs.get('data_root', '?')}); its earlier trials stay in its results, "
            "marked in status, and export-top leaves them out"
        )
    for key, value in changes.items():
        study.set_user_attr(key, value)
    if fresh:
        for params in space.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
    return steps


TEMP_AGE_S = 3600  # a checkpoint's temp file untouched this long has lost its writer


def _sweep_leftovers(study: optuna.Study, trials: Path, artifacts: Path) -> None:
    """Remove what killed workers left behind: the folders of trials that will not run again, and temp
    files no writer has touched for an hour.

    Why: a worker only empties its trial's folder itself. A trial killed on each of its retries (a
    config too big for the host's memory) failed for good with its ``last.pt`` and ``best.pt`` kept, and
    a worker killed while writing a checkpoint left its temp file, both for the life of the study: up to
    hundreds of MB each for the boss space, over a run of days.
    """
    from search.trials import ended_roots

    if trials.is_dir():
        with state_lock():  # a trial's FAIL and its retry's queueing are one step under it
            ended = ended_roots(study.get_trials(deepcopy=False))
        for folder in trials.iterdir():  # only the names workers give them (attempt_folder): 00042
            if re.fullmatch(r"\d{5,}", folder.name) and int(folder.name) in ended:
                shutil.rmtree(folder, ignore_errors=True)
    cutoff = time.time() - TEMP_AGE_S
    for tmp in [
        *trials.glob("*/*/.*.tmp"),
        *trials.glob("*/.*.tmp"),
        *artifacts.glob(".*.tmp"),
    ]:
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()


FOLDER_MARK = ".study-mark"  # in the study's folder: the study's random id (user attr "folder_mark")


def _check_study_folder(study: optuna.Study, home: Path, fresh: bool, allow_changed: bool) -> dict[str, str]:
    """Refuse a run that does not see the folder the study keeps its checkpoints in; the attrs to
    record when ``allow_changed`` moves it to this run's ``home``.

    Why: a second machine on the same PostgreSQL study that did not mount the shared studies folder
    had its workers create the recorded folder locally, train their trials there and end well;
    export-top on the first machine then found their checkpoints missing. The study records a random
    mark, and its folder (as recorded by its first run: every worker writes there) holds the same mark.
    A study from before the mark gets one now, where its folder is.
    """
    from search.storage import study_home

    name = study.study_name
    folder = home if fresh else study_home(study)
    recorded = None if fresh else study.user_attrs.get("folder_mark")
    try:
        found: str | None = (folder / FOLDER_MARK).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        found = None
    if fresh:
        if _holds_checkpoints(folder):  # a new trial 0 would even resume from the other's trials/00000
            raise UserError(
                f"{folder}: holds the checkpoints of another study named '{name}' (a study of another "
                "storage, or one whose database was deleted): use another --study name, or move that "
                "folder away"
            )
        _write_mark(study, folder, None)  # a leftover folder with nothing in it is this study's now
        return {}
    if recorded is not None and found == recorded:
        return {}
    if recorded is None and found is None and (folder.is_dir() or folder.resolve() == home.resolve()):
        _write_mark(study, folder, None)  # a study from before the mark (its folder made now if need be)
        return {}
    if not allow_changed:  # not seen here, or another study's
        what = (
            f"has another study's {FOLDER_MARK} (another storage's study of this name?)"
            if found is not None
            else f"has no {FOLDER_MARK}, so this machine does not see the folder"
            if folder.is_dir()
            else "not found, so this machine does not see the folder"
        )
        raise UserError(
            f"{folder}: {what} study '{name}' keeps its checkpoints in: mount the shared studies folder at "
            f"{folder.parent} here, or export-top will not find this machine's checkpoints; if that folder "
            f"is lost, pass --allow-changed to keep them in {home} from now on"
        )
    if folder.resolve() != home.resolve():
        note(
            f"note: study '{name}' keeps its checkpoints in {home} from now on ({folder} is not seen here); "
            "runs on other machines must see that folder at the same path"
        )
    _write_mark(study, home, recorded)
    return {
        "home_dir": str(home.resolve()),
        "artifact_dir": str((home / "artifacts").resolve()),
        "trials_dir": str((home / "trials").resolve()),  # read by older versions only: see storage.trials_dir
    }


def _write_mark(study: optuna.Study, folder: Path, recorded: str | None) -> None:
    """Write the study's mark (a new one, then recorded, when it has none) into ``folder``."""
    mark = recorded or uuid.uuid4().hex
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_write(folder / FOLDER_MARK, text=True) as fh:
            fh.write(mark + "\n")
    except OSError as exc:
        raise UserError(
            f"{folder}: cannot write the study's {FOLDER_MARK} ({exc.strerror or exc}); its checkpoints go "
            "there: check the folder's permissions and free space"
        ) from None
    if recorded is None:
        study.set_user_attr("folder_mark", mark)


def _holds_checkpoints(folder: Path) -> bool:
    """Whether a study folder holds a checkpoint or a trial's folder (a leftover empty folder does not)."""
    return any(
        not entry.name.startswith(".")
        for sub in ("artifacts", "trials")
        if (folder / sub).is_dir()
        for entry in (folder / sub).iterdir()
    )


def _check_ended(
    name: str,
    opts: RunOptions,
    counts: Counts,
    exits: dict[str, int | None],
    respawns: int,
    status_dir: Path,
    home: Path,
) -> None:
    """A run that ended short of ``opts.trials`` says why, in one line: a full disk, --max-failures, or
    workers that exited with an error."""
    if counts.finished < opts.trials and DISK_FULL_EXIT in exits.values():
        # The worker's own words name the file (best effort: its status file is on a full disk too).
        said = [str(s["disk_full"]) for s in read_status(status_dir) if s.get("disk_full")]
        where = f"({said[0]})" if said else f"for its files in {home.resolve()}"
        raise UserError(
            f"study '{name}' stopped at {counts.finished} of {opts.trials} finished trials: no space left on "
            f"device {where}; free space and run the same command again: the trials it cut off resume from "
            "their last checkpoints"
        )
    max_failures = opts.failure_limit
    if counts.finished < opts.trials and counts.failed >= max_failures:
        raise UserError(
            f"study '{name}' stopped at {counts.finished} of {opts.trials} finished trials after "
            f"{counts.failed} failed ones (--max-failures {max_failures}); 'spkid-search status' shows "
            "why they failed: fix that, or raise --max-failures, and run the same command again"
        )
    broken = {w: code for w, code in exits.items() if code != 0}
    if counts.finished < opts.trials and broken:
        what = ", ".join(f"worker {w} {exit_text(code)}" for w, code in sorted(broken.items()))
        raise UserError(
            f"study '{name}' holds {counts.finished} of {opts.trials} finished trials: {what} "
            f"({respawns} restarts used); fix the cause and run the same command again to resume"
        )


T = TypeVar("T")


def _peek(url: str, look: Callable[[Any], T]) -> T | None:
    """``look(storage)`` on an existing storage, or None when there is none or anything goes wrong.

    Why: run's quick checks answer before the fork server starts and torch is imported. They only read,
    and only what is there (no SQLite file is created); anything unexpected (no study yet, a storage
    that does not answer) is left to the full path, which reports it in its order.
    """
    from search.storage import holds_studies, open_storage

    if not holds_studies(url):
        return None
    try:
        storage = open_storage(url, must_exist=True)
    except Exception:  # noqa: BLE001 - see above: the full path says what it is
        return None
    try:
        return look(storage)
    except Exception:  # noqa: BLE001 - no such study (KeyError), or the storage failed
        return None
    finally:
        storage.engine.dispose()  # a run that goes on opens its own; this one must not hold a connection


def _already_done(url: str, name: str, trials: int) -> Counts | None:
    """The counts of a study that exists and already holds ``trials`` finished trials, else None.

    Why: re-running the command of a finished study is how users check on it; answered before the fork
    server starts and torch is imported (:func:`_peek`), it takes a fraction of a second, not seconds.
    """

    def counts(storage: Any) -> Counts | None:
        study_id = storage.get_study_id_from_name(name)
        if not storage.get_study_user_attrs(study_id).get("fingerprint"):  # created, never run
            return None
        return count_trials(storage.get_all_trials(study_id, deepcopy=False))

    found = _peek(url, counts)
    return found if found is not None and found.finished >= trials else None


def _check_default_study(url: str, name: str) -> None:
    """Refuse to start the space-named study beside other studies in a given --storage.

    Why: ``status``, ``export-top`` and ``dashboard`` take a storage's only study when no --study is
    given, so a user resuming "by storage" would expect ``run`` to as well; it names its study after
    the space instead, and would silently start a second study (with its own trials and checkpoints)
    beside the one meant.
    """
    from search.storage import mask_url, study_names

    names = _peek(url, study_names) or []
    if names and name not in names:
        held = ", ".join(f"'{n}'" for n in sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
        raise UserError(
            f"--storage {mask_url(url)}: holds {held} but no study '{name}' (without --study, run names its "
            f"study after the space); pass --study {sorted(names)[0] if len(names) == 1 else 'NAME'} to "
            f"resume one, or --study {name} to start a new study there"
        )


def _check_budget(opts: RunOptions) -> None:
    if opts.trials > MAX_TRIALS:
        raise UserError(f"--trials {opts.trials}: absurdly many; use at most {MAX_TRIALS}")
    if opts.steps is not None and opts.steps > MAX_STEPS:
        raise UserError(f"--steps {opts.steps}: absurdly many; use at most {MAX_STEPS:,}")


def _check_run(opts: RunOptions, space: Space) -> tuple[list[str], int]:
    """The workers' limits, before anything is opened: the devices and lanes to use."""
    devices, lanes = plan_devices(opts)
    if len(devices) * lanes > MAX_WORKERS:
        asked = (
            f"{len(devices)} workers requested (--workers {len(devices)})"
            if devices[0] == "cpu" and lanes == 1
            else f"{len(devices) * lanes} trials at once requested (--per-gpu {lanes} on {len(devices)} GPUs)"
        )
        raise UserError(f"{asked}; at most {MAX_WORKERS} per machine")
    if lanes > 1 and _may_compile(space):
        raise UserError(
            f"{space.path}: 'compile' cannot run with --per-gpu {lanes}: torch.compile is not safe in the "
            "threads that share a GPU's trials; use --per-gpu 1, or take compile out of the space"
        )
    steps = opts.steps or space.longest_steps
    if devices[0] == "cpu" and steps >= CPU_NOTE_STEPS:
        note(
            f"note: no GPU: trials of up to {steps:,} steps on the CPU take hours each; for a CPU, "
            "--space smoke, or --steps N for shorter trials"
        )
    return devices, lanes


# Trials this long on a CPU say so before they start: the boss space (70,000 steps) printed nothing
# else for minutes, and ran at 20-90 steps/s there (hours a trial).
CPU_NOTE_STEPS = 10_000
