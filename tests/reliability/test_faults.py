"""Faults injected into running studies: SIGKILLed workers, a PostgreSQL restart, a broken artifact store,
SIGTERM and Ctrl-C. Each test drives ``spkid-search run`` as a user would and then checks that the study
holds exactly the finished trials asked for, that no trial is left RUNNING and that nothing is corrupt.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from search.errors import UserError
from search.files import sha256_file
from search.storage import default_storage_url, open_storage
from search.study import RunOptions, run
from search.trials import count_trials
from search.worker import read_status
from tests.reliability.conftest import (
    Figures,
    pid_alive,
    wait_for,
    write_space,
)
from tests.studies import postgres_answers

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


_STORAGES: dict[str, Any] = {}


def load(name: str = "unit", url: str | None = None) -> optuna.Study:
    """The study, through one storage per database (building a storage is costly; tests poll often)."""
    if url is None:
        url = f"sqlite:///{Path(default_storage_url(name)[len('sqlite:///') :]).resolve()}"
    if url not in _STORAGES:
        _STORAGES[url] = open_storage(url)
    return optuna.load_study(study_name=name, storage=_STORAGES[url])


def trials_so_far(name: str = "unit") -> list[FrozenTrial]:
    """The study's trials while ``spkid-search run`` works on it ([] before it has created it)."""
    if not Path(default_storage_url(name)[len("sqlite:///") :]).is_file():
        return []
    try:
        return load(name).get_trials(deepcopy=False)
    except KeyError:  # the file is there, the study not yet
        return []


def status_dir(root: Path, study: str = "unit") -> Path:
    return root / "studies" / study / "workers" / socket.gethostname()


def retry_of(trials: list[FrozenTrial], number: int) -> FrozenTrial | None:
    """The trial Optuna queued to retry trial ``number`` (its retry history ends with it)."""
    for t in trials:
        history = t.system_attrs.get("retry_history") or []
        if history and history[-1] == number:
            return t
    return None


def check_no_trial_lost(study: optuna.Study, budget: int, figures: Figures) -> list[FrozenTrial]:
    """Exactly ``budget`` finished trials, nothing RUNNING or WAITING; returns all trials."""
    trials = study.get_trials(deepcopy=False)
    counts = count_trials(trials)
    figures.trials_checked += budget
    figures.trials_lost += max(0, budget - counts.finished)
    assert counts.finished == budget, counts
    assert counts.running == 0 and counts.waiting == 0, counts
    return trials


def check_retried_from_checkpoint(trials: list[FrozenTrial], number: int, min_step: int) -> FrozenTrial:
    """Trial ``number`` was retried with its parameters and the retry resumed from a checkpoint."""
    by_number = {t.number: t for t in trials}
    retry = retry_of(trials, number)
    assert retry is not None, f"trial {number} was never retried"
    assert retry.params == by_number[number].params
    if retry.state == TrialState.FAIL:  # killed again: its own retry must have resumed
        return check_retried_from_checkpoint(trials, retry.number, min_step)
    assert retry.state in FINISHED, (retry.number, retry.state)
    assert retry.user_attrs["resumed_from_step"] >= min_step, (number, retry.user_attrs)
    return retry


