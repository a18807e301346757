"""The search service: an Optuna study on SQL storage driven by worker processes (one per GPU or CPU slot).

Each worker runs one or more lanes (threads; on a GPU ``--per-gpu`` of them, so trials overlap their
kernels), and each lane loops: fail stale trials (a SIGKILLed worker's trials are retried through
Optuna's heartbeat callback), check the study-wide budget, run one trial through
:func:`search.train.train`.
A trial's folder is keyed by its *original* number, so a retried trial resumes from the ``last.pt``
its killed predecessor wrote. The best checkpoint goes to the study's artifact store.

Faults the service rides out: a worker killed by a signal is restarted by the driver (a bounded number
of times) while the budget is not met; a database that goes away (a PostgreSQL restart, a busy SQLite
file) is waited for with exponential backoff for at most ``storage_patience`` seconds, after which the
worker stops with one line saying so; a trial whose result could not be recorded during the outage
goes stale and is retried from its checkpoint like a killed one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing as mp
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import optuna
from optuna.artifacts import upload_artifact
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from search.errors import UserError
from search.files import sha256_file

if TYPE_CHECKING:
    from search.space import Space

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DEFAULT_HEARTBEAT = 20
STORAGE_PATIENCE = 300.0  # seconds a worker waits for an unreachable storage before it gives up
MAX_TRIALS = 100_000
MAX_STEPS = 10_000_000
MAX_WORKERS = 64
DEFAULT_PER_GPU = 4  # measured: 1.5x one trial's throughput on an H200; 8 no more (bench/RESULTS.md)
T = TypeVar("T")


class SkipTrial(Exception):
    """This trial must not run: its study's budget is held (a safety net behind :func:`limit_new_trials`,
    and the only check on storages without a state lock), or it retries a trial already done."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, as plain values (it is pickled into a spawned process)."""

    worker: str
    index: int
    device: str
    storage_url: str
    study_name: str
    space_path: str
    cache_dir: str
    data_root: str
    trials: int
    steps: int | None
    seed: int
    heartbeat: int
    grace: int
    status_dir: str
    threads: int
    max_failures: int
    lanes: int = 1  # trials at once in this process, as threads (see worker_main)
    poll: float = 1.0
    storage_patience: float = STORAGE_PATIENCE


# --------------------------------------------------------------------------------------------------
# Counting and study metadata
# --------------------------------------------------------------------------------------------------


@dataclass
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    skipped: int = 0
    retried: int = 0  # FAIL trials queued again (killed, interrupted, cut off by an outage): not failures

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def holding(self) -> int:
        """Trials that will end finished unless they fail: the budget they already claim."""
        return self.finished + self.running + self.waiting


def is_skipped(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get("skipped"))


def count_trials(trials: list[FrozenTrial]) -> Counts:
    """Trials by state; a FAIL trial that was queued again counts as retried, not as failed.

    Only real failures (a bad configuration, divergence, out of memory, a checkpoint that could not be
    stored) count toward ``--max-failures``: a study stopped twice with Ctrl-C must still resume.
    """
    requeued = {n for t in trials for n in (t.system_attrs.get("retry_history") or [])}
    c = Counts()
    for t in trials:
        if t.state == TrialState.COMPLETE:
            c.complete += 1
        elif t.state == TrialState.PRUNED:
            c.pruned += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
        elif t.state == TrialState.FAIL:
            if is_skipped(t):
                c.skipped += 1
            elif t.number in requeued:
                c.retried += 1
            else:
                c.failed += 1
    return c


def _root(t: FrozenTrial) -> int:
    return int(t.system_attrs.get("failed_trial", t.number))


def held_before(trials: list[FrozenTrial], number: int) -> int:
    """Budget claimed by the trials begun before new trial ``number``, counted per original trial.

    A retry holds its original's place, whatever its own number: a retry queued (with a higher number)
    while trial ``number`` was being created still counts, and an original with a retry counts once.
    """
    holds: dict[int, bool] = {}
    for t in trials:
        root = _root(t)
        if t.number == number or root >= number:
            continue
        live = t.state in FINISHED or t.state in (TrialState.RUNNING, TrialState.WAITING)
        holds[root] = holds.get(root, False) or live
    return sum(holds.values())


def retry_is_redundant(trials: list[FrozenTrial], number: int, root: int) -> bool:
    """True when retry ``number`` of trial ``root`` must not run: the original (or another retry of it)
    finished, or an earlier retry of it is queued or running. Only one trial per original may finish."""
    for t in trials:
        if t.number == number or _root(t) != root:
            continue
        if t.state in FINISHED:
            return True
        if t.number < number and t.state in (TrialState.RUNNING, TrialState.WAITING):
            return True
    return False


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
                raise UserError(
                    f"study '{study.study_name}' was created with another {label} ({key} "
                    f"{current.get(key)}, now {attrs.get(key)}); use a new --study name, or --allow-changed "
                    "to continue anyway"
                )
        old, new = current.get("steps_override"), attrs.get("steps_override")
        if old != new:
            raise UserError(
                f"--steps: study '{study.study_name}' was run with {_steps_text(old)}, this run asks "
                f"for {_steps_text(new)}; use the same value, a new --study name, or --allow-changed "
                "to mix training budgets anyway"
            )
    keys = ("space_digest", "space_path", "data_root", "steps_override")
    return {key: attrs.get(key) for key in keys if current.get(key) != attrs.get(key)}


