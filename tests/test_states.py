"""The state lock among workers (SQLite and PostgreSQL) and the budget check on new trials."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy
from optuna.trial import TrialState

import search.states as states_module
from search.storage import open_storage
from search.trials import count_trials


def test_stale_fail_racing_a_completing_trial_on_sqlite_cannot_both_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker tells its trial COMPLETE while another fails it as stale (a heartbeat late under load).

    SQLite ignores ``SELECT ... FOR UPDATE``: without the state lock both changes succeeded, the trial
    ended COMPLETE and its retry (queued because the FAIL "won") finished too: one trial too many.
    """
    monkeypatch.setattr(states_module, "_STATE_LOCK", {})
    url = f"sqlite:///{tmp_path / 'race.db'}"
    mine, other = open_storage(url), open_storage(url)
    states_module.serialize_state_changes(mine, url)
    states_module.serialize_state_changes(other, url)
    study = optuna.create_study(storage=mine, study_name="race")
    trial_id = study.ask()._trial_id
    results: list[object] = []

    def fail_as_stale() -> None:
        try:
            results.append(other.set_trial_state_values(trial_id, TrialState.FAIL))
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            results.append(exc)

    checked = mine.check_trial_is_updatable
    racers: list[threading.Thread] = []

    def check_then_let_the_other_in(tid: int, state: TrialState) -> None:
        checked(tid, state)  # the trial is RUNNING now; the other process fails it before we write
        if not racers:
            racers.append(threading.Thread(target=fail_as_stale))
            racers[0].start()
            racers[0].join(1.0)

    monkeypatch.setattr(mine, "check_trial_is_updatable", check_then_let_the_other_in)
    assert mine.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
    racers[0].join(30)
    assert len(results) == 1 and isinstance(results[0], optuna.exceptions.UpdateFinishedTrialError), results
    assert mine.get_trial(trial_id).state == TrialState.COMPLETE