# --------------------------------------------------------------------------------------------------
# SIGKILL
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.deadline(240)
def test_kill9_random_worker_five_times_during_twenty_trials(
    tmp_path: Path, tiny_dir: Path, cli: Any, figures: Figures
) -> None:
    space = write_space(tmp_path / "unit.yaml", steps=120, valid_steps=30)
    run = cli(
        *("run", "--space", str(space), "--trials", "20", "--data", str(tiny_dir)),
        *("--workers", "2", "--heartbeat", "1", "--quiet"),
    )
    rng = random.Random(20)
    killed: dict[int, int] = {}  # trial number -> the step its worker had reported
    chain_kills: dict[int, int] = {}  # original trial -> times its line was killed (Optuna retries 3)
    dead_pids: set[int] = set()
    spared: set[int] = set()  # trials whose line was killed twice already, or that just ended
    kills = 0  # every SIGKILL sent, including one that lands just after its trial ended

    def victims(exclude: set[int] = spared) -> list[dict[str, Any]]:
        return [
            s
            for s in read_status(status_dir(tmp_path))
            if isinstance(s.get("step"), int)
            and 60 <= s["step"] < 90  # past its second checkpoint (30 and 60), 30+ steps to go
            and not s.get("done")
            and s["pid"] not in dead_pids
            and s["trial"] not in killed
            and s["trial"] not in exclude
            and pid_alive(s["pid"])
        ]

    while len(killed) < 5:
        victim = rng.choice(wait_for(victims, 120, "a worker past its second checkpoint", poll=0.05))
        trial = trials_so_far()[victim["trial"]]
        root = int(trial.system_attrs.get("failed_trial", trial.number))
        if chain_kills.get(root, 0) >= 2 or trial.state != TrialState.RUNNING:
            spared.add(victim["trial"])
            continue
        if victim not in victims(set()):  # it moved on while we looked the trial up
            continue
        os.kill(victim["pid"], signal.SIGKILL)
        kills += 1
        dead_pids.add(victim["pid"])
        if trials_so_far()[victim["trial"]].state == TrialState.RUNNING:  # died mid-trial
            killed[victim["trial"]] = victim["step"]
            chain_kills[root] = chain_kills.get(root, 0) + 1
        else:
            spared.add(victim["trial"])
    figures.fault("SIGKILL of a worker", kills)

    assert run.wait(timeout=180) == 0, run.output()
    out = run.output()
    assert "Traceback" not in out, out
    assert out.count("restarting it") == kills, out
    study = load()
    trials = check_no_trial_lost(study, 20, figures)
    failed = {t.number for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("skipped")}
    assert set(killed) <= failed, (failed, killed)
    for number in failed:  # no failure other than a kill, and every killed trial came back
        assert retry_of(trials, number) is not None, (number, failed)
    for number, step in killed.items():
        # The driver saw the kill: the trial says so (status said "no reason recorded" before).
        assert "was killed by SIGKILL" in trials[number].user_attrs["fail_reason"], trials[number].user_attrs
        check_retried_from_checkpoint(trials, number, 30)
        direct = retry_of(trials, number)
        if direct is not None and direct.state in FINISHED:  # from a checkpoint written before the kill
            assert direct.user_attrs["resumed_from_step"] <= step, (number, step, direct.user_attrs)
    with sqlite3.connect(tmp_path / "studies/unit/study.db") as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    print(
        f"{kills} SIGKILLs, trials {sorted(killed)} killed mid-run and resumed from checkpoints; 20/20 done"
    )


@pytest.mark.slow
@pytest.mark.deadline(150)
def test_a_worker_that_keeps_dying_is_restarted_a_bounded_number_of_times(
    tmp_path: Path, tiny_dir: Path, figures: Figures
) -> None:
    """Say the OOM killer takes every worker: the driver restarts it ``max_respawns`` times, then stops
    with one line instead of looping (or, as before, reporting success with nothing done)."""
    space = write_space(tmp_path / "unit.yaml", steps=2000, valid_steps=50)
    killed: list[int] = []
    done = threading.Event()

    def killer() -> None:
        while not done.is_set() and len(killed) < 2:
            for s in read_status(status_dir(tmp_path)):
                if s.get("trial") is not None and s["pid"] not in killed and pid_alive(s["pid"]):
                    os.kill(s["pid"], signal.SIGKILL)
                    killed.append(s["pid"])
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with pytest.raises(
            UserError, match=r"worker w0 was killed by SIGKILL \(1 restarts used\); .* resume"
        ):
            run(
                RunOptions(
                    space=str(space), trials=2, data=tiny_dir, heartbeat=1, display=False, max_respawns=1
                )
            )
    finally:
        done.set()
        thread.join(timeout=10)
    figures.fault("SIGKILL of a worker (past the restart limit)", len(killed))
    assert len(killed) == 2


# --------------------------------------------------------------------------------------------------
# PostgreSQL restarted mid-study
# --------------------------------------------------------------------------------------------------


def _pg_cluster() -> tuple[str, str] | None:
    ctl = shutil.which("pg_ctlcluster")
    conf = Path("/etc/postgresql")
    if ctl is None or os.geteuid() != 0 or not conf.is_dir():
        return None
    versions = sorted(p.name for p in conf.iterdir() if (p / "main").is_dir())
    return (ctl, versions[-1]) if versions else None