def effective_steps(space: Space, steps: int | None) -> int | None:
    """``--steps`` as the trials see it: None when it changes nothing (the space fixes that very budget).

    So ``--steps 200`` on a space whose steps are 200 is not refused as another budget.
    """
    if steps is None:
        return None
    searched = {param.name for param in space.params}
    base = space.config_for({}).train
    if not searched & {"steps", "valid_steps"} and base.steps == steps and base.valid_steps <= steps:
        return None
    return steps


def nothing_to_do(name: str, finished: int, trials: int) -> str:
    """The line shown instead of starting workers that would each stop at once."""
    held = f"{finished} finished trial{'' if finished == 1 else 's'}"
    return (
        f"study '{name}' already has {held} (>= --trials {trials}); nothing to do: raise --trials to run more"
    )


# --------------------------------------------------------------------------------------------------
# Riding out storage outages
# --------------------------------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    from search.storage import db_error_text

    return db_error_text(exc)


class StorageWait:
    """Bounded patience with an unreachable storage: retry with backoff, then give up with one line.

    ``call(fn, ...)`` retries ``fn`` while it fails for a transient reason (see
    :func:`search.storage.is_transient_db_error`), sleeping 0.5 s, 1 s, 2 s ... up to 8 s between tries,
    for at most ``patience`` seconds since the first failure of this outage; then it raises a
    :class:`UserError` naming the storage and what to do. Any other error is raised at once.
    """

    def __init__(
        self, url: str, patience: float, on_wait: Callable[[str, float], None] | None = None
    ) -> None:
        self.url = url
        self.patience = patience
        self.on_wait = on_wait
        self.since: float | None = None
        self.delay = 0.5

    def pause(self, exc: BaseException) -> None:
        """One failed attempt: sleep before the next, or raise when patience is spent."""
        from search.storage import mask_url

        now = time.monotonic()
        if self.since is None:
            self.since = now
        waited = now - self.since
        reason = _first_line(exc)
        if waited >= self.patience:
            raise UserError(
                f"storage {mask_url(self.url)} unreachable for {waited:.0f} s ({mask_url(reason)}); the "
                "study is kept as it was: run the same command again once the database answers"
            )
        if self.on_wait is not None:
            self.on_wait(reason, waited)
        time.sleep(min(self.delay, max(0.1, self.patience - waited)))
        self.delay = min(2 * self.delay, 8.0)

    def reset(self) -> None:
        self.since, self.delay = None, 0.5

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        from search.storage import is_transient_db_error

        while True:
            try:
                result = fn(*args)
            except Exception as exc:
                if not is_transient_db_error(exc):
                    raise
                self.pause(exc)
                continue
            self.reset()
            return result


Release = Callable[[], None]


class _StateLock:
    """A lock that the workers sharing one study hold while they change a trial's state.

    Optuna changes a trial's state by reading it, checking it is unfinished and writing the new one.
    PostgreSQL makes that atomic (``SELECT ... FOR UPDATE``); SQLite ignores ``FOR UPDATE`` and runs
    the read outside the write transaction, so a worker telling its trial COMPLETE and another failing
    it as stale at the same moment (a heartbeat late under heavy load) could *both* succeed: the trial
    ends COMPLETE and its retry, queued by the stale check, finishes too (one trial over the budget).
    Under this lock the second change finds the trial finished and is refused. It also makes a stale
    trial's FAIL and its retry's queueing one step to every budget count taken under it (between the
    two the trial's budget place would look free). ``acquire`` takes the lock among processes and
    machines (a lock file beside a SQLite database, an advisory lock in PostgreSQL) and returns what
    releases it; the lock is reentrant within a process, whose threads take turns.
    """

    def __init__(self, acquire: Callable[[], Release]) -> None:
        self._acquire = acquire
        self._mutex = threading.RLock()
        self._depth = 0
        self._release: Release | None = None

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        with self._mutex:
            if self._depth == 0:
                self._release = self._acquire()
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._release is not None:
                    release, self._release = self._release, None
                    release()


def _file_lock(path: Path) -> Callable[[], Release]:
    """``flock`` on a file: among the processes of one machine (a killed holder releases it too)."""

    def acquire() -> Release:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        return lambda: os.close(fd)  # closing releases the flock

    return acquire


# One key for every spkid-search study in a database: state changes are rare and brief.
PG_LOCK_KEY = int.from_bytes(hashlib.sha256(b"spkid-search trial states").digest()[:8], "big", signed=True)