def _advisory_locks_held(storage: Any) -> int:
    """How many of the state lock's server-side locks are held now (by anyone)."""
    if storage.engine.dialect.name == "postgresql":
        query = (
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    else:  # MySQL/MariaDB: whether the lock named for this database is held
        name = states_module.mysql_lock_name(storage.engine.url.database)
        query = f"SELECT IS_USED_LOCK('{name}') IS NOT NULL"
    with storage.engine.connect() as con:
        return int(con.execute(sqlalchemy.text(query)).scalar_one())


SERVERS = [
    pytest.param("pg_database", marks=pytest.mark.postgres),
    pytest.param("mysql_database", marks=pytest.mark.mysql),
]


@pytest.mark.parametrize("server", SERVERS)
def test_state_lock_on_a_server_holds_off_another_machine(
    server: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two engines stand for two machines: while one holds the state lock (a stale FAIL and its
    retry's queueing, say), the other's state change waits, and goes through once it is released.

    On MySQL there was no lock at all: two workers could both count room in the budget and both
    create a trial (one over it), or fail a stale trial while another queued its retry."""
    url = request.getfixturevalue(server)
    monkeypatch.setattr(states_module, "_STATE_LOCK", {})
    here, there = open_storage(url), open_storage(url)
    states_module.serialize_state_changes(here, url)
    lock = states_module._STATE_LOCK["lock"]
    states_module.serialize_state_changes(there, url)
    study = optuna.create_study(storage=here, study_name="lock")
    trial_id = study.ask()._trial_id
    done = threading.Event()

    def complete_elsewhere() -> None:
        there.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
        done.set()

    with lock.hold():
        assert _advisory_locks_held(here) == 1
        other = threading.Thread(target=complete_elsewhere)
        other.start()
        assert not done.wait(1.5)  # held off by the lock
        assert here.get_trial(trial_id).state == TrialState.RUNNING
    assert done.wait(10)  # released: the change goes through
    other.join(10)
    assert here.get_trial(trial_id).state == TrialState.COMPLETE
    with lock.hold(), lock.hold():  # reentrant within the process
        pass
    assert _advisory_locks_held(here) == 0  # nothing left held
    here.engine.dispose()
    there.engine.dispose()


@pytest.mark.parametrize("server", SERVERS)
def test_a_release_cut_short_by_a_stop_leaves_the_lock_free(
    server: str, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C during the release put the connection back in the pool: a MySQL named lock belongs to
    the session, so that idle connection kept it, and every worker (this one too) waited for good."""
    url = request.getfixturevalue(server)
    storage = open_storage(url)
    postgres = storage.engine.dialect.name == "postgresql"
    lock = (states_module._pg_advisory_lock if postgres else states_module._mysql_named_lock)(storage.engine)
    release = lock()
    assert _advisory_locks_held(storage) == 1

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as stop:
        stop.setattr(sqlalchemy.engine.Connection, "execute", stopped)
        stop.setattr(sqlalchemy.engine.Connection, "rollback", stopped)
        with pytest.raises(KeyboardInterrupt):
            release()
    assert _advisory_locks_held(storage) == 0
    lock()()  # taken and given back at once, not waited for
    storage.engine.dispose()


def test_a_new_trial_is_created_only_while_the_budget_has_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(states_module, "_STATE_LOCK", {})
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    storage = open_storage(url)
    states_module.serialize_state_changes(storage, url)
    states_module.limit_new_trials(storage, 2)
    study = optuna.create_study(storage=storage, study_name="budget")
    study.tell(study.ask(), 1.0)
    running = study.ask()  # holds the second place
    with pytest.raises(states_module.BudgetHeld, match="already holds 2 trials"):
        study.ask()
    assert len(study.get_trials()) == 2  # refused before anything was written
    study.tell(running, state=TrialState.FAIL)  # a real failure frees its place
    assert study.ask().number == 2
    study.enqueue_trial({})  # queued trials (retries, enqueued configs) are never refused ...
    assert study.ask().number == 3  # ... nor is taking one from the queue
    with pytest.raises(states_module.BudgetHeld):
        study.ask()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_budgets_rows_are_the_trials_the_whole_read_gives(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The count under the state lock reads each trial's number, state and original in one query (the
    whole read took 0.9 s at 1,000 trials): the same rows, and the same count, as the whole read."""
    from optuna.trial import create_trial

    from search.trials import held_before

    url = (
        f"sqlite:///{tmp_path / 'rows.db'}" if backend == "sqlite" else request.getfixturevalue("pg_database")
    )
    storage = open_storage(url)
    study = optuna.create_study(storage=storage, study_name="rows")
    study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.5, user_attrs={"x": 1}))
    study.add_trial(create_trial(state=TrialState.FAIL, system_attrs={"retry_history": [7]}))
    study.add_trial(create_trial(state=TrialState.PRUNED, value=0.1, system_attrs={"failed_trial": 1}))
    study.enqueue_trial({})
    study._storage.set_trial_system_attr(study.trials[-1]._trial_id, "failed_trial", 1)
    study.ask()  # a running one (takes the queued retry of 1)
    study.ask()  # and a new one
    sid = storage.get_study_id_from_name("rows")
    whole = storage.get_all_trials(sid, deepcopy=False)
    rows = states_module.trial_rows(storage, sid)
    assert [(r.number, r.state, r.system_attrs.get("failed_trial")) for r in rows] == [
        (t.number, t.state, t.system_attrs.get("failed_trial")) for t in whole
    ]
    assert {type(r).__name__ for r in rows} == {"TrialRow"}  # the query, not its fallback
    assert [r.state for r in rows].count(TrialState.RUNNING) == 2
    for n in range(len(whole) + 1):
        assert held_before(rows, n) == held_before(whole, n)


def test_stops_do_not_spend_a_trials_retries_and_one_killed_too_often_goes_with_its_folder(
    tmp_path: Path,
) -> None:
    """Three Ctrl-Cs used up a trial's three retries, and one kill of its fourth attempt then dropped it
    at step 5,400 of 6,000. Only kills (and lost heartbeats) count; past the limit its folder goes."""
    from optuna.trial import create_trial

    from search.storage import MAX_RETRY

    def study_of(stopped: list[bool], name: str) -> optuna.Study:
        """A study whose trial 0 ran as these attempts (stopped or killed), all FAIL."""
        study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / name}.db"), study_name=name)
        study.set_user_attr("home_dir", str(tmp_path / name))  # its trials' folders are in trials/ there
        (tmp_path / name / "trials" / "00000" / "00000").mkdir(parents=True)
        for number, interrupted in enumerate(stopped):
            system = {} if number == 0 else {"failed_trial": 0, "retry_history": list(range(number))}
            user = {"interrupted": True} if interrupted else {}
            study.add_trial(create_trial(state=TrialState.FAIL, user_attrs=user, system_attrs=system))
        return study

    stopped_thrice = study_of([True, True, True, False], "stopped")
    assert states_module.kills(stopped_thrice.trials, stopped_thrice.trials[-1]) == 1
    states_module.queue_retry(stopped_thrice, stopped_thrice.trials[-1])
    (retry,) = stopped_thrice.get_trials(states=(TrialState.WAITING,))
    assert retry.system_attrs["retry_history"] == [0, 1, 2, 3]
    assert (tmp_path / "stopped" / "trials" / "00000").exists()
    killed = study_of([False] * (MAX_RETRY + 1), "killed")
    assert states_module.kills(killed.trials, killed.trials[-1]) == MAX_RETRY + 1
    states_module.queue_retry(killed, killed.trials[-1])
    assert (
        not killed.get_trials(states=(TrialState.WAITING,))
        and not (tmp_path / "killed" / "trials" / "00000").exists()
    )


def test_a_stopped_trial_left_without_its_retry_is_queued_once_while_the_budget_has_room(
    tmp_path: Path,
) -> None:
    """A stopped worker queues its trial's retry as a best effort; once none was queued, the trial was
    lost (counted a failure, its checkpoints swept). The run queues what is missing, never twice."""
    from optuna.trial import create_trial

    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path / 'lost.db'}"), study_name="lost")

    def add(
        state: TrialState, root: int | None = None, history: list[int] | None = None, **user: object
    ) -> None:
        system = {} if root is None else {"failed_trial": root, "retry_history": history or [root]}
        value = 0.5 if state == TrialState.COMPLETE else None
        study.add_trial(create_trial(state=state, value=value, user_attrs=user, system_attrs=system))

    add(TrialState.FAIL, interrupted=True)  # 0: stopped, its retry lost
    add(TrialState.FAIL, interrupted=True)  # 1: stopped, retried by 2
    add(TrialState.WAITING, root=1)  # 2
    add(TrialState.FAIL, fail_reason="bad config")  # 3: a real failure: not retried
    add(TrialState.FAIL, interrupted=True)  # 4: stopped, retried by 5 and 6 (two machines at once)...
    add(TrialState.FAIL, root=4, interrupted=True)  # 5: ...one stopped with no retry of its own,
    add(TrialState.COMPLETE, root=4)  # 6: ...the other finished: trial 4 needs nothing more
    add(TrialState.FAIL, interrupted=True)  # 7: stopped, its retry lost, but no room left for it
    held = count_trials(study.get_trials()).holding
    assert held == 2  # trials 2 and 6

    assert states_module.requeue_stopped(study, budget=held + 1) == [0]
    trials = study.get_trials()
    assert trials[-1].state == TrialState.WAITING and trials[-1].system_attrs["retry_history"] == [0]
    assert states_module.requeue_stopped(study, budget=held + 1) == []  # no room: 7 is not given 0's place
    assert states_module.requeue_stopped(study, budget=held + 5) == [7]
    assert states_module.requeue_stopped(study, budget=held + 5) == []  # never twice
    assert [t.system_attrs["retry_history"] for t in study.get_trials(states=(TrialState.WAITING,))] == [
        [1],
        [0],
        [7],
    ]