def _pg_finished(url: str) -> int:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2) as con:
            row = con.execute("SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')").fetchone()
            return int(row[0]) if row else 0
    except Exception:  # noqa: BLE001 - not created yet, or restarting
        return 0


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.deadline(240)
def test_three_workers_ride_out_a_postgresql_restart(
    tmp_path: Path, tiny_dir: Path, cli: Any, pg_database: str, figures: Figures
) -> None:
    cluster = _pg_cluster()
    if cluster is None:
        pytest.skip("cannot restart the local PostgreSQL server here (needs pg_ctlcluster and root)")
    ctl, version = cluster
    space = write_space(tmp_path / "unit.yaml", steps=120, valid_steps=30)
    run = cli(
        *("run", "--space", str(space), "--trials", "6", "--data", str(tiny_dir), "--study", "pgrel"),
        *("--storage", pg_database, "--workers", "3", "--heartbeat", "1", "--quiet"),
    )
    try:

        def mid_study() -> bool:
            training = [s for s in read_status(status_dir(tmp_path, "pgrel")) if s.get("step", 0) >= 30]
            return bool(training) and _pg_finished(pg_database) >= 2

        wait_for(mid_study, 150, "two finished trials and one mid-training", poll=0.2)
        restart = subprocess.run(
            [ctl, "--skip-systemctl-redirect", version, "main", "restart"],
            capture_output=True,
            text=True,
            timeout=90,
        )
        if restart.returncode != 0:  # the fault could not be injected here: not a finding about the tool
            pytest.skip(f"could not restart PostgreSQL with pg_ctlcluster: {restart.stderr.strip()[:200]}")
        figures.fault("PostgreSQL restart", 1)
        assert run.wait(timeout=180) == 0, run.output()
    finally:
        if not postgres_answers():
            subprocess.run([ctl, "--skip-systemctl-redirect", version, "main", "start"], timeout=90)
        wait_for(postgres_answers, 60, "PostgreSQL to answer after the test", 0.5)
    out = run.output()
    assert "Traceback" not in out, out
    study = load("pgrel", pg_database)
    trials = check_no_trial_lost(study, 6, figures)
    assert len({t.user_attrs.get("worker") for t in trials}) >= 2
    hit = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get("skipped")]
    for t in hit:  # a trial cut off by the restart went stale and was retried, not dropped
        assert retry_of(trials, t.number) is not None, (t.number, t.user_attrs)
    print(f"PostgreSQL restarted mid-study: {len(hit)} trial(s) retried, 6/6 finished")


# --------------------------------------------------------------------------------------------------
# The artifact store breaks: full disk, read-only, not a folder
# --------------------------------------------------------------------------------------------------


def _mount_tmpfs(target: Path, size: str) -> bool:
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(target)],
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _remount(target: Path, mode: str) -> None:
    """Remount ``target`` read-only or read-write.

    A read-only remount fails ("mount point is busy") while any file there is open for writing, which
    is the case for the few milliseconds a worker writes a checkpoint: try again, briefly.
    """
    for _ in range(100):
        done = subprocess.run(
            ["mount", "-o", f"remount,{mode}", str(target)], capture_output=True, timeout=20
        )
        if done.returncode == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"cannot remount {target} {mode}: {done.stderr.decode(errors='replace').strip()}")