def _pg_advisory_lock(engine: Any) -> Callable[[], Release]:
    """A PostgreSQL transaction-level advisory lock: among all machines sharing the database.

    Held by an open transaction on a connection of its own; ending the transaction, or losing the
    connection (a killed worker, a database restart), releases it.
    """
    import sqlalchemy

    def acquire() -> Release:
        conn = engine.connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})
        except BaseException:
            conn.invalidate()  # a wait cut short by a stop: drop the connection, and any queued request
            conn.close()
            raise

        def release() -> None:
            try:
                conn.rollback()  # ends the transaction, and the lock with it
            except Exception:  # noqa: BLE001 - a lost connection has released the lock already
                conn.invalidate()
            finally:
                conn.close()

        return release

    return acquire


_STATE_LOCK: dict[str, _StateLock] = {}  # the lock of this process's storage, once installed


def state_lock() -> contextlib.AbstractContextManager[None]:
    lock = _STATE_LOCK.get("lock")
    return lock.hold() if lock is not None else contextlib.nullcontext()


def serialize_state_changes(storage: Any, url: str) -> None:
    """Make ``storage``'s trial state changes, and the steps taken under :func:`state_lock`, atomic
    among all workers sharing its database (SQLite: on this machine; PostgreSQL: on every machine)."""
    from search.storage import sqlite_file

    db = sqlite_file(url)
    if db is not None:
        lock = _StateLock(_file_lock(db.with_name(db.name + ".state-lock")))
    elif storage.engine.dialect.name == "postgresql":
        lock = _StateLock(_pg_advisory_lock(storage.engine))
    else:
        return  # MySQL: row locks make each state change atomic; the budget steps are not serialised
    original = storage.set_trial_state_values

    def set_trial_state_values(trial_id: int, state: TrialState, values: Any = None) -> bool:
        with lock.hold():
            return bool(original(trial_id, state, values))

    storage.set_trial_state_values = set_trial_state_values
    _STATE_LOCK["lock"] = lock


class BudgetHeld(Exception):
    """No new trial: the study's finished, running and queued trials already hold its budget."""


