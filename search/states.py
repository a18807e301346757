"""Trial state changes among all the workers of a study: the state lock, the budget, retries.

Workers in other processes and on other machines change trial states in one database. Three steps
must not interleave with another worker's: a state change itself (SQLite does not make Optuna's
read-check-write atomic), a stale trial's FAIL with the queueing of its retry, and the budget check
with the creation of a new trial. :func:`serialize_state_changes` installs a lock for them, a lock
file beside a SQLite database, an advisory lock in PostgreSQL, a named lock in MySQL;
:func:`state_lock` holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from search.storage import MAX_RETRY, open_storage, sqlite_file, trials_dir
from search.trials import FINISHED, TrialLike, count_trials, held_before, real_failures, root_of

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
    machines (a lock file beside a SQLite database, an advisory lock in PostgreSQL, a named lock in
    MySQL) and returns what
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


def _connection_lock(
    engine: Any, take: Callable[[Any], None], give_back: Callable[[Any], None]
) -> Callable[[], Release]:
    """A lock a database server keeps for a connection of its own: ``take(conn)`` waits for it and
    ``give_back(conn)`` releases it. A wait cut short by a stop, or a release that fails or is cut
    short, drops the connection, and the server releases what it held (as it does for a killed
    worker's): back in the pool, a MySQL connection would keep its named lock, and every worker would
    wait for it for good."""

    def acquire() -> Release:
        conn = engine.connect()
        try:
            take(conn)
        except BaseException:
            conn.invalidate()  # drop the connection, and any request still queued on it
            conn.close()
            raise

        def release() -> None:
            try:
                give_back(conn)
            except Exception:  # noqa: BLE001 - a lost connection has released the lock already
                conn.invalidate()
            except BaseException:  # a stop during the release: not given back, so drop it
                conn.invalidate()
                raise
            finally:
                conn.close()

        return release

    return acquire


def _pg_advisory_lock(engine: Any) -> Callable[[], Release]:
    """A PostgreSQL transaction-level advisory lock: among all machines sharing the database.

    Held by an open transaction on a connection of its own; ending the transaction, or losing the
    connection (a killed worker, a database restart), releases it.
    """

    def take(conn: Any) -> None:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_LOCK_KEY})

    return _connection_lock(engine, take, lambda conn: conn.rollback())  # the transaction's end frees it


def mysql_lock_name(database: str) -> str:
    """The state lock's name on a MySQL server (at most 64 characters, the limit there)."""
    return "spkid-search states " + hashlib.sha256(database.encode()).hexdigest()[:32]


def _mysql_named_lock(engine: Any) -> Callable[[], Release]:
    """A MySQL/MariaDB named lock (``GET_LOCK``): among all machines sharing the server.

    Held by a connection of its own until ``RELEASE_LOCK``; losing the connection (a killed worker, a
    server restart) releases it. Names are server-wide, so the database's name is part of it: studies
    in two databases of one server do not wait for each other.
    """
    name = mysql_lock_name(engine.url.database or "")

    def take(conn: Any) -> None:
        # Waits in slices: GET_LOCK's "forever" (-1) is not understood by every server version.
        while (
            got := conn.execute(sqlalchemy.text("SELECT GET_LOCK(:name, 5)"), {"name": name}).scalar()
        ) != 1:
            if got is None:  # an error on the server (killed query, out of memory), not a timeout
                raise sqlalchemy.exc.OperationalError("SELECT GET_LOCK", {"name": name}, Exception("NULL"))

    def give_back(conn: Any) -> None:
        conn.execute(sqlalchemy.text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        conn.rollback()

    return _connection_lock(engine, take, give_back)


_STATE_LOCK: dict[str, _StateLock] = {}  # the lock of this process's storage, once installed


def state_lock() -> contextlib.AbstractContextManager[None]:
    lock = _STATE_LOCK.get("lock")
    return lock.hold() if lock is not None else contextlib.nullcontext()


def clear_state_lock() -> None:
    """Forget the installed lock (the driver's, once its run ends): :func:`state_lock` is a no-op again."""
    _STATE_LOCK.pop("lock", None)


def serialize_state_changes(storage: Any, url: str) -> None:
    """Make ``storage``'s trial state changes, and the steps taken under :func:`state_lock`, atomic
    among all workers sharing its database (SQLite: on this machine; PostgreSQL, MySQL: on every
    machine)."""
    db = sqlite_file(url)
    if db is not None:
        lock = _StateLock(_file_lock(db.with_name(db.name + ".state-lock")))
    elif storage.engine.dialect.name == "postgresql":
        lock = _StateLock(_pg_advisory_lock(storage.engine))
    elif storage.engine.dialect.name in ("mysql", "mariadb"):
        lock = _StateLock(_mysql_named_lock(storage.engine))
    else:
        raise ValueError(f"no state lock for a {storage.engine.dialect.name} database")
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
            trials = trial_rows(storage, study_id)
            if held_before(trials, len(trials)) >= budget:  # the new trial would be number len(trials)
                raise BudgetHeld(f"the study already holds {budget} trials")
            return original(study_id)

    storage._create_new_trial = create_new_trial


@dataclass(frozen=True)
class TrialRow:
    number: int
    state: TrialState
    system_attrs: dict[str, Any]


_ROWS = sqlalchemy.text(
    "SELECT t.number, t.state, a.value_json FROM trials t LEFT OUTER JOIN trial_system_attributes a "
    "ON a.trial_id = t.trial_id AND a.key = 'failed_trial' WHERE t.study_id = :study_id ORDER BY t.number"
)


def trial_rows(storage: Any, study_id: int) -> Sequence[TrialLike]:
    """Each trial's number, state and original, what the budget's count reads, in one query.

    Why: every new trial is counted under the state lock, and reading the trials whole (their params,
    attributes and intermediate values) took 0.9 s at 1,000 trials on the dev VM, against 2 ms for
    this query; every other worker waits on the lock meanwhile. A schema it does not know (another
    Optuna) falls back to the whole read.
    """
    try:
        with storage.engine.connect() as connection:
            rows = connection.execute(_ROWS, {"study_id": study_id}).all()
        return [
            TrialRow(int(n), TrialState[str(s)], {} if v is None else {"failed_trial": json.loads(v)})
            for n, s, v in rows
        ]
    except (sqlalchemy.exc.SQLAlchemyError, KeyError, ValueError, TypeError, AttributeError):
        return storage.get_all_trials(study_id, deepcopy=False)


def locked_fail_stale_trials(study: optuna.Study) -> None:
    """Optuna's stale check with a stale trial's FAIL and its retry's queueing as one step.

    In between, the trial's budget place would look free to a new trial counting the ones before it.
    """
    with state_lock():
        fail_stale_trials(study)


def queue_retry(study: optuna.Study, frozen: FrozenTrial, max_retry: int | None = MAX_RETRY) -> None:
    """Queue a FAIL trial again (it resumes from its checkpoint), unless a retry of it exists already,
    or its attempts were killed more than ``max_retry`` times (None: no limit); then its folder goes.

    The check makes a repeated call harmless: a retry after a lost acknowledgement never queues the
    same trial twice (which would run one trial too many). Attempts that were stopped (Ctrl-C, a dead
    driver) do not count as kills: three stops used up the retries, and a fourth attempt's one kill
    dropped a trial at step 5,400 of 6,000.
    """
    with state_lock():  # the check and the enqueue as one step among the workers
        trials = study.get_trials(deepcopy=False)
        for t in trials:
            history = t.system_attrs.get("retry_history") or []
            if history and history[-1] == frozen.number:
                return
        if max_retry is not None and kills(trials, frozen) > max_retry:
            _discard_folder(study, frozen)
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback = RetryHeartbeatStaleTrialCallback(max_retry=None)
        callback(study, frozen)


def requeue_stopped(study: optuna.Study, budget: int) -> list[int]:
    """Queue the retry of every stopped trial (Ctrl-C, SIGTERM, a dead driver) that has none, while the
    study's finished, running and queued trials hold fewer than ``budget``; the numbers queued.

    Why: a stopped worker queues its trial's retry itself, as a best effort on its way out (its storage
    may not answer then, and it is killed if it takes too long). Once, in the SIGTERM-then-Ctrl-C
    reliability test, a trial ended FAIL, "interrupted", with no retry: nothing would have resumed it,
    it counted as a failure, and the next run's sweep would have deleted its checkpoints. The run
    checks after its workers stop, and at its start (for a run killed outright, or another machine's).
    Its place in the budget was free meanwhile: one taken by a new trial is not given twice.
    """
    with state_lock():  # a worker's FAIL and its own queueing are one step: none is half-way here
        trials = study.get_trials(deepcopy=False)
        alive = {root_of(t) for t in trials if t.state in (*FINISHED, TrialState.RUNNING, TrialState.WAITING)}
        holding = count_trials(trials).holding
        queued = []
        for t in real_failures(trials):  # FAIL, never queued again
            if holding >= budget:
                break
            if t.user_attrs.get("interrupted") and root_of(t) not in alive:
                queue_retry(study, t, None)  # stops are not kills: no limit
                queued.append(t.number)
                alive.add(root_of(t))
                holding += 1
    return queued


def kills(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> int:
    """How many of ``trial``'s attempts, itself included, ended killed or lost rather than stopped."""
    earlier = set(trial.system_attrs.get("retry_history") or [])
    killed = sum(1 for t in trials if t.number in earlier and not t.user_attrs.get("interrupted"))
    return killed + (0 if trial.user_attrs.get("interrupted") else 1)


def _discard_folder(study: optuna.Study, trial: FrozenTrial) -> None:
    """Remove the folders of a trial that will not run again (its retries spent): best effort."""
    shutil.rmtree(trials_dir(study) / f"{root_of(trial):05d}", ignore_errors=True)


def open_worker_storage(url: str, heartbeat: int, grace: int, budget: int) -> Any:
    """A worker's storage: state changes under the state lock, new trials only while ``budget`` has
    room, and a stale trial failed and queued again as one step, never retried twice.

    Why one function: each of these replaces a piece of Optuna's behaviour, and a worker that missed
    one of them ran trials past the budget or retried a trial twice.
    """
    storage = open_storage(url, heartbeat, grace)
    serialize_state_changes(storage, url)
    limit_new_trials(storage, budget)
    if storage.get_heartbeat_stale_trial_callback() is not None:
        storage.heartbeat_stale_trial_callback = queue_retry  # never two retries of one trial
    # study.optimize runs the stale check too, before each trial: the same locked one (this process only).
    optuna.storages.fail_stale_trials = locked_fail_stale_trials
    return storage


def fail_silent_trials(study: optuna.Study, engine: Any, older_than: float) -> list[int]:
    """Fail (and queue for retry) RUNNING trials that never recorded a heartbeat.

    Optuna's stale check only sees trials with a heartbeat row; a worker killed between taking a trial
    and its first beat (a window of milliseconds) would leave a RUNNING trial that nothing ever ends,
    and the study would wait for it forever. So would a storage that went away while a worker created a
    trial: the row was written, but the worker saw an error and took another one (seen with a
    PostgreSQL restart). Returns the numbers of the trials it failed.
    """
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
    reason = "never sent a heartbeat (its worker died, or lost the storage, as it took the trial); retried"
    return [t.number for t in running if t._trial_id not in beating and fail_and_retry(study, t, reason)]


def fail_and_retry(study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
    """FAIL a RUNNING trial whose worker is known dead, with ``reason``, and queue its retry (it resumes
    from its checkpoint), as one step among the workers; False if it had finished meanwhile."""
    with state_lock():
        if kills(study.get_trials(deepcopy=False), trial) > MAX_RETRY:  # queue_retry will not queue it
            reason += f"; not retried: its attempts were killed {MAX_RETRY + 1} times"
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            if not study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # it finished meanwhile
        queue_retry(study, study._storage.get_trial(trial._trial_id))
    return True
