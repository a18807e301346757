"""The search service end to end on CPU: exact budgets, pruning, resume, SIGKILL, Ctrl-C, PostgreSQL."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import optuna
import pytest
import sqlalchemy
import yaml
from optuna.trial import TrialState

import search.study as study_module
from search.cli import main
from search.errors import UserError
from search.space import load_space
from search.storage import artifact_store, default_storage_url, open_storage
from search.study import RunOptions, count_trials, effective_steps, identity_changes, run, sha256_file
from tests.spaces import UNIT_SPACE

SPACE = UNIT_SPACE


def write_space(path: Path, **params: object) -> Path:
    space = {**SPACE, "params": {**SPACE["params"], **params}}  # type: ignore[dict-item]
    path.write_text(yaml.safe_dump(space))
    return path


def load(name: str = "unit", url: str | None = None) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url or default_storage_url(name)))


def states(study: optuna.Study) -> dict[TrialState, int]:
    out: dict[TrialState, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state] = out.get(t.state, 0) + 1
    return out


def test_sqlite_workers_reach_exact_count_with_pruning_then_resume(tmp_path: Path, tiny_dir: Path) -> None:
    space = write_space(tmp_path / "unit.yaml")
    counts = run(RunOptions(space=str(space), trials=6, data=tiny_dir, workers=2, heartbeat=2, display=False))
    study = load()
    assert counts.finished == 6
    by_state = states(study)
    assert by_state.get(TrialState.COMPLETE, 0) + by_state.get(TrialState.PRUNED, 0) == 6
    assert by_state.get(TrialState.PRUNED, 0) >= 1, by_state
    trials = study.get_trials(deepcopy=False)
    table = [
        (t.number, t.state.name, t.user_attrs.get("skipped"), t.user_attrs.get("fail_reason")) for t in trials
    ]
    # No lock errors: a FAIL may only be a trial whose heartbeat went stale under load (retried), never
    # a real failure; and no trial is created past the budget (limit_new_trials), so none is skipped.
    assert TrialState.RUNNING not in by_state and count_trials(trials).failed == 0, table
    assert not [t for t in trials if study_module.is_skipped(t) and "failed_trial" not in t.system_attrs], (
        table
    )
    store = artifact_store(study)
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        assert t.user_attrs["config"]["d_model"] == t.params["d_model"]
        for key in ("parameters", "steps_per_s", "device", "best_step", "valid_acc", "checkpoint_sha256"):
            assert key in t.user_attrs, key
        assert t.user_attrs["step_mode"] == "eager"  # cuda_graph is on by default, and ignored on CPU
        fetched = tmp_path / f"ckpt-{t.number}.pt"
        optuna.artifacts.download_artifact(
            artifact_store=store, file_path=str(fetched), artifact_id=t.user_attrs["checkpoint_artifact"]
        )
        assert sha256_file(fetched) == t.user_attrs["checkpoint_sha256"]
        ckpt = __import__("torch").load(fetched, weights_only=True)
        assert ckpt["config"] == t.user_attrs["config"]
    assert study.user_attrs["fingerprint"] and study.user_attrs["split_id"]

    # Re-running with a larger budget resumes to exactly the new total; the same budget does nothing.
    assert run(RunOptions(space=str(space), trials=8, data=tiny_dir, workers=2, display=False)).finished == 8
    assert run(RunOptions(space=str(space), trials=8, data=tiny_dir, display=False)).finished == 8
    assert len(load().get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 8


def test_changed_data_or_space_is_refused(tmp_path: Path, tiny_dir: Path, fake_dir: Path) -> None:
    space = write_space(tmp_path / "unit.yaml")
    run(RunOptions(space=str(space), trials=1, data=tiny_dir, display=False))
    with pytest.raises(UserError, match="another data set.*--allow-changed"):
        run(RunOptions(space=str(space), trials=2, data=fake_dir, display=False))
    write_space(tmp_path / "unit.yaml", layers={"low": 1, "high": 2})
    with pytest.raises(UserError, match="another search space"):
        run(RunOptions(space=str(space), trials=2, data=tiny_dir, display=False))
    assert (
        run(RunOptions(space=str(space), trials=2, data=tiny_dir, allow_changed=True, display=False)).finished
        == 2
    )


def _trained_steps(study: optuna.Study) -> list[int]:
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    return [t.user_attrs["config"]["steps"] for t in finished]


def test_steps_override_is_recorded_and_a_different_one_refused(tmp_path: Path, tiny_dir: Path) -> None:
    space = str(write_space(tmp_path / "unit.yaml"))  # the space trains 60 steps
    assert run(RunOptions(space=space, trials=1, data=tiny_dir, steps=20, display=False)).finished == 1
    assert load().user_attrs["steps_override"] == 20 and _trained_steps(load()) == [20]
    # Another budget would rank 20-step trials against 60-step ones: refused before any worker starts.
    with pytest.raises(UserError, match=r"^--steps: .*with --steps 20, this run asks for the space's own"):
        run(RunOptions(space=space, trials=2, data=tiny_dir, display=False))
    with pytest.raises(UserError, match=r"--steps 20, .* --steps 30; use the same value, a new --study"):
        run(RunOptions(space=space, trials=2, data=tiny_dir, steps=30, display=False))
    assert len(load().get_trials()) == 1
    # The same --steps resumes; --allow-changed goes on with the space's steps and records that instead.
    assert run(RunOptions(space=space, trials=2, data=tiny_dir, steps=20, display=False)).finished == 2
    opts = RunOptions(space=space, trials=3, data=tiny_dir, allow_changed=True, display=False)
    assert run(opts).finished == 3
    assert load().user_attrs["steps_override"] is None and sorted(_trained_steps(load())) == [20, 20, 60]
    with pytest.raises(
        UserError, match=r"with the space's own steps \(no --steps\), this run asks for --steps 20;"
    ):
        run(RunOptions(space=space, trials=4, data=tiny_dir, steps=20, display=False))


def test_steps_equal_to_the_space_or_unrecorded_count_as_no_override(tmp_path: Path) -> None:
    space = load_space(write_space(tmp_path / "unit.yaml"))  # steps 60, valid_steps 20
    assert effective_steps(space, None) is None and effective_steps(space, 60) is None
    assert effective_steps(space, 40) == 40
    searched = load_space(write_space(tmp_path / "searched.yaml", steps={"choices": [60, 120]}))
    assert effective_steps(searched, 60) == 60  # it fixes a budget the space would have searched
    # A study from before the override was recorded: no attribute, read as "no --steps".
    old = {"fingerprint": "f", "split_id": "s", "space_digest": "d", "space_path": "p", "data_root": "r"}
    study = cast(optuna.Study, SimpleNamespace(study_name="old", user_attrs=old))
    assert identity_changes(study, {**old, "steps_override": None}, allow_changed=False) == {}
    with pytest.raises(UserError, match="space's own steps \\(no --steps\\), this run asks for --steps 40"):
        identity_changes(study, {**old, "steps_override": 40}, allow_changed=False)
    changed = identity_changes(study, {**old, "steps_override": 40}, allow_changed=True)
    assert changed == {"steps_override": 40}


def test_run_on_a_study_that_holds_enough_trials_says_so_and_starts_nothing(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    space = str(write_space(tmp_path / "unit.yaml", steps=20, valid_steps=20))
    assert run(RunOptions(space=space, trials=2, data=tiny_dir, display=False)).finished == 2
    capsys.readouterr()

    def no_workers(*args: object, **kwargs: object) -> None:
        raise AssertionError("a worker was started")

    monkeypatch.setattr(study_module.mp, "get_context", no_workers)
    handler = signal.getsignal(signal.SIGTERM)  # main() installs its own; put the test runner's back
    try:
        code = main(["run", "--space", space, "--trials", "1", "--data", str(tiny_dir)])
    finally:
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert lines == [
        "study 'unit' already has 2 finished trials (>= --trials 1); nothing to do: raise --trials to run "
        "more"
    ]
    assert len(load().get_trials()) == 2


def test_bad_config_trial_fails_with_reason_and_study_goes_on(tmp_path: Path, tiny_dir: Path) -> None:
    space = write_space(
        tmp_path / "unit.yaml", heads={"choices": [2, 3]}, d_model={"low": 16, "high": 32, "step": 16}
    )
    counts = run(RunOptions(space=str(space), trials=4, data=tiny_dir, display=False))
    study = load()
    assert counts.finished == 4
    failed = study.get_trials(states=(TrialState.FAIL,))
    for t in failed:
        assert "divisible by heads" in t.user_attrs["fail_reason"]
    assert all(
        t.params["d_model"] % t.params["heads"] == 0
        for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    )


def _cli(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "search.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for_step(status_dir: Path, min_step: int, timeout: float) -> dict[str, object]:
    import json

    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in status_dir.glob("*.json"):
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(state.get("step"), int) and state["step"] >= min_step and not state.get("done"):
                return state
        time.sleep(0.2)
    raise AssertionError(f"no worker reached step {min_step} within {timeout}s")


def _kill_worker_once(
    proc: subprocess.Popen[str], ready: Callable[[], list[dict[str, object]]]
) -> tuple[list[dict[str, object]], str]:
    """SIGKILL the worker process of the states ``ready()`` returns; the run must still end with 0."""
    try:
        victims = ready()
        os.kill(int(victims[0]["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    return victims, out


def test_sigkill_worker_trial_is_retried_and_resumed(tmp_path: Path, tiny_dir: Path) -> None:
    space = write_space(tmp_path / "unit.yaml", steps=400, valid_steps=50)
    data = yaml.safe_load(space.read_text())
    data["pruner"] = {"name": "none"}
    space.write_text(yaml.safe_dump(data))
    proc = _cli(
        "run",
        "--space",
        str(space),
        "--trials",
        "3",
        "--data",
        str(tiny_dir),
        "--workers",
        "2",
        "--heartbeat",
        "1",
        "--quiet",
        cwd=tmp_path,
    )
    status = tmp_path / "studies/unit/workers" / socket.gethostname()
    [victim], out = _kill_worker_once(proc, lambda: [_wait_for_step(status, 120, timeout=120)])
    study = load()
    by_state = states(study)
    assert by_state.get(TrialState.COMPLETE) == 3 and TrialState.RUNNING not in by_state, by_state
    killed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in killed] == [victim["trial"]]
    retries = [
        t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") == victim["trial"]
    ]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed[0].params
    assert retries[0].user_attrs["resumed_from_step"] >= 100  # from its last checkpoint, not step 0
    assert "failed 0, retried 1" in " ".join(out.split()), out  # the summary tells the two apart


def _long_space(tmp_path: Path) -> Path:
    """Trials long enough to stop midway (400 steps, a checkpoint every 50), none pruned."""
    data = {
        **SPACE,
        "params": {**SPACE["params"], "steps": 400, "valid_steps": 50},
        "pruner": {"name": "none"},
    }
    space = tmp_path / "unit.yaml"
    space.write_text(yaml.safe_dump(data))
    return space


def _ctrl_c_once(proc: subprocess.Popen[str], ready: Callable[[], object]) -> str:
    """Send SIGINT once ``ready()`` returns; the run must exit 130 without a traceback. Its output."""
    try:
        ready()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert "Traceback" not in out, out
    return out


def test_ctrl_c_stops_cleanly_and_resumes(tmp_path: Path, tiny_dir: Path) -> None:
    space = _long_space(tmp_path)
    args = ("run", "--space", str(space), "--trials", "2", "--data", str(tiny_dir), "--quiet")
    status = tmp_path / "studies/unit/workers" / socket.gethostname()
    out = _ctrl_c_once(_cli(*args, cwd=tmp_path), lambda: _wait_for_step(status, 120, timeout=120))
    assert "resume" in out
    study = load()
    by_state = states(study)
    assert TrialState.RUNNING not in by_state
    assert by_state.get(TrialState.WAITING) == 1  # the interrupted trial is queued to resume
    resumed = _cli(*args, cwd=tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    done = load().get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 2
    assert any(t.user_attrs["resumed_from_step"] >= 100 for t in done)
    # The retry inherits its original's attrs; the ones that described the stop are cleared.
    assert not any(t.user_attrs.get("interrupted") or t.user_attrs.get("fail_reason") for t in done)


def test_lanes_run_several_trials_in_one_worker_process(tmp_path: Path, tiny_dir: Path) -> None:
    """What --per-gpu K does on a GPU (K trials as threads of one worker), exercised on CPU."""
    space = write_space(tmp_path / "unit.yaml")
    counts = run(RunOptions(space=str(space), trials=5, data=tiny_dir, lanes=2, display=False))
    assert counts.finished == 5
    trials = load().get_trials(deepcopy=False)
    assert TrialState.RUNNING not in states(load()) and count_trials(trials).failed == 0
    assert {
        t.user_attrs["worker"] for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    } == {
        "w0.0",
        "w0.1",
    }
    lanes = study_module.read_status(tmp_path / "studies/unit/workers" / socket.gethostname())
    assert sorted(w["worker"] for w in lanes) == ["w0.0", "w0.1"]
    assert len({w["pid"] for w in lanes}) == 1  # one process
    # Each lane samples on its own: no two lanes (or a lane and a single worker) share a sampler seed.
    assert len({tuple(sorted(t.params.items())) for t in trials}) == len(trials)


def test_per_gpu_without_a_gpu_says_it_has_no_effect(
    tmp_path: Path, tiny_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    from search.devices import visible_gpus

    if visible_gpus():
        pytest.skip("a GPU is visible: --per-gpu applies")
    space = write_space(tmp_path / "unit.yaml")
    assert run(RunOptions(space=str(space), trials=1, data=tiny_dir, per_gpu=2, display=False)).finished == 1
    err = " ".join(capfd.readouterr().err.split())
    assert "no GPU visible: --per-gpu 2 has no effect; --workers N runs N CPU trials at once" in err
    assert {t.user_attrs["worker"] for t in load().get_trials()} == {"w0"}  # one CPU worker, as without it


def test_compile_is_refused_with_several_trials_per_process(tmp_path: Path, tiny_dir: Path) -> None:
    for params in ({"compile": True}, {"compile": {"choices": [False, True]}}):
        space = write_space(tmp_path / "unit.yaml", **params)
        with pytest.raises(UserError, match=r"unit.yaml: 'compile' cannot run with --per-gpu 2.*--per-gpu 1"):
            run(RunOptions(space=str(space), trials=1, data=tiny_dir, lanes=2, display=False))
    assert not (tmp_path / "studies").exists()  # refused before anything was written


_LANES_RUN = """
import sys
from pathlib import Path
from search.study import RunOptions, run
space, data, heartbeat = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
try:
    run(RunOptions(space=space, trials=2, data=data, lanes=2, heartbeat=heartbeat, display=False))
