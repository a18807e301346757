"""A worker run in the test's own process: how a stop or a storage error ends its trial."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import torch
from optuna.trial import TrialState

import search.states as states_module
import search.study as study_module
import search.worker as worker_module
from search.checkpoint import save_atomic
from search.storage import default_storage_url
from search.study import RunOptions, run
from tests.studies import load, long_space, states, wait_for_step, write_space


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
    tmp_path: Path,
    tiny_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    space: Path | None = None,
    trials: int = 2,
) -> tuple[worker_module.WorkerSpec, list[str]]:
    """A worker to run in this process and thread, with a budget of ``trials``, on a study that ``run``
    has set up but holds no trial yet (default space: :func:`long_space`).

    Also returns what its ``queue_retry`` calls found the state lock to be at their start ("held" by
    the worker, or "free": another worker's budget count could have run right then).
    """
    import torch

    from search.data import open_data

    space = space or long_space(tmp_path)
    with monkeypatch.context() as no_workers:  # the study and its attrs, as run leaves them; no trial
        no_workers.setattr(study_module, "supervise", lambda *args, **kwargs: ({}, 0))
        run(RunOptions(space=str(space), trials=1, data=tiny_dir, display=False))
    spec = worker_module.WorkerSpec(
        worker="w9",
        device="cpu",
        storage_url=default_storage_url("unit"),
        study_name="unit",
        space_path=str(space),
        cache_dir=str(open_data(tiny_dir, progress=False).cache_dir),
        data_root=str(tiny_dir),
        trials=trials,
        steps=None,
        seed=0,
        heartbeat=20,
        grace=60,
        status_dir=str(tmp_path),
        threads=torch.get_num_threads(),
        max_failures=3,
    )
    # Keep pytest's signal handlers and Optuna's globals as they are.
    monkeypatch.setattr(worker_module, "_install_worker_signals", lambda: None)
    monkeypatch.setattr(states_module, "_STATE_LOCK", {})
    monkeypatch.setitem(worker_module._STOP, "requested", False)
    monkeypatch.setitem(worker_module._STOP, "deferred", False)
    monkeypatch.setattr(optuna.storages, "fail_stale_trials", optuna.storages.fail_stale_trials)
    monkeypatch.setattr(optuna.logging, "set_verbosity", lambda level: None)
    lock_seen: list[str] = []
    queue_retry = states_module.queue_retry

    def probe_then_queue(
        study: optuna.Study, frozen: optuna.trial.FrozenTrial, max_retry: int | None = 3
    ) -> None:
        lock_seen.append(_sqlite_state_lock(tmp_path))
        queue_retry(study, frozen, max_retry)

    monkeypatch.setattr(worker_module, "queue_retry", probe_then_queue)
    return spec, lock_seen


def test_a_stopped_trial_is_failed_and_queued_again_in_one_step(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between Optuna's FAIL of a trial stopped by Ctrl-C and its retry's queueing, the worker keeps the
    state lock: no other worker can count the trial's budget place as free in between."""
    spec, lock_seen = _worker_here(tmp_path, tiny_dir, monkeypatch)

    def stop_at_step_100() -> None:
        wait_for_step(tmp_path, 100, timeout=120)
        worker_module._STOP["requested"] = True  # what the SIGTERM handler sets

    stopper = threading.Thread(target=stop_at_step_100, daemon=True)
    stopper.start()
    assert worker_module.worker_main(spec) == 130
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

    spec, lock_seen = _worker_here(tmp_path, tiny_dir, monkeypatch, space=long_space(tmp_path, steps=100))
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
    assert worker_module.worker_main(spec) == 0
    assert lock_seen == ["held"]
    study = load()
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and "database is locked" in failed[0].user_attrs["fail_reason"]
    done = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 2 and any(t.system_attrs.get("failed_trial") == failed[0].number for t in done)
    assert _sqlite_state_lock(tmp_path) == "free"


def test_a_trial_is_never_pruned_at_its_last_validation(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial validated only at its last step (``--steps`` <= ``valid_steps``) has trained in full: it
    ends COMPLETE even under a pruner that would prune every trial it is asked about."""
    space = write_space(tmp_path / "unit.yaml", steps=20, valid_steps=20)
    spec, _ = _worker_here(tmp_path, tiny_dir, monkeypatch, space=space, trials=3)
    asked: list[int] = []

    def always_prune(self: optuna.Trial) -> bool:
        asked.append(self.number)
        return True

    monkeypatch.setattr(optuna.Trial, "should_prune", always_prune)
    assert worker_module.worker_main(spec) == 0
    by_state = states(load())
    assert by_state == {TrialState.COMPLETE: 3}, by_state
    assert asked == []


def _left_in_trial_folders(tmp_path: Path) -> list[str]:
    return sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "studies/unit/trials").rglob("*"))


def test_a_pruned_trial_leaves_nothing_in_its_folder(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pruned trial is finished for good: its best checkpoint goes to the artifact store (for
    ``export-top --include-pruned``) and its resume point (last.pt) is deleted. It used to stay on disk,
    one per pruned trial, for the life of the study."""
    spec, _ = _worker_here(tmp_path, tiny_dir, monkeypatch, trials=1)
    monkeypatch.setattr(optuna.Trial, "should_prune", lambda self: True)
    assert worker_module.worker_main(spec) == 0
    pruned = load().get_trials(states=(TrialState.PRUNED,))
    assert len(pruned) == 1 and pruned[0].user_attrs["best_step"] == 50
    assert pruned[0].user_attrs["checkpoint_artifact"]
    (meta,) = optuna.artifacts.get_all_artifact_meta(pruned[0], storage=load()._storage)
    assert meta.mimetype == "application/octet-stream"  # guessed from ".pt" it was a SNES page table
    assert _left_in_trial_folders(tmp_path) == []


def test_a_failed_trial_leaves_nothing_in_its_folder(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trial that fails midway (here its second validation raises, as a CUDA error would) is never
    resumed: its last.pt and best.pt are deleted with it, and the study goes on."""
    import search.train

    spec, _ = _worker_here(tmp_path, tiny_dir, monkeypatch, space=long_space(tmp_path, steps=150), trials=2)
    real_predict = search.train.predict_logits
    calls: list[int] = []

    def second_validation_fails(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            assert any((tmp_path / "studies/unit/trials").glob("*/*/last.pt"))  # there was one to delete
            raise RuntimeError("boom")
        return real_predict(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(search.train, "predict_logits", second_validation_fails)
    assert worker_module.worker_main(spec) == 0
    study = load()
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 1 and failed[0].user_attrs["fail_reason"] == "RuntimeError: boom"
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 2  # the study went on
    assert _left_in_trial_folders(tmp_path) == []


def test_a_stop_right_after_training_keeps_the_resume_point(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train() removed last.pt as it finished; a stop before the trial's result was recorded then
    retried the trial from step 0 (seen once in the SIGTERM-then-Ctrl-C reliability test). The trial
    keeps last.pt until its result is recorded, so the retry resumes."""
    import signal

    spec, _ = _worker_here(tmp_path, tiny_dir, monkeypatch, space=long_space(tmp_path, steps=100), trials=1)
    real_train = worker_module.Lane._train

    def train_then_stop(self: worker_module.Lane, *args: object) -> object:
        done = real_train(self, *args)  # type: ignore[arg-type]
        worker_module._on_term(signal.SIGTERM, None)  # the stop, just before the result is recorded
        return done

    handler = signal.getsignal(signal.SIGTERM)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(worker_module.Lane, "_train", train_then_stop)
            assert worker_module.worker_main(spec) == 130
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert [p.name for p in (tmp_path / "studies/unit/trials").glob("*/*/last.pt")] == ["last.pt"]
    # Stopped outside training (here, or claiming the trial), it ended with no reason; status showed none.
    (stopped,) = load().get_trials(states=(TrialState.FAIL,))
    assert stopped.user_attrs["interrupted"] and "interrupted" in stopped.user_attrs["fail_reason"]
    worker_module._STOP.update(requested=False, deferred=False)
    assert worker_module.worker_main(spec) == 0
    (retry,) = load().get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert retry.user_attrs["resumed_from_step"] == 100  # nothing left to train: recorded at once
    assert retry.user_attrs["steps_per_s"] is None  # no step trained: no rate (it was 0.0)
    assert _left_in_trial_folders(tmp_path) == []


def test_a_stop_while_a_trained_trial_is_recorded_waits_until_it_is(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM raised wherever the worker was: after training, it failed the trial with no reason, and
    mid-upload it could leave a reference to a checkpoint never written. Now the trial is recorded
    (COMPLETE, its checkpoint in the store), then the worker stops."""
    import signal

    spec, _ = _worker_here(tmp_path, tiny_dir, monkeypatch, space=write_space(tmp_path / "u.yaml"), trials=3)
    store_checkpoint = worker_module.Lane._store_checkpoint

    def stop_then_store(self: worker_module.Lane, *args: object) -> None:
        worker_module._on_term(signal.SIGTERM, None)  # what the signal runs, here in the worst place
        store_checkpoint(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(worker_module.Lane, "_store_checkpoint", stop_then_store)
    handler = signal.getsignal(signal.SIGTERM)  # _on_term ignores repeats: put pytest's back
    try:
        assert worker_module.worker_main(spec) == 130
    finally:
        signal.signal(signal.SIGTERM, handler)
    study = load()
    by_state = states(study)  # the trial it was recording (the unit space's pruner may have stopped it)
    assert set(by_state) <= {TrialState.COMPLETE, TrialState.PRUNED} and sum(by_state.values()) == 1
    store = Path(study.user_attrs["artifact_dir"])
    for t in study.get_trials():
        assert (store / t.user_attrs["checkpoint_artifact"]).is_file()


def test_each_attempt_trains_in_its_own_folder_from_the_newest_earlier_one(tmp_path: Path) -> None:
    """An attempt failed as stale while its worker lived on (cut off from the database, paused) went on
    writing into the folder its retry trained in; it now writes only its own."""
    trials = tmp_path / "trials"
    first = worker_module.attempt_folder(trials, 3, 3)
    assert first == trials / "00003" / "00003" and not any(first.iterdir())
    (first / "best.pt").write_bytes(b"best of 3")
    (first / "last.pt").write_bytes(b"last of 3")
    retry = worker_module.attempt_folder(trials, 3, 9)
    assert (retry / "last.pt").read_bytes() == b"last of 3" and (
        retry / "best.pt"
    ).read_bytes() == b"best of 3"
    save_atomic({"step": 10}, retry / "last.pt")  # as train writes: a new file in place of the link
    (first / "last.pt").write_bytes(b"the stale attempt writes on")  # into its own folder only
    assert torch.load(retry / "last.pt", weights_only=True) == {"step": 10}
    again = worker_module.attempt_folder(trials, 3, 12)  # from the newest attempt with a last.pt
    assert torch.load(again / "last.pt", weights_only=True) == {"step": 10}
    assert worker_module.attempt_folder(trials, 3, 12) == again  # its own, kept as it is
    # The layout of earlier versions: trials/<root>/last.pt, resumed from when no attempt folder has one.
    (trials / "00005").mkdir()
    (trials / "00005" / "last.pt").write_bytes(b"old layout")
    assert (worker_module.attempt_folder(trials, 5, 8) / "last.pt").read_bytes() == b"old layout"
    # Discarding a trial finished for good removes every attempt's folder, temp files of killed ones too.
    (first / ".last.pt.k1d2.tmp").write_bytes(b"x")
    worker_module._discard_trial_folder(again)
    assert not (trials / "00003").exists() and (trials / "00005").exists()
