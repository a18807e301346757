"""Concurrency on one storage: many workers on SQLite without lock errors, processes racing to create a
new database, SQLite refused on network filesystems, and the pieces that keep an outage or a dead
worker from losing or stranding a trial (transient-error classification, bounded waiting, the sweep
for trials that never sent a heartbeat)."""

from __future__ import annotations

import multiprocessing as mp
import signal
import sqlite3
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from search.cli import main
from search.errors import UserError
from search.states import fail_silent_trials
from search.storage import (
    StorageWait,
    db_error_text,
    default_storage_url,
    is_transient_db_error,
    open_storage,
)
from search.study import RunOptions, run
from search.trials import count_trials, is_skipped
from tests.reliability.conftest import Figures, write_space
from tests.studies import postgres_answers


@pytest.mark.slow
@pytest.mark.deadline(240)
def test_four_sqlite_workers_finish_fifty_trials_without_a_lock_error(
    tmp_path: Path, tiny_dir: Path, capfd: pytest.CaptureFixture[str], figures: Figures
) -> None:
    space = write_space(
        tmp_path / "unit.yaml",
        pruner={"name": "successive_halving", "min_resource": 1, "reduction_factor": 2},
        steps=10,
        valid_steps=5,
    )
    started = time.monotonic()
    opts = RunOptions(space=str(space), trials=50, data=tiny_dir, workers=4, heartbeat=1, display=False)
    counts = run(opts)
    elapsed = time.monotonic() - started
    out, err = capfd.readouterr()
    study = optuna.load_study(study_name="unit", storage=open_storage(default_storage_url("unit")))
    final = count_trials(study.get_trials(deepcopy=False))
    figures.trials_checked += 50
    figures.trials_lost += max(0, 50 - final.finished)
    assert counts.finished == final.finished == 50, final
    assert final.failed == 0 and final.running == 0 and final.waiting == 0, final
    trials = study.get_trials(deepcopy=False)
    # No trial is created past the budget (a skip could only be a retry found redundant).
    assert not [t.number for t in trials if is_skipped(t) and "failed_trial" not in t.system_attrs], final
    assert "locked" not in (out + err).lower() and "Traceback" not in out + err, out + err
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len({t.user_attrs["worker"] for t in done}) == 4  # every worker got trials
    with sqlite3.connect(tmp_path / "studies/unit/study.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    print(
        f"4 workers, 50 trials on SQLite in {elapsed:.0f} s: complete {final.complete}, pruned "
        f"{final.pruned}, failed 0, retried {final.retried}, skipped {final.skipped}"
    )


def _open_and_join(url: str, start_at: float) -> str:
    while time.time() < start_at:  # all processes hit the fresh database together
        time.sleep(0.005)
    try:
        storage = open_storage(url, heartbeat_interval=1)
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        optuna.create_study(study_name="race", storage=storage, load_if_exists=True)
    except Exception as exc:  # noqa: BLE001 - reported to the test as text
        return f"{exc.__class__.__name__}: {exc}"
    return "ok"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest.mark.deadline(90)