class DiskFull:
    reason = "No space left on device"

    def __init__(self, disk: Path) -> None:
        self.filler = disk / "filler"

    def break_(self) -> None:
        with open(self.filler, "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()

    def repair(self) -> None:
        self.filler.unlink(missing_ok=True)


class ReadOnly:
    reason = "Read-only file system"

    def __init__(self, disk: Path) -> None:
        self.disk = disk
        self.broken = False

    def break_(self) -> None:
        _remount(self.disk, "ro")
        self.broken = True

    def repair(self) -> None:
        if self.broken:
            _remount(self.disk, "rw")
            self.broken = False


class NotAFolder:
    reason = "Not a directory"

    def __init__(self, store: Path) -> None:
        self.store = store
        self.away = store.with_name(store.name + ".away")

    def break_(self) -> None:
        self.store.rename(self.away)
        self.store.write_text("a file where the artifact folder was\n")

    def repair(self) -> None:
        if self.away.exists():
            self.store.unlink(missing_ok=True)
            self.away.rename(self.store)


@pytest.mark.slow
@pytest.mark.deadline(200)
def test_broken_artifact_store_fails_one_trial_each_and_study_goes_on(
    tmp_path: Path, tiny_dir: Path, cli: Any, figures: Figures
) -> None:

    space = write_space(tmp_path / "unit.yaml", steps=60, valid_steps=20)
    disk = tmp_path / "artifact-disk"
    disk.mkdir()
    mounted = _mount_tmpfs(disk, "1m")
    store = disk / "store"
    store.mkdir()
    home = tmp_path / "studies" / "unit"
    home.mkdir(parents=True)
    (home / "artifacts").symlink_to(store)  # the study records the resolved folder: the small disk
    faults: list[Any] = [ReadOnly(disk)] if mounted else []
    faults.append(NotAFolder(store))
    try:
        faults[0].break_()
        run = cli(
            *("run", "--space", str(space), "--trials", "3", "--data", str(tiny_dir)),
            *("--workers", "2", "--max-failures", "10", "--quiet"),
        )
        seen: set[int] = set()
        for i, fault in enumerate(faults):
            if i:
                fault.break_()

            def failed_by(fault: Any = fault) -> FrozenTrial | None:
                for t in trials_so_far():
                    if t.number not in seen and fault.reason in str(t.user_attrs.get("fail_reason")):
                        return t
                return None

            trial = wait_for(failed_by, 120, f"a trial to fail with '{fault.reason}'", poll=0.25)
            seen.add(trial.number)
            fault.repair()
            figures.fault(f"artifact store: {fault.reason}", 1)
        assert run.wait(timeout=120) == 0, run.output()
        assert "Traceback" not in run.output()

        study = load()
        trials = check_no_trial_lost(study, 3, figures)
        failed = [t for t in trials if t.state == TrialState.FAIL]
        reasons = [str(t.user_attrs.get("fail_reason")) for t in failed]
        for fault in faults:  # each fault failed the trial(s) that met it, with the reason
            assert any(fault.reason in r for r in reasons), (fault.reason, reasons)
        for t, reason in zip(failed, reasons, strict=True):
            assert "checkpoint could not be stored" in reason, reason
            root = int(t.system_attrs.get("failed_trial", t.number))
            assert not (home / "trials" / f"{root:05d}").exists()  # its folder was freed
        check_store_holds_the_finished_checkpoints(study, store, tmp_path / "export")
    finally:
        for fault in reversed(faults):
            with contextlib.suppress(Exception):
                fault.repair()
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], timeout=20)
    reasons = [f.reason for f in faults]
    print(f"artifact store faults {reasons}: one FAIL each, 3/3 finished, export verified")


def check_store_holds_the_finished_checkpoints(study: optuna.Study, store: Path, export: Path) -> None:
    """The store holds exactly the finished trials' checkpoints, whole (no partial or temporary file),
    and they export and verify."""
    from search.export import export_top
    from search.manifest import read_manifest, verify_members

    done = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]
    stored = sorted(p.name for p in store.iterdir())
    assert stored == sorted(t.user_attrs["checkpoint_artifact"] for t in done), stored
    for t in done:
        assert sha256_file(store / t.user_attrs["checkpoint_artifact"]) == t.user_attrs["checkpoint_sha256"]
    result = export_top(study, len(done), out=export)
    assert {m.trial for m in result.members} == {t.number for t in done}
    verify_members(export, read_manifest(export))