except KeyboardInterrupt:
    sys.exit(130)
"""


def _sqlite_state_lock(tmp_path: Path) -> str:
    """ "held" or "free": whether another worker could take the study's state lock now."""
    import fcntl

    fd = os.open(tmp_path / "studies/unit/study.db.state-lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what another worker's budget count takes
        return "free"
    except BlockingIOError:
        return "held"
    finally:
        os.close(fd)  # releases it again


def _worker_here(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[study_module.WorkerSpec, list[str]]:
    """A worker to run in this process and thread, on a study that holds one trial of a budget of two.

    Also returns what its ``queue_retry`` calls found the state lock to be at their start ("held" by
    the worker, or "free": another worker's budget count could have run right then).
    """
    import torch

    from search.data import open_data

    space = _long_space(tmp_path)
    run(RunOptions(space=str(space), trials=1, data=tiny_dir, display=False))  # the study, its attrs
    spec = study_module.WorkerSpec(
        worker="w9",
        index=9,
        device="cpu",
        storage_url=default_storage_url("unit"),
        study_name="unit",
        space_path=str(space),
        cache_dir=str(open_data(tiny_dir, progress=False).cache_dir),
        data_root=str(tiny_dir),
        trials=2,
        steps=None,
        seed=0,
        heartbeat=20,
        grace=60,
        status_dir=str(tmp_path),
        threads=torch.get_num_threads(),
        max_failures=3,
    )
    # Keep pytest's signal handlers and Optuna's globals as they are.
    monkeypatch.setattr(study_module, "_install_worker_signals", lambda: None)
    monkeypatch.setattr(study_module, "_STATE_LOCK", {})
    monkeypatch.setitem(study_module._STOP, "requested", False)
    monkeypatch.setattr(optuna.storages, "fail_stale_trials", optuna.storages.fail_stale_trials)
    monkeypatch.setattr(optuna.logging, "set_verbosity", lambda level: None)
    lock_seen: list[str] = []
    queue_retry = study_module.queue_retry

    def probe_then_queue(
        study: optuna.Study, frozen: optuna.trial.FrozenTrial, max_retry: int | None = 3
    ) -> None:
        lock_seen.append(_sqlite_state_lock(tmp_path))
        queue_retry(study, frozen, max_retry)

    monkeypatch.setattr(study_module, "queue_retry", probe_then_queue)
    return spec, lock_seen


def test_a_stopped_trial_is_failed_and_queued_again_in_one_step(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between Optuna's FAIL of a trial stopped by Ctrl-C and its retry's queueing, the worker keeps the
    state lock: no other worker can count the trial's budget place as free in between."""
    spec, lock_seen = _worker_here(tmp_path, tiny_dir, monkeypatch)

    def stop_at_step_100() -> None:
        _wait_for_step(tmp_path, 100, timeout=120)
        study_module._STOP["requested"] = True  # what the SIGTERM handler sets

    stopper = threading.Thread(target=stop_at_step_100, daemon=True)
    stopper.start()
    assert study_module.worker_main(spec) == 130
    stopper.join(5)
    assert lock_seen == ["held"]
    by_state = states(load())
    assert by_state.get(TrialState.FAIL) == 1 and by_state.get(TrialState.WAITING) == 1, by_state
    assert _sqlite_state_lock(tmp_path) == "free"  # released at the end


def test_a_trial_cut_off_by_the_storage_is_failed_and_queued_again_in_one_step(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    import search.train

    spec, lock_seen = _worker_here(tmp_path, tiny_dir, monkeypatch)
    real_train = search.train.train
    calls: list[int] = []

    def storage_fails_once(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:  # as if the database went away while the trial trained
            raise sqlalchemy.exc.OperationalError(
                "UPDATE", {}, sqlite3.OperationalError("database is locked")
            )
        return real_train(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(search.train, "train", storage_fails_once)
    assert study_module.worker_main(spec) == 0
    assert lock_seen == ["held"]
    study = load()
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and "database is locked" in failed[0].user_attrs["fail_reason"]
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 2 and any(t.system_attrs.get("failed_trial") == failed[0].number for t in done)
    assert _sqlite_state_lock(tmp_path) == "free"


def _lanes_run(tmp_path: Path, tiny_dir: Path, heartbeat: int) -> tuple[list[str], dict[str, str]]:
    """Two 400-step trials, two lanes of one CPU worker (what --per-gpu 2 does on a GPU)."""
    space = _long_space(tmp_path)
    command = [sys.executable, "-c", _LANES_RUN, str(space), str(tiny_dir), str(heartbeat)]
    return command, {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _both_lanes_at(status: Path, step: int, timeout: float) -> list[dict[str, object]]:
    deadline = time.time() + timeout
    while True:
        lanes = [w for w in study_module.read_status(status) if int(w.get("step") or 0) >= step]
        if len(lanes) == 2:
            return lanes
        assert time.time() < deadline, f"the two lanes did not both reach step {step}"
        time.sleep(0.2)


def test_ctrl_c_stops_every_lane_and_each_trial_resumes(tmp_path: Path, tiny_dir: Path) -> None:
    command, env = _lanes_run(tmp_path, tiny_dir, heartbeat=20)
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    status = tmp_path / "studies/unit/workers" / socket.gethostname()
    out = _ctrl_c_once(proc, lambda: _both_lanes_at(status, 100, timeout=120))
    by_state = states(load())
    assert TrialState.RUNNING not in by_state
    assert by_state.get(TrialState.WAITING) == 2, (by_state, out)  # both interrupted trials queued to resume
    interrupted = load().get_trials(states=(TrialState.FAIL,))
    assert all(t.user_attrs.get("interrupted") for t in interrupted) and len(interrupted) == 2
    resumed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    done = load().get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 2
    assert all(t.user_attrs["resumed_from_step"] >= 50 for t in done)


def test_sigkill_of_a_worker_with_lanes_retries_and_resumes_each_trial(
    tmp_path: Path, tiny_dir: Path
) -> None:
    command, env = _lanes_run(tmp_path, tiny_dir, heartbeat=1)
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    status = tmp_path / "studies/unit/workers" / socket.gethostname()
    lanes, out = _kill_worker_once(proc, lambda: _both_lanes_at(status, 120, timeout=120))
    assert len({w["pid"] for w in lanes}) == 1  # one process held both trials
    study = load()
    by_state = states(study)
    assert by_state.get(TrialState.COMPLETE) == 2 and TrialState.RUNNING not in by_state, by_state
    killed = {t.number for t in study.get_trials(states=(TrialState.FAIL,))}
    assert killed == {int(w["trial"]) for w in lanes}  # type: ignore[call-overload]
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert t.system_attrs.get("failed_trial") in killed  # each one a retry of a killed trial ...
        assert t.user_attrs["resumed_from_step"] >= 100  # ... resumed from its checkpoint, not step 0


def _postgres_url() -> str | None:
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3):
            return "postgresql://postgres@127.0.0.1:5432"
    except Exception:  # noqa: BLE001 - any failure means: no server to test against
        return None


@pytest.fixture
def pg_database() -> Iterator[str]:
    base = _postgres_url()
    if base is None:
        pytest.skip("no PostgreSQL server answers at 127.0.0.1:5432")
    import psycopg

    name = f"spkid_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    yield f"{base}/{name}"
    with psycopg.connect(f"{base}/postgres", autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.postgres
def test_three_workers_on_postgresql(tmp_path: Path, tiny_dir: Path, pg_database: str) -> None:
    space = write_space(tmp_path / "unit.yaml")
    counts = run(
        RunOptions(
            space=str(space),
            trials=6,
            data=tiny_dir,
            workers=3,
            storage=pg_database,
            heartbeat=2,
            display=False,
        )
    )
    assert counts.finished == 6
    study = load(url=pg_database)
    by_state = states(study)
    assert by_state.get(TrialState.COMPLETE, 0) + by_state.get(TrialState.PRUNED, 0) == 6
    # A trial cut off by a slow heartbeat may be retried (FAIL + requeued); none may fail for real.
    assert TrialState.RUNNING not in by_state and count_trials(study.get_trials()).failed == 0
    # A trial skipped at the budget's edge (or cut off before it started training) names no worker.
    trials = study.get_trials(deepcopy=False)
    done = (TrialState.COMPLETE, TrialState.PRUNED)
    workers = {t.user_attrs.get("worker") for t in trials if t.state in done}
    table = [(t.number, t.state.name, t.system_attrs.get("failed_trial"), t.user_attrs) for t in trials]
    assert None not in workers and len(workers) >= 2, table


def test_wrong_storage_url_and_unknown_study(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="expected sqlite:///"):
        open_storage("mongodb://x")
    with pytest.raises(UserError, match="cannot connect"):
        open_storage("postgresql://nobody:secret@127.0.0.1:1/none")
    try:
        open_storage("postgresql://nobody:secret@127.0.0.1:1/none")
    except UserError as exc:
        assert "secret" not in str(exc)


def test_stale_fail_racing_a_completing_trial_on_sqlite_cannot_both_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker tells its trial COMPLETE while another fails it as stale (a heartbeat late under load).

    SQLite ignores ``SELECT ... FOR UPDATE``: without the state lock both changes succeeded, the trial
    ended COMPLETE and its retry (queued because the FAIL "won") finished too: one trial too many.
    """
    monkeypatch.setattr(study_module, "_STATE_LOCK", {})
    url = f"sqlite:///{tmp_path / 'race.db'}"
    mine, other = open_storage(url), open_storage(url)
    study_module.serialize_state_changes(mine, url)
    study_module.serialize_state_changes(other, url)
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


@pytest.mark.postgres
def test_state_lock_on_postgresql_holds_off_another_machine(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two engines stand for two machines: while one holds the state lock (a stale FAIL and its
    retry's queueing, say), the other's state change waits, and goes through once it is released."""
    monkeypatch.setattr(study_module, "_STATE_LOCK", {})
    here, there = open_storage(pg_database), open_storage(pg_database)
    study_module.serialize_state_changes(here, pg_database)
    lock = study_module._STATE_LOCK["lock"]
    study_module.serialize_state_changes(there, pg_database)
    study = optuna.create_study(storage=here, study_name="lock")
    trial_id = study.ask()._trial_id
    done = threading.Event()

    def complete_elsewhere() -> None:
        there.set_trial_state_values(trial_id, TrialState.COMPLETE, [1.0])
        done.set()

    with lock.hold():
        other = threading.Thread(target=complete_elsewhere)
        other.start()
        assert not done.wait(1.5)  # held off by the lock
        assert here.get_trial(trial_id).state == TrialState.RUNNING
    assert done.wait(10)  # released: the change goes through
    other.join(10)
    assert here.get_trial(trial_id).state == TrialState.COMPLETE
    with lock.hold(), lock.hold():  # reentrant within the process
        pass
    query = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )
    with here.engine.connect() as con:
        assert con.execute(sqlalchemy.text(query)).scalar_one() == 0  # nothing left held
    here.engine.dispose()
    there.engine.dispose()


def test_a_new_trial_is_created_only_while_the_budget_has_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(study_module, "_STATE_LOCK", {})
    url = f"sqlite:///{tmp_path / 'budget.db'}"
    storage = open_storage(url)
    study_module.serialize_state_changes(storage, url)
    study_module.limit_new_trials(storage, 2)
    study = optuna.create_study(storage=storage, study_name="budget")
    study.tell(study.ask(), 1.0)
    running = study.ask()  # holds the second place
    with pytest.raises(study_module.BudgetHeld, match="already holds 2 trials"):
        study.ask()
    assert len(study.get_trials()) == 2  # refused before anything was written
    study.tell(running, state=TrialState.FAIL)  # a real failure frees its place
    assert study.ask().number == 2
    study.enqueue_trial({})  # queued trials (retries, enqueued configs) are never refused ...
    assert study.ask().number == 3  # ... nor is taking one from the queue
    with pytest.raises(study_module.BudgetHeld):
        study.ask()


def test_budget_counts_each_original_once_and_retries_hold_its_place() -> None:
    def make(number: int, state: TrialState, root: int | None = None) -> optuna.trial.FrozenTrial:
        t = optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None)
        t.number = number
        if root is not None:
            t._system_attrs = {"failed_trial": root, "retry_history": [root]}
        return t

    # 0 finished, 1 failed as stale and retried as 3 (queued while new trial 2 was being created).
    trials = [
        make(0, TrialState.COMPLETE),
        make(1, TrialState.FAIL),
        make(2, TrialState.RUNNING),
        make(3, TrialState.WAITING, root=1),
    ]
    assert study_module.held_before(trials, 2) == 2  # 0 and 1's retry: trial 2 is the third
    assert study_module.held_before([*trials, make(4, TrialState.RUNNING)], 4) == 3  # 4 must skip
    assert not study_module.retry_is_redundant(trials, 3, 1)
    # Two retries of 1 (a double stale check) or a retry of a trial that finished: only one may run.
    assert study_module.retry_is_redundant([*trials, make(5, TrialState.RUNNING, root=1)], 5, 1)
    assert study_module.retry_is_redundant([make(1, TrialState.COMPLETE), *trials[2:]], 3, 1)