def test_processes_opening_a_new_database_at_once_all_succeed(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Several ``spkid-search run`` (or compose workers) started together on an empty database race to
    create Optuna's tables; the losers used to fail with 'cannot connect (... already exists)'."""
    if backend == "postgresql":
        if not postgres_answers():
            pytest.skip("no PostgreSQL server answers at 127.0.0.1:5432")
        url = request.getfixturevalue("pg_database")
    else:
        (tmp_path / "fresh").mkdir()  # a folder of one's own, which must exist; the database is new
        url = f"sqlite:///{tmp_path / 'fresh' / 'study.db'}"
    start_at = time.time() + 3.0
    with mp.get_context("spawn").Pool(4) as pool:
        results = pool.starmap(_open_and_join, [(url, start_at)] * 4)
    assert results == ["ok"] * 4, results
    assert [s.study_name for s in optuna.get_all_study_summaries(open_storage(url))] == ["race"]


def test_sqlite_on_a_network_filesystem_is_refused_with_the_postgresql_alternative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import search.storage

    monkeypatch.setattr(search.storage, "_filesystem_type", lambda path: "nfs4")
    with pytest.raises(UserError, match=r"network filesystem \(nfs4\).*postgresql://"):
        open_storage(f"sqlite:///{tmp_path / 'shared' / 'study.db'}")
    monkeypatch.setenv("SPKID_SEARCH_ALLOW_NETWORK_SQLITE", "0")  # turned the check off, as any text did
    with pytest.raises(UserError, match=r"network filesystem \(nfs4\)"):
        open_storage(f"sqlite:///{tmp_path / 'shared' / 'study.db'}")
    monkeypatch.setenv("SPKID_SEARCH_ALLOW_NETWORK_SQLITE", "1")
    (tmp_path / "shared").mkdir()
    open_storage(f"sqlite:///{tmp_path / 'shared' / 'study.db'}")  # the owner's word: allowed
    monkeypatch.delenv("SPKID_SEARCH_ALLOW_NETWORK_SQLITE")
    space = write_space(tmp_path / "unit.yaml")
    term = signal.getsignal(signal.SIGTERM)
    try:  # refused before any data is read or generated (no --data here)
        assert main(["run", "--space", str(space), "--trials", "1", "--quiet"]) == 2
    finally:
        signal.signal(signal.SIGTERM, term)  # main() installs its own SIGTERM handler
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "PostgreSQL" in lines[0], lines
    assert not (tmp_path / "studies").exists() and not (tmp_path / "data").exists()

    monkeypatch.setattr(search.storage, "_filesystem_type", lambda path: "ext4")
    (tmp_path / "local").mkdir()
    open_storage(f"sqlite:///{tmp_path / 'local' / 'study.db'}")  # a local disk is fine


def _operational(orig: Exception) -> sqlalchemy.exc.OperationalError:
    return sqlalchemy.exc.OperationalError("SELECT 1", {}, orig)


def test_transient_database_errors_are_told_apart_from_real_ones() -> None:
    import psycopg

    locked = _operational(sqlite3.OperationalError("database is locked"))
    no_table = _operational(sqlite3.OperationalError("no such table: trials"))
    restart = _operational(psycopg.OperationalError("terminating connection due to administrator command"))
    wrapped = optuna.exceptions.StorageInternalError("An exception is raised during the commit.")
    wrapped.__cause__ = restart
    assert is_transient_db_error(locked) and is_transient_db_error(restart) and is_transient_db_error(wrapped)
    assert not is_transient_db_error(no_table) and not is_transient_db_error(ValueError("x"))
    assert db_error_text(wrapped) == "terminating connection due to administrator command"


def test_storage_wait_retries_then_gives_up_with_one_line_naming_the_storage() -> None:
    restart = _operational(sqlite3.OperationalError("database is locked"))
    attempts: list[int] = []

    def flaky() -> str:
        attempts.append(1)
        if len(attempts) < 3:
            raise restart
        return "answer"

    assert StorageWait("sqlite:///s.db", patience=10).call(flaky) == "answer" and len(attempts) == 3

    def down() -> None:
        raise restart

    waited: list[float] = []
    wait = StorageWait("postgresql://user:hunter2@db/x", patience=1.0, on_wait=lambda r, w: waited.append(w))
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        wait.call(down)
    message = str(info.value)
    assert time.monotonic() - started < 5 and waited
    assert "\n" not in message and "postgresql://user:***@db/x" in message and "hunter2" not in message
    assert "run the same command again" in message
    with pytest.raises(ValueError):
        StorageWait("sqlite:///s.db", patience=10).call(lambda: int("not a number"))  # real errors: at once


def test_a_running_trial_that_never_sent_a_heartbeat_is_failed_and_retried(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}", heartbeat_interval=1, grace_period=2)
    study = optuna.create_study(study_name="silent", storage=storage)
    with warnings.catch_warnings():  # Optuna warns that heartbeats are meant for optimize(): here, yes
        warnings.simplefilter("ignore", UserWarning)
        silent = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})  # no heartbeat thread
        beating = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(beating._trial_id)
    assert fail_silent_trials(study, storage.engine, older_than=3600) == []  # too young to judge
    assert fail_silent_trials(study, storage.engine, older_than=0) == [silent.number]
    trials = study.get_trials(deepcopy=False)
    by_number: dict[int, Any] = {t.number: t for t in trials}
    assert by_number[silent.number].state == TrialState.FAIL
    # It may have lost the storage rather than died: the row was written, the worker saw an error.
    assert (
        "its worker died, or lost the storage, as it took"
        in by_number[silent.number].user_attrs["fail_reason"]
    )
    assert by_number[beating.number].state == TrialState.RUNNING
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == silent.number]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].params == by_number[silent.number].params