@pytest.mark.slow
@pytest.mark.deadline(200)
def test_a_full_disk_stops_the_run_and_the_trials_it_cut_off_resume(
    tmp_path: Path, tiny_dir: Path, cli: Any, figures: Figures
) -> None:
    """No trial can keep its checkpoint on a full disk: the run stops with one line naming the file, and
    after space is freed the same command resumes the trials it cut off. (It failed every trial after
    it instead, 101 in an audit's run, 39 of them as "unexpected pos N vs M" from torch.save.)"""
    space = write_space(tmp_path / "unit.yaml", steps=60, valid_steps=20)
    disk = tmp_path / "artifact-disk"
    disk.mkdir()
    if not _mount_tmpfs(disk, "1m"):
        pytest.skip("needs root to mount a small tmpfs as a disk that fills up")
    store = disk / "store"
    store.mkdir()
    home = tmp_path / "studies" / "unit"
    home.mkdir(parents=True)
    (home / "artifacts").symlink_to(store)
    full = DiskFull(disk)
    argv = ["run", "--space", str(space), "--trials", "3", "--data", str(tiny_dir)]
    argv += ["--workers", "2", "--quiet"]
    try:
        full.break_()
        stopped = cli(*argv)
        assert stopped.wait(timeout=120) == 2, stopped.output()
        out = stopped.output()
        figures.fault("artifact store: No space left on device", 1)
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1, out
        assert "No space left on device" in out and str(store) in out and "run the same command again" in out
        trials = trials_so_far()
        cut = [
            t
            for t in trials
            if t.state == TrialState.FAIL
            and "no space left on device" in str(t.user_attrs.get("fail_reason"))
        ]
        assert cut
        assert not [t for t in trials if t.state == TrialState.FAIL and t not in cut]  # no other failure
        for t in cut:  # queued to resume, its checkpoints kept for it
            assert retry_of(trials, t.number) is not None
            root = int(t.system_attrs.get("failed_trial", t.number))
            assert (home / "trials" / f"{root:05d}" / f"{t.number:05d}" / "last.pt").is_file()
        full.repair()
        again = cli(*argv)
        assert again.wait(timeout=120) == 0, again.output()
        study = load()
        trials = check_no_trial_lost(study, 3, figures)
        for t in cut:  # trained to the end before the upload failed: the retry only uploads
            check_retried_from_checkpoint(trials, t.number, min_step=60)
        check_store_holds_the_finished_checkpoints(study, store, tmp_path / "export")
        assert not any((home / "trials").iterdir())
    finally:
        full.repair()
        subprocess.run(["umount", "-l", str(disk)], timeout=20)


# --------------------------------------------------------------------------------------------------
# SIGTERM and Ctrl-C
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.deadline(200)
def test_sigterm_then_ctrl_c_stop_cleanly_and_the_study_resumes_to_the_exact_count(
    tmp_path: Path, tiny_dir: Path, cli: Any, figures: Figures
) -> None:
    space = write_space(tmp_path / "unit.yaml", steps=120, valid_steps=30)
    args: tuple[str, ...] = ("run", "--space", str(space), "--trials", "3", "--data", str(tiny_dir))
    args += ("--workers", "2", "--heartbeat", "1", "--quiet")
    seen: dict[int, int] = {}  # trial -> step it had reached (past a checkpoint) when the signal went
    interrupted: set[int] = set()
    for how in ("SIGTERM to the driver", "Ctrl-C to the process group"):
        proc = cli(*args)

        def past_checkpoint() -> dict[str, Any] | None:
            for s in read_status(status_dir(tmp_path)):
                if 60 <= s.get("step", 0) < 120 and not s.get("done") and pid_alive(s["pid"]):
                    return s
            return None

        state = wait_for(past_checkpoint, 120, "a worker past its second checkpoint", poll=0.05)
        if how.startswith("SIGTERM"):
            proc.signal_parent(signal.SIGTERM)  # what kill, systemd and docker stop send
        else:
            proc.signal_group(signal.SIGINT)  # what a terminal's Ctrl-C sends: driver and workers
        seen[state["trial"]] = state["step"]
        figures.fault(how, 1)
        assert proc.wait(timeout=90) == (143 if how.startswith("SIGTERM") else 130), proc.output()
        out = proc.output()
        assert "Traceback" not in out and "resume" in out, out
        trials = load().get_trials(deepcopy=False)
        assert count_trials(trials).running == 0
        now = {
            t.number
            for t in trials
            if t.state == TrialState.FAIL and "interrupted" in str(t.user_attrs.get("fail_reason"))
        }
        assert now - interrupted, f"{how}: no trial was marked interrupted"
        for number in now - interrupted:  # each is queued to resume
            retry = retry_of(trials, number)
            assert retry is not None and retry.state == TrialState.WAITING, (number, retry)
        interrupted |= now

    last = cli(*args)
    assert last.wait(timeout=150) == 0, last.output()
    trials = check_no_trial_lost(load(), 3, figures)
    for number in interrupted:
        check_retried_from_checkpoint(trials, number, 0)
    for number in seen:  # the trials seen past a checkpoint resumed from one, not from step 0
        check_retried_from_checkpoint(trials, number, 30)
    print(f"SIGTERM then Ctrl-C: trials {sorted(interrupted)} interrupted and resumed; 3/3 finished")