def limit_new_trials(storage: Any, budget: int) -> None:
    """Let ``storage`` create a new trial only while the budget has room, checked under the state lock.

    Why: two workers that each counted room and then created a trial could both create one; the later
    trial found the budget full once it started and was recorded FAIL (``skipped``). Checked and
    created as one step, it is never created. Queued trials (retries, enqueued configs) are created
    from a template, or popped rather than created, and are never refused.
    """
    # Optuna's caching storage (what a Study uses) calls the RDB storage's _create_new_trial, and its
    # create_new_trial does too: wrapping that one method covers both.
    original = storage._create_new_trial

    def create_new_trial(study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        if template_trial is not None:
            return original(study_id, template_trial)
        with state_lock():
            trials = storage.get_all_trials(study_id, deepcopy=False)
            if held_before(trials, len(trials)) >= budget:  # the new trial would be number len(trials)
                raise BudgetHeld(f"the study already holds {budget} trials")
            return original(study_id)

    storage._create_new_trial = create_new_trial


def locked_fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's stale check with a stale trial's FAIL and its retry's queueing as one step.

    In between, the trial's budget place would look free to a new trial counting the ones before it.
    """
    with state_lock():
        fail_stale_trials(study)


def queue_retry(study: optuna.Study, frozen: FrozenTrial, max_retry: int | None = 3) -> None:
    """Queue a FAIL trial again (it resumes from its checkpoint), unless a retry of it exists already.

    The check makes a repeated call harmless: a retry after a lost acknowledgement never queues the
    same trial twice (which would run one trial too many).
    """
    with state_lock():  # the check and the enqueue as one step among the workers
        for t in study.get_trials(deepcopy=False):
            history = t.system_attrs.get("retry_history") or []
            if history and history[-1] == frozen.number:
                return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        callback(study, frozen)


def fail_silent_trials(study: optuna.Study, engine: Any, older_than: float) -> list[int]:
    """Fail (and queue for retry) RUNNING trials that never recorded a heartbeat.

    Optuna's stale check only sees trials with a heartbeat row; a worker killed between taking a trial
    and its first beat (a window of milliseconds) would leave a RUNNING trial that nothing ever ends,
    and the study would wait for it forever. Returns the numbers of the trials it failed.
    """
    import sqlalchemy

    cutoff = datetime.now() - timedelta(seconds=older_than)
    running = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.datetime_start is not None and t.datetime_start < cutoff
    ]
    if not running:
        return []
    ids = ", ".join(str(int(t._trial_id)) for t in running)
    with engine.connect() as con:
        beating = {
            int(row[0])
            for row in con.execute(
                sqlalchemy.text(f"SELECT trial_id FROM trial_heartbeats WHERE trial_id IN ({ids})")
            )
        }
    failed = []
    for t in running:
        if t._trial_id in beating:
            continue
        with state_lock():  # its FAIL and its retry's queueing as one step
            try:
                study._storage.set_trial_user_attr(
                    t._trial_id,
                    "fail_reason",
                    "never sent a heartbeat (its worker died as it started); retried",
                )
                if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # it finished meanwhile
            queue_retry(study, study._storage.get_trial(t._trial_id))
        failed.append(t.number)
    return failed


# --------------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------------


class _StopRequested(KeyboardInterrupt):
    """Raised in a worker by SIGTERM (sent by the parent on Ctrl-C)."""


_STOP = {"requested": False}  # also remembered, in case the exception itself gets lost on the way


def _install_worker_signals() -> None:
    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean stop; ignore repeats during clean-up
        _STOP["requested"] = True
        raise _StopRequested()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is handled by the parent
    signal.signal(signal.SIGTERM, on_term)


def _write_status(spec: WorkerSpec, state: dict[str, Any]) -> None:
    path = Path(spec.status_dir) / f"{spec.worker}.json"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(
            json.dumps(
                {
                    "worker": spec.worker,
                    "device": spec.device,
                    "pid": os.getpid(),
                    "updated": time.time(),
                    **state,
                }
            )
        )
        os.replace(tmp, path)
    except OSError:
        pass  # the display is best effort; training must not fail for it


def worker_main(spec: WorkerSpec) -> int:
    """Run trials until the study holds ``spec.trials`` finished ones (or the stop signal arrives).

    ``spec.lanes`` trials run at once, as threads of this process ("lanes"): on one GPU their kernels
    overlap (separate processes take turns on it instead), and they share one copy of the features.
    """
    _install_worker_signals()
    import torch

    from search.data import FeatureStore, make_split, open_cache
    from search.space import load_space, make_pruner, make_sampler
    from search.storage import artifact_store, is_transient_db_error, open_storage

    torch.set_num_threads(max(1, spec.threads))
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are shown by the display, not logged
    space = load_space(spec.space_path)
    storage = open_storage(spec.storage_url, spec.heartbeat, spec.grace)
    serialize_state_changes(storage, spec.storage_url)
    limit_new_trials(storage, spec.trials)
    if storage.get_heartbeat_stale_trial_callback() is not None:
        storage.heartbeat_stale_trial_callback = queue_retry  # never two retries of one trial
    # study.optimize runs the stale check too, before each trial: the same locked one (this process only).
    optuna.storages.fail_stale_trials = locked_fail_stale_trials
    existing = len(storage.get_all_trials(storage.get_study_id_from_name(spec.study_name), deepcopy=False))
    attrs = optuna.load_study(study_name=spec.study_name, storage=storage).user_attrs
    data = open_cache(Path(spec.cache_dir), Path(spec.data_root))
    ratio = float(attrs["valid_ratio"])
    split_seed = int(attrs["split_seed"])
    split = make_split(data, ratio, split_seed)
    trials_dir = Path(attrs["trials_dir"])
    features = FeatureStore(data, spec.device)  # one copy for all lanes (on the GPU when it fits)
    parent = os.getppid()

    def lane(spec: WorkerSpec, slot: int) -> int:
        """Trials one after another until the budget is met or a stop is asked for; the exit code."""
        # Its own sampler (seeded apart from every other lane's, here and in other workers) and study.
        sampler = make_sampler(space, seed_offset=spec.seed + 1000 * slot + existing)
        study = optuna.load_study(
            study_name=spec.study_name, storage=storage, sampler=sampler, pruner=make_pruner(space)
        )
        store = artifact_store(study)
        current: dict[str, Any] = {}
        # The state lock, held while a trial Optuna is about to FAIL (stopped, or cut off by the
        # storage) waits for its retry to be queued: no budget count elsewhere sees its place free.
        held = contextlib.ExitStack()

        def waiting(reason: str, waited: float) -> None:
            _write_status(spec, {"waiting": f"storage unreachable for {waited:.0f} s ({reason}); retrying"})

        wait = StorageWait(spec.storage_url, spec.storage_patience, on_wait=waiting)
        brief = StorageWait(spec.storage_url, min(5.0, spec.storage_patience))  # while stopping

        def objective(trial: optuna.Trial) -> float:
            try:
                return run_trial(trial)
            except (optuna.TrialPruned, SkipTrial, KeyboardInterrupt):
                raise
            except Exception as exc:
                if is_transient_db_error(exc):
                    current["requeue"] = True  # cut off by the storage, not by its configuration
                    with contextlib.suppress(Exception):  # its FAIL and its retry as one step (below)
                        held.enter_context(state_lock())
                with contextlib.suppress(Exception):  # best effort: the storage may be what failed
                    if not trial.user_attrs.get("fail_reason"):
                        trial.set_user_attr("fail_reason", f"{exc.__class__.__name__}: {exc}"[:500])
                raise

        def locked_trials() -> list[FrozenTrial]:
            with state_lock():
                return study.get_trials(deepcopy=False)

        def run_trial(trial: optuna.Trial) -> float:
            from search.train import train

            current["trial"] = trial
            system = wait.call(study._storage.get_trial_system_attrs, trial._trial_id)
            root = int(system.get("failed_trial", trial.number))  # a retry keeps its original's folder
            for key in ("fail_reason", "skipped", "interrupted"):  # a retry inherits its original's attrs
                if key in trial.user_attrs:
                    wait.call(trial.set_user_attr, key, None)
            trials = wait.call(locked_trials)  # no trial changes state (or gets its retry queued) meanwhile
            if root == trial.number:
                if held_before(trials, trial.number) >= spec.trials:
                    trial.set_user_attr("skipped", True)
                    raise SkipTrial(f"study already holds {spec.trials} trials")
            elif retry_is_redundant(trials, trial.number, root):
                trial.set_user_attr("skipped", True)
                raise SkipTrial(f"trial {root} already finished or is retried by another trial")
            try:
                config = space.sample(trial)
                overrides: dict[str, Any] = {
                    "seed": config.train.seed + root,
                    "split_seed": split_seed,
                    "valid_ratio": ratio,
                }
                if spec.steps is not None:
                    overrides["steps"] = spec.steps
                    overrides["valid_steps"] = min(config.train.valid_steps, spec.steps)
                config = config.replace(**overrides)
                config = config.replace(checkpoint_steps=config.train.valid_steps)
            except UserError as exc:
                trial.set_user_attr("fail_reason", f"bad config: {exc}")
                raise
            settings: dict[str, Any] = {
                "config": config.to_dict(),
                "device": spec.device,
                "worker": spec.worker,
            }
            for name, setting in settings.items():
                wait.call(trial.set_user_attr, name, setting)
            out_dir = trials_dir / f"{root:05d}"
            pruned = False
            started = time.time()

            def report(step: int, metrics: dict[str, float]) -> str | None:
                nonlocal pruned
                if os.getppid() != parent or _STOP["requested"]:
                    raise _StopRequested()  # the parent died (or a stop got lost): stop as if told to
                state = {"trial": trial.number, "step": step, "total": config.train.steps, **metrics}
                _write_status(spec, state)
                if "valid_acc" in metrics:
                    # Through a storage outage the trial waits here and trains on once the database is back.
                    wait.call(trial.report, metrics["valid_acc"], step)
                    if wait.call(trial.should_prune):
                        pruned = True
                        return "stop"
                return None

            _write_status(spec, {"trial": trial.number, "step": 0, "total": config.train.steps})
            try:
                result = train(
                    config, data, spec.device, report=report, out_dir=out_dir, split=split, store=features
                )
            except _StopRequested:
                # Best effort and brief: a failing write here (a busy SQLite file) must not swallow the stop.
                with contextlib.suppress(Exception):
                    brief.call(
                        trial.set_user_attr,
                        "fail_reason",
                        "interrupted (Ctrl-C or SIGTERM); retried when the study resumes",
                    )
                    brief.call(trial.set_user_attr, "interrupted", True)
                # Held until the retry is queued (the lane's stop handler); Optuna writes the FAIL between.
                with contextlib.suppress(Exception):
                    held.enter_context(state_lock())
                raise
            except torch.OutOfMemoryError:
                trial.set_user_attr("fail_reason", f"CUDA out of memory on {spec.device}")
                raise
            finished = {
                "valid_acc": result.best_accuracy,
                "best_step": result.best_step,
                "parameters": result.parameters,
                "steps_per_s": round(result.steps_per_s, 3),
                "step_mode": result.step_mode,
                "resumed_from_step": result.resumed_from,
                "wall_s": round(time.time() - started, 1),
            }
            for key, value in finished.items():  # the training is done: wait out an outage, do not lose it
                wait.call(trial.set_user_attr, key, value)
            checkpoint = result.checkpoint
            if checkpoint is not None:
                try:
                    digest = sha256_file(checkpoint)
                    artifact_id = wait.call(
                        lambda: upload_artifact(
                            artifact_store=store, file_path=str(checkpoint), study_or_trial=trial
                        )
                    )
                except OSError as exc:
                    # A full disk, a read-only or vanished folder: this trial fails with the reason, nothing
                    # partial is left in the store, and its folder is freed (a FAIL trial is never resumed).
                    wait.call(
                        trial.set_user_attr,
                        "fail_reason",
                        f"checkpoint could not be stored in {store.root}: {exc.strerror or exc}; "
                        "free space or repair the folder, the study goes on",
                    )
                    checkpoint.unlink(missing_ok=True)
                    with contextlib.suppress(OSError):
                        out_dir.rmdir()
                    raise
                wait.call(trial.set_user_attr, "checkpoint_artifact", artifact_id)
                wait.call(trial.set_user_attr, "checkpoint_sha256", digest)
                checkpoint.unlink()
                with contextlib.suppress(OSError):
                    out_dir.rmdir()  # nothing left once the artifact store holds the checkpoint
            if pruned:
                raise optuna.TrialPruned(f"pruned at step {result.last_step}")
            return result.best_accuracy

        def one_round() -> bool:
            """Fail stale trials, check the budget, run one trial; False once this worker should stop."""
            locked_fail_stale_trials(study)
            counts = count_trials(study.get_trials(deepcopy=False))
            if counts.finished >= spec.trials:
                return False
            if counts.failed >= spec.max_failures:
                _write_status(spec, {"stopped": f"{counts.failed} failed trials (max {spec.max_failures})"})
                return False
            if counts.holding >= spec.trials and counts.waiting == 0:
                # Others are running the last trials; stay to retry stale ones, and end any trial that
                # never sent a heartbeat (else the study would wait for it forever).
                fail_silent_trials(study, storage.engine, older_than=max(30.0, 2.0 * spec.grace))
                _write_status(spec, {"idle": True})
                time.sleep(spec.poll)
                return True
            current.clear()
            # A stop passes through to the lane's stop handler, which releases ``held`` once it has
            # queued the retry; a storage error, to the loop below, which releases it.
            try:
                study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
            except BudgetHeld:
                return True  # another worker took the last place meanwhile: the next round sees it
            if current.get("requeue"):
                requeue(current["trial"])
            held.close()  # the state lock taken for the requeue, if it was
            return True

        def requeue(trial: optuna.Trial) -> None:
            """Queue a trial that a storage outage failed, like a killed one, to resume from last.pt."""
            frozen = wait.call(study._storage.get_trial, trial._trial_id)
            if frozen.state == TrialState.FAIL:
                wait.call(queue_retry, study, frozen)

        def finished_elsewhere() -> bool:
            """True when the trial in hand was ended by someone else (failed as stale during an outage)."""
            trial = current.get("trial")
            if trial is None:
                return False
            return wait.call(study._storage.get_trial, trial._trial_id).state != TrialState.RUNNING

        try:
            while True:
                if _STOP["requested"]:
                    raise _StopRequested()
                try:
                    go_on = one_round()
                except Exception as exc:
                    held.close()  # a requeue left unfinished: its trial goes stale and is retried so
                    if is_transient_db_error(exc):
                        # The result of the trial in hand may not be recorded: it goes stale and is retried.
                        wait.pause(exc)
                        continue
                    if finished_elsewhere():
                        continue  # its retry resumes from the checkpoint; this worker takes the next trial
                    raise
                wait.reset()
                if not go_on:
                    break
        except KeyboardInterrupt:
            trial = current.get("trial")
            if trial is not None:
                # Best effort: a storage that stays down leaves the trial to go stale instead.
                with contextlib.suppress(Exception):
                    frozen = brief.call(study._storage.get_trial, trial._trial_id)
                    if frozen.state == TrialState.FAIL:
                        brief.call(queue_retry, study, frozen, None)  # resume it from last.pt next time
            return 130
        finally:
            held.close()  # the state lock taken when the stop reached the trial (see run_trial)
            _write_status(spec, {"done": True})
        return 0

    if spec.lanes == 1:
        return lane(spec, spec.index)
    return _run_lanes(spec, lane)


def _run_lanes(spec: WorkerSpec, lane: Callable[[WorkerSpec, int], int]) -> int:
    """Run ``spec.lanes`` lanes as threads; the main thread waits, taking the stop signal for them all.

    A stop (SIGTERM) reaches the main thread only: it sets the flag that each lane checks between
    trials and at every progress report, then waits for the lanes to mark their trials and end. The
    wait polls flags rather than ``Thread.join``, which a signal can cut short for good.
    """
    codes: list[int] = []
    errors: list[BaseException] = []
    ended = [threading.Event() for _ in range(spec.lanes)]

    def run(j: int) -> None:
        try:
            codes.append(lane(replace(spec, worker=f"{spec.worker}.{j}"), spec.index * spec.lanes + j))
        except BaseException as exc:  # noqa: BLE001 - raised again by the main thread
            errors.append(exc)
        finally:
            ended[j].set()

    def wait_for_lanes() -> None:
        while not all(e.is_set() for e in ended):
            time.sleep(0.2)

    # A stop arriving while the lanes start waits until all have started (then it stops them all), and
    # the lanes keep SIGTERM blocked, so the kernel hands it to the main thread, whose handler runs.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        try:
            for j in range(spec.lanes):
                threading.Thread(target=run, args=(j,), name=f"{spec.worker}.{j}", daemon=True).start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending stop is handled from here on
        wait_for_lanes()
    except KeyboardInterrupt:
        _STOP["requested"] = True
        wait_for_lanes()
        return 130
    if errors:
        raise errors[0]
    return max(codes)


def _worker_entry(spec: WorkerSpec) -> None:
    try:
        code = worker_main(spec)
    except UserError as exc:
        _write_status(spec, {"error": str(exc)})
        code = 2
    except KeyboardInterrupt:  # told to stop while still starting (importing torch, opening the data)
        _write_status(spec, {"done": True})
        code = 130
    os._exit(code)  # skip interpreter teardown of torch threads in a worker


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


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
    seed: int = 0
    allow_changed: bool = False
    heartbeat: int | None = None
    max_failures: int | None = None
    display: bool = True
    max_respawns: int | None = None  # restarts of signal-killed workers per run (default 5 per worker)
    storage_patience: float = STORAGE_PATIENCE
    lanes: int | None = None  # trials per worker process, as threads (default: per_gpu on a GPU, 1 on CPU)


def plan_devices(opts: RunOptions) -> tuple[list[str], int]:
    """The workers' devices (one process per GPU, or ``workers`` CPU processes) and trials per worker.

    On a GPU the ``per_gpu`` trials are threads of one process (see :func:`worker_main`); CPU workers
    run one trial each, as separate processes, since threads would only share the same cores.
    """
    from search.devices import visible_gpus

    visible = visible_gpus()
    gpus = visible if opts.gpus is None else opts.gpus
    for g in gpus:
        if g not in visible:
            raise UserError(f"--gpus: GPU {g} is not visible here (visible: {visible or 'none'})")
    if gpus:
        if opts.workers is not None:
            _log(f"--workers {opts.workers} has no effect with GPUs: --per-gpu sets the trials per GPU")
        return [f"cuda:{g}" for g in gpus], opts.lanes or opts.per_gpu or DEFAULT_PER_GPU
    if opts.per_gpu is not None:
        _log(f"no GPU visible: --per-gpu {opts.per_gpu} has no effect; --workers N runs N CPU trials at once")
    return ["cpu"] * (opts.workers or 1), opts.lanes or 1


def _may_compile(space: Space) -> bool:
    """Whether any trial of ``space`` may run with ``compile: true``."""
    return (
        bool(space.fixed.get("compile"))
        or any(p.name == "compile" for p in space.params)
        or any(e.get("compile") for e in space.enqueue)
    )


def _log(message: str) -> None:
    """One line for the user on stderr (above the live display when there is one)."""
    from search.progress import console

    console.print(message, style="yellow", markup=False, highlight=False, soft_wrap=True)


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == 130:
        return "was stopped (SIGTERM or Ctrl-C sent to it, not to spkid-search run)"
    return f"exited with code {code}"


def run(
    opts: RunOptions,
    on_update: Callable[[optuna.Study, Counts, list[dict[str, Any]]], None] | None = None,
    on_nothing: Callable[[str], None] | None = None,
) -> Counts:
    """Create or resume the study, start the workers, and wait until the budget is met.

    A study that already holds ``opts.trials`` finished trials starts no worker: ``on_nothing`` (default:
    a line on stderr) gets the line that says so, and the counts come back as they are.

    A worker killed by a signal (SIGKILL, the OOM killer) while the budget is not met is started again,
    at most ``max_respawns`` times per run; its trial goes stale and is retried from its checkpoint.
    """
    from search.space import load_space
    from search.storage import (
        check_storage_url,
        check_study_name,
        default_storage_url,
        is_transient_db_error,
        open_storage,
        study_dir,
    )

    space = load_space(opts.space)
    name = check_study_name(opts.study or space.name)
    if opts.trials > MAX_TRIALS:
        raise UserError(f"--trials {opts.trials}: absurdly many; use at most {MAX_TRIALS}")
    if opts.steps is not None and opts.steps > MAX_STEPS:
        raise UserError(f"--steps {opts.steps}: absurdly many; use at most {MAX_STEPS:,}")
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
    url = opts.storage or default_storage_url(name)
    check_storage_url(url)  # its form now; connecting (and creating a SQLite file) once the data is good
    heartbeat = opts.heartbeat or int(space.study.get("heartbeat_interval", DEFAULT_HEARTBEAT))
    grace = int(space.study.get("grace_period", 3 * heartbeat))
    from search.data import make_split, open_data  # torch: after the checks that need none

    data = open_data(opts.data, progress=opts.display)
    base = space.config_for({})
    split = make_split(data, base.train.valid_ratio, base.train.split_seed)
    storage = open_storage(url, heartbeat, grace)
    home = study_dir(name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    fresh = not study.user_attrs.get("fingerprint")
    steps = effective_steps(space, opts.steps)  # what the study records is what reaches the trials
    changes = identity_changes(
        study,
        {
            "fingerprint": data.fingerprint,
            "split_id": split.split_id,
            "valid_ratio": split.ratio,
            "split_seed": split.seed,
            "space_digest": space.digest,
            "space_path": str(Path(space.path).resolve()),
            "space_name": space.name,
            "data_root": str(Path(data.root).resolve()),
            "artifact_dir": str((home / "artifacts").resolve()),
            "trials_dir": str((home / "trials").resolve()),
            "steps_override": steps,
        },
        opts.allow_changed,
    )
    held = count_trials(study.get_trials(deepcopy=False))
    if not fresh and held.finished >= opts.trials:
        # Workers would each stop at once; nothing is recorded, so an --allow-changed here changes nothing.
        (on_nothing or _log)(nothing_to_do(name, held.finished, opts.trials))
        return held
    for key, value in changes.items():
        study.set_user_attr(key, value)
    if fresh:
        for params in space.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
    status_dir = home / "workers" / socket.gethostname()  # one folder per machine sharing the study
    status_dir.mkdir(parents=True, exist_ok=True)
    for old in status_dir.glob("*.json"):
        old.unlink()
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if devices[0] == "cpu" else 2
    specs = [
        WorkerSpec(
            worker=f"w{i}",
            index=i,
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
            max_failures=opts.max_failures or max(opts.trials, 3),
            lanes=lanes,
            storage_patience=opts.storage_patience,
        )
        for i, dev in enumerate(devices)
    ]
    respawn_limit = opts.max_respawns if opts.max_respawns is not None else 5 * len(specs)
    respawns = 0
    outage = {"logged": False}

    def storage_lost(reason: str, waited: float) -> None:
        if not outage["logged"]:
            _log(
                f"storage unreachable ({reason}); workers wait and retry for up to "
                f"{opts.storage_patience:.0f} s"
            )
            outage["logged"] = True

    wait = StorageWait(url, opts.storage_patience, on_wait=storage_lost)

    def finished_now() -> int | None:
        try:
            return count_trials(study.get_trials(deepcopy=False)).finished
        except Exception as exc:
            if is_transient_db_error(exc):
                return None
            raise

    ctx = mp.get_context("spawn")
    procs: dict[str, Any] = {}
    exits: dict[str, int | None] = {}

    def start(spec: WorkerSpec) -> None:
        proc = ctx.Process(target=_worker_entry, args=(spec,), name=spec.worker)
        procs[spec.worker] = proc
        proc.start()

    try:
        for s in specs:
            start(s)
        while len(exits) < len(specs):
            for s in specs:
                proc = procs[s.worker]
                if s.worker in exits or proc.is_alive():
                    continue
                proc.join()
                code = proc.exitcode
                killed = code is not None and code < 0 and -code not in (signal.SIGINT, signal.SIGTERM)
                if killed:
                    done = finished_now()
                    if (done is None or done < opts.trials) and respawns < respawn_limit:
                        respawns += 1
                        _log(
                            f"worker {s.worker} ({s.device}) {_exit_text(code)}; restarting it "
                            f"({respawns} of at most {respawn_limit} restarts); its trial resumes from "
                            "its last checkpoint"
                        )
                        start(s)
                        continue
                    if done is None or done < opts.trials:
                        _log(f"worker {s.worker} {_exit_text(code)}; restart limit ({respawn_limit}) spent")
                exits[s.worker] = code
            if on_update is not None and len(exits) < len(specs):
                try:
                    on_update(study, count_trials(study.get_trials(deepcopy=False)), read_status(status_dir))
                    if outage["logged"]:
                        _log("storage reachable again")
                        outage["logged"] = False
                except Exception as exc:
                    if not is_transient_db_error(exc):
                        raise
                    storage_lost(_first_line(exc), 0.0)
            time.sleep(1.0)
    except KeyboardInterrupt:
        stop_workers(list(procs.values()))
        raise
    errors = [s.get("error") for s in read_status(status_dir) if s.get("error")]
    if errors:
        raise UserError(str(errors[0]))
    counts = wait.call(lambda: count_trials(study.get_trials(deepcopy=False)))
    max_failures = opts.max_failures or max(opts.trials, 3)
    if counts.finished < opts.trials and counts.failed >= max_failures:
        raise UserError(
            f"study '{name}' stopped at {counts.finished} of {opts.trials} finished trials after "
            f"{counts.failed} failed ones (--max-failures {max_failures}); 'spkid-search status' shows "
            "why they failed: fix that, or raise --max-failures, and run the same command again"
        )
    broken = {w: code for w, code in exits.items() if code != 0}
    if counts.finished < opts.trials and broken:
        what = ", ".join(f"worker {w} {_exit_text(code)}" for w, code in sorted(broken.items()))
        raise UserError(
            f"study '{name}' holds {counts.finished} of {opts.trials} finished trials: {what} "
            f"({respawns} restarts used); fix the cause and run the same command again to resume"
        )
    return counts


def stop_workers(procs: list[Any], timeout: float = 60.0) -> None:
    """SIGTERM every worker (each marks its trial and queues it for resume), then wait; kill stragglers."""
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()


def read_status(status_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(status_dir.glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def summary_rows(study: optuna.Study, top: int) -> list[dict[str, Any]]:
    """The best finished trials, best first, as plain dicts (for status tables and tests)."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]

    def score(t: FrozenTrial) -> float:
        value = t.user_attrs.get("valid_acc")
        return float(value if value is not None else (t.value or 0.0))

    done.sort(key=score, reverse=True)
    rows = []
    for t in done[:top]:
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "valid_acc": t.user_attrs.get("valid_acc", t.value),
                "best_step": t.user_attrs.get("best_step"),
                "parameters": t.user_attrs.get("parameters"),
                "steps_per_s": t.user_attrs.get("steps_per_s"),
                "device": t.user_attrs.get("device"),
                "params": dict(t.params),
            }
        )
    return rows


def spec_dict(spec: WorkerSpec) -> dict[str, Any]:
    return asdict(spec)
