"""The search service end to end on CPU: exact budgets, pruning, resume, SIGKILL, Ctrl-C, PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import optuna
import pytest
import yaml
from optuna.trial import TrialState

import search.states as states_module
import search.study as study_module
import search.supervise as supervise_module
from search.cli import main
from search.errors import UserError
from search.files import sha256_file
from search.space import load_space
from search.storage import artifact_store, open_storage
from search.study import RunOptions, effective_steps, identity_changes, run
from search.supervise import in_environment, worker_context
from search.trials import count_trials, is_skipped
from search.worker import read_status
from tests.studies import load, long_space, states, wait_for_step, write_space


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
    assert not [t for t in trials if is_skipped(t) and "failed_trial" not in t.system_attrs], table
    store = artifact_store(study)
    for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)):
        assert t.user_attrs["config"]["d_model"] == t.params["d_model"]
        for key in (
            "parameters",
            "steps_per_s",
            "device",
            "best_step",
            "valid_acc",
            "checkpoint_sha256",
            "time_s",
        ):
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
    # Finished trials (pruned ones too) leave nothing in their folders: the store holds their checkpoints.
    assert not [p for p in (tmp_path / "studies/unit/trials").rglob("*") if p.is_file()]

    # Re-running with a larger budget resumes to exactly the new total; the same budget does nothing.
    assert run(RunOptions(space=str(space), trials=8, data=tiny_dir, workers=2, display=False)).finished == 8
    assert run(RunOptions(space=str(space), trials=8, data=tiny_dir, display=False)).finished == 8
    assert len(load().get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 8


def test_changed_data_or_space_is_refused(tmp_path: Path, tiny_dir: Path, fake_dir: Path) -> None:
    space = write_space(tmp_path / "unit.yaml")
    run(RunOptions(space=str(space), trials=1, data=tiny_dir, display=False))
    # A second machine's copy (scp, cp -r, a cloud download: new file times) is the same set; it was
    # refused as "another data set" unless copied with cp -a. The study's identity is the set's content.
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy, copy_function=shutil.copyfile)
    for path in copy.iterdir():
        os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert run(RunOptions(space=str(space), trials=2, data=copy, display=False)).finished == 2
    assert load().user_attrs["data_root"] == str(copy.resolve())  # the last folder given is recorded
    with pytest.raises(UserError, match="another data set.*--allow-changed to continue anyway$"):
        run(RunOptions(space=str(space), trials=3, data=fake_dir, display=False))
    write_space(tmp_path / "unit.yaml", layers={"low": 1, "high": 2})
    # It said only "space_digest 3f1e... from unit.yaml, now 9ab2...", leaving the user to find the key.
    changed = r"another search space \(.*unit\.yaml: params\.layers added\); use a new"
    with pytest.raises(UserError, match=changed):
        run(RunOptions(space=str(space), trials=3, data=tiny_dir, display=False))
    other = write_space(tmp_path / "other.yaml", layers={"low": 1, "high": 3})  # another file, same study
    with pytest.raises(UserError, match=r"space \(\S*unit\.yaml -> \S*other\.yaml: params\.layers added"):
        run(RunOptions(space=str(other), trials=3, data=tiny_dir, display=False))
    assert (
        run(RunOptions(space=str(space), trials=3, data=tiny_dir, allow_changed=True, display=False)).finished
        == 3
    )
    # run() installs the study's state lock for its driver and removes it when it returns or raises: a
    # later caller in this process used it (a lock file under another test's folder).
    assert not states_module._STATE_LOCK


def test_allow_changed_data_goes_on_with_the_new_set_and_exports_only_its_trials(
    tmp_path: Path, tiny_dir: Path, fake_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--allow-changed records the new data set (fingerprint and split, not just its folder): later runs
    on it need no --allow-changed, and export-top exports the trials trained on it. Before, the study
    kept the old fingerprint beside the new folder, and its best trials could not be exported at all."""
    from search.export import export_top

    space = str(write_space(tmp_path / "unit.yaml", steps=20, valid_steps=20))
    run(RunOptions(space=space, trials=1, data=tiny_dir, display=False))
    before = dict(load().user_attrs)
    capsys.readouterr()
    run(RunOptions(space=space, trials=3, data=fake_dir, allow_changed=True, display=False))
    said = " ".join(capsys.readouterr().err.split())
    assert f"note: study 'unit' goes on with the data set in {fake_dir}" in said
    study = load()
    assert study.user_attrs["data_root"] == str(fake_dir.resolve())
    assert study.user_attrs["fingerprint"] != before["fingerprint"]
    assert study.user_attrs["split_id"] != before["split_id"]
    assert run(RunOptions(space=space, trials=4, data=fake_dir, display=False)).finished == 4
    study = load()
    on_fake = [
        t.number for t in study.get_trials() if t.user_attrs["fingerprint"] == study.user_attrs["fingerprint"]
    ]
    assert on_fake == [1, 2, 3]
    assert {t.user_attrs["split_id"] for t in study.get_trials()[1:]} == {study.user_attrs["split_id"]}
    result = export_top(study, 3, out=tmp_path / "export")
    assert sorted(m.trial for m in result.members) == on_fake
    with pytest.raises(UserError, match="only 3 usable trial.*trained on the study's current data set"):
        export_top(study, 4, out=tmp_path / "export4")
    # status marks the trial of the earlier set (its accuracy was on another validation split).
    capsys.readouterr()
    assert main(["status", "--study", "unit"]) == 0
    rows = {line.split()[1]: line for line in capsys.readouterr().out.splitlines() if line.startswith("│")}
    assert "COMPLETE*" in rows["0"] and all("COMPLETE*" not in rows[str(n)] for n in on_fake)


def test_allow_changed_split_exports_only_the_trials_of_the_new_split(tmp_path: Path, tiny_dir: Path) -> None:
    """A trial of the earlier split trained on some of the new validation utterances: export-top ranked
    it beside the others (its figures in-sample), and vote then refused the export as mixing studies."""
    from search.export import export_top

    run(
        RunOptions(
            space=str(write_space(tmp_path / "a.yaml", steps=20)), trials=1, data=tiny_dir, display=False
        )
    )
    other = str(write_space(tmp_path / "b.yaml", steps=20, split_seed=7))
    with pytest.raises(UserError, match="train/valid split"):
        run(RunOptions(space=other, trials=2, data=tiny_dir, study="unit", display=False))
    run(RunOptions(space=other, trials=2, data=tiny_dir, study="unit", allow_changed=True, display=False))
    study = load()
    assert [m.trial for m in export_top(study, 1, out=tmp_path / "one").members] == [1]
    with pytest.raises(UserError, match="only 1 usable trial.*current data set and split"):
        export_top(study, 2, out=tmp_path / "two")


def test_allow_changed_space_with_other_choices_is_refused_before_any_trial(
    tmp_path: Path, tiny_dir: Path
) -> None:
    """Optuna cannot record other choices for a categorical in one study: every trial would fail with
    "dynamic value space". The run is refused in one line, and the study is left as it was."""
    space = str(write_space(tmp_path / "unit.yaml", steps=20, valid_steps=20))
    run(RunOptions(space=space, trials=1, data=tiny_dir, display=False))
    before = dict(load().user_attrs)
    write_space(
        tmp_path / "unit.yaml", steps=20, valid_steps=20, pooling={"choices": ["mean", "attentive_stats"]}
    )
    with pytest.raises(
        UserError,
        match="'pooling' was searched with choices \\['mean', 'attention'\\] in study 'unit', this space "
        "has choices \\['mean', 'attentive_stats'\\].*use a new --study name",
    ):
        run(RunOptions(space=space, trials=2, data=tiny_dir, allow_changed=True, display=False))
    study = load()
    assert dict(study.user_attrs) == before and len(study.get_trials()) == 1
    # A numeric range may change: Optuna records both.
    write_space(tmp_path / "unit.yaml", steps=20, valid_steps=20, d_model={"low": 16, "high": 48, "step": 16})
    assert (
        run(RunOptions(space=space, trials=2, data=tiny_dir, allow_changed=True, display=False)).finished == 2
    )


def test_a_run_without_data_resumes_on_the_studys_own_data_set(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    data = tmp_path / "Dataset"
    shutil.copytree(tiny_dir, data)
    space = write_space(tmp_path / "unit.yaml")
    run(RunOptions(space=str(space), trials=1, data=data, display=False))
    assert run(RunOptions(space=str(space), trials=2, display=False)).finished == 2  # no --data
    assert f"using the data set study 'unit' was run on, {data}" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "data").exists()  # the default synthetic set was not generated
    data.rename(tmp_path / "moved")
    with pytest.raises(
        UserError, match=r"^--data: study 'unit' was run on .*Dataset, which is not there any more"
    ):
        run(RunOptions(space=str(space), trials=3, display=False))


def test_steps_scale_each_trials_warm_up(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--steps 20 on a space of 60-step trials with 50 warm-up steps kept the 50: the learning rate
    never reached its peak (a note said so). The warm-up now shrinks with the budget."""
    space = write_space(tmp_path / "unit.yaml", warmup_steps=50)  # the space trains 60 steps
    assert run(RunOptions(space=str(space), trials=1, steps=20, data=tiny_dir, display=False)).finished == 1
    (trial,) = load().get_trials()
    assert (trial.user_attrs["config"]["steps"], trial.user_attrs["config"]["warmup_steps"]) == (20, 17)
    assert "warmup" not in capsys.readouterr().err


def test_the_display_gets_a_last_update_with_the_final_counts(tmp_path: Path, tiny_dir: Path) -> None:
    """Without it, a piped display's last frame showed a poll from before the last trial finished."""
    seen: list[tuple[int, int]] = []

    def on_update(study: optuna.Study, counts: object, workers: list[dict[str, object]]) -> None:
        seen.append((counts.finished, counts.running))  # type: ignore[attr-defined]

    space = write_space(tmp_path / "unit.yaml")
    run(RunOptions(space=str(space), trials=2, data=tiny_dir, display=False), on_update=on_update)
    assert seen and seen[-1] == (2, 0), seen


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


def test_another_pruner_is_refused_like_another_budget() -> None:
    """A space edited from the median pruner to none went on without a word, mixing pruned and
    full-budget trials (the reason another --steps is refused)."""
    old = {"fingerprint": "f", "split_id": "s", "space_digest": "d", "space_path": "p", "data_root": "r"}
    median, none = '{"name": "median"}', '{"name": "none"}'
    study = cast(optuna.Study, SimpleNamespace(study_name="s", user_attrs={**old, "pruner": median}))
    assert identity_changes(study, {**old, "pruner": median}, allow_changed=False) == {}
    with pytest.raises(
        UserError, match=r"was run with pruner \{\"name\": \"median\"\}, this run's space has"
    ):
        identity_changes(study, {**old, "pruner": none}, allow_changed=False)
    assert identity_changes(study, {**old, "pruner": none}, allow_changed=True) == {"pruner": none}
    unrecorded = cast(optuna.Study, SimpleNamespace(study_name="s", user_attrs=old))  # an older study
    assert identity_changes(unrecorded, {**old, "pruner": none}, allow_changed=False) == {"pruner": none}


def test_run_by_storage_alone_does_not_start_a_second_study_beside_the_one_there(
    tmp_path: Path, tiny_dir: Path
) -> None:
    """status, export-top and dashboard take a storage's only study; run named its study after the
    space and silently started a second one beside it (its own trials, checkpoints and data)."""
    space = str(write_space(tmp_path / "unit.yaml", steps=20, valid_steps=20))
    url = f"sqlite:///{tmp_path / 'mine.db'}"
    optuna.create_study(study_name="mine", storage=url)
    with pytest.raises(UserError, match=r"holds 'mine' but no study 'unit' .*pass --study mine to resume"):
        run(RunOptions(space=space, trials=1, data=tiny_dir, storage=url, display=False))
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == ["mine"]
    with pytest.raises(UserError, match="study name '' is not allowed"):  # not the space's name
        run(RunOptions(space=space, trials=1, data=tiny_dir, study="", display=False))


def test_a_spaces_name_is_checked_only_where_it_names_the_study(tmp_path: Path, tiny_dir: Path) -> None:
    """A descriptive `name:` is the space's business while --study names the study; where it names the
    study, its file and key are named (the line said only "study name ... is not allowed")."""
    import yaml

    from tests.studies import UNIT_SPACE

    path = tmp_path / "described.yaml"
    path.write_text(yaml.safe_dump({**UNIT_SPACE, "name": "My boss space"}))
    with pytest.raises(UserError, match=f"^{path}: key 'name' names the study without --study: study name"):
        run(RunOptions(space=str(path), trials=1, data=tiny_dir, display=False))
    assert load_space(path).name == "My boss space"  # loads: --study may name the study instead
    spaced = tmp_path / "my space.yaml"
    spaced.write_text(yaml.safe_dump({k: v for k, v in UNIT_SPACE.items() if k != "name"}))
    with pytest.raises(UserError, match=r"my space.yaml: its file name \(no 'name' key\) names the study"):
        run(RunOptions(space=str(spaced), trials=1, data=tiny_dir, display=False))


def test_run_on_a_study_that_holds_enough_trials_says_so_and_starts_nothing(
    tmp_path: Path,
    tiny_dir: Path,
    fake_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    space = str(write_space(tmp_path / "unit.yaml", steps=20, valid_steps=20))
    assert run(RunOptions(space=space, trials=2, data=tiny_dir, display=False)).finished == 2
    capsys.readouterr()

    def no_workers(*args: object, **kwargs: object) -> None:
        raise AssertionError("a worker was started")

    monkeypatch.setattr(study_module, "supervise", no_workers)
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
    # Another --steps or data set changes nothing when nothing runs: said the same way, not refused
    # (it was an error, exit 2, that asked for the study's --steps).
    try:
        code = main(["run", "--space", space, "--trials", "2", "--steps", "7", "--data", str(fake_dir)])
    finally:
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    assert code == 0 and "already has 2 finished trials (>= --trials 2); nothing to do" in err, err
    assert load().user_attrs["steps_override"] is None and len(load().get_trials()) == 2
    with pytest.raises(UserError, match=r"missing: data directory not found; pass --data"):  # a typo is not
        run(RunOptions(space=space, trials=2, data=tmp_path / "missing", display=False))
    # Said before torch is imported or the fork server started (about 0.6 s against 2 s on the dev VM).
    script = (
        "import json, sys\n"
        "from multiprocessing import forkserver\n"
        "from search.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print(json.dumps([code, 'torch' in sys.modules, forkserver._forkserver._forkserver_pid]))\n"
    )
    argv = ["run", "--space", space, "--trials", "2", "--data", str(tiny_dir)]
    proc = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=120, cwd=Path.cwd()
    )
    assert json.loads(proc.stdout.splitlines()[-1]) == [0, False, None], proc.stdout + proc.stderr
    assert "nothing to do" in proc.stderr


def test_a_finished_runs_study_db_holds_every_trial_without_its_log(tmp_path: Path, tiny_dir: Path) -> None:
    """SQLite folds its write-ahead log (study.db-wal) into study.db when the last connection closes;
    run never closed its own, and a study.db copied or backed up after the run lacked trials."""
    space = str(write_space(tmp_path / "unit.yaml", steps=20, valid_steps=20))
    assert run(RunOptions(space=space, trials=3, data=tiny_dir, display=False)).finished == 3
    db = Path("studies/unit/study.db")
    wal = db.with_name("study.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    copy = tmp_path / "backup.db"
    shutil.copyfile(db, copy)  # the database file alone
    with contextlib.closing(sqlite3.connect(copy)) as con:
        finished = "SELECT COUNT(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')"
        assert con.execute(finished).fetchone()[0] == 3


def test_a_stop_while_the_run_closes_its_storage_is_dropped_not_raised() -> None:
    """A second Ctrl-C while run closed its connections (as its first stop unwound) interrupted
    SQLite's close with a traceback and replaced that stop: 'no trial of this run was running'."""
    closed = []

    class Engine:
        def dispose(self) -> None:
            signal.raise_signal(signal.SIGINT)  # the second Ctrl-C, landing inside the close
            closed.append(True)

    class Storage:
        engine = Engine()

    study_module._close(Storage())
    assert closed == [True]


def test_long_trials_on_the_cpu_are_said_to_take_hours_before_they_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """run --space boss on a machine without a GPU printed nothing for minutes (70,000-step trials)."""
    import search.devices
    from search.space import load_space

    monkeypatch.setattr(search.devices, "visible_gpus", lambda: [])
    boss, smoke = load_space("boss"), load_space("smoke")
    study_module._check_run(RunOptions(space="boss", trials=1), boss)
    assert "note: no GPU: trials of up to 70,000 steps on the CPU take hours each" in capsys.readouterr().err
    study_module._check_run(RunOptions(space="boss", trials=1, steps=500), boss)  # shortened: nothing said
    study_module._check_run(RunOptions(space="smoke", trials=1), smoke)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(search.devices, "visible_gpus", lambda: [0])  # on a GPU: nothing said
    study_module._check_run(RunOptions(space="boss", trials=1), boss)
    assert capsys.readouterr().err == ""


def test_plan_devices_runs_one_worker_per_gpu_with_per_gpu_trials_each(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The GPU side, which a machine without GPUs never takes (visible GPUs faked)."""
    import search.devices
    from search.study import DEFAULT_PER_GPU, plan_devices

    monkeypatch.setattr(search.devices, "visible_gpus", lambda: [0, 1])
    assert plan_devices(RunOptions(space="s", trials=1)) == (["cuda:0", "cuda:1"], DEFAULT_PER_GPU)
    assert plan_devices(RunOptions(space="s", trials=1, gpus=[1], per_gpu=2)) == (["cuda:1"], 2)
    assert plan_devices(RunOptions(space="s", trials=1, gpus=[0], workers=3)) == (["cuda:0"], DEFAULT_PER_GPU)
    assert "--workers 3 has no effect with GPUs" in capsys.readouterr().err
    with pytest.raises(UserError, match=r"--gpus: GPU 2 is not visible here \(visible: \[0, 1\]\)"):
        plan_devices(RunOptions(space="s", trials=1, gpus=[2]))


def test_bad_config_trial_fails_with_reason_and_study_goes_on(tmp_path: Path, tiny_dir: Path) -> None:
    # heads 3 fits d_model 48 only (a choice that never fits would be a note before the run)
    space = write_space(
        tmp_path / "unit.yaml", heads={"choices": [2, 3]}, d_model={"low": 16, "high": 48, "step": 16}
    )
    counts = run(RunOptions(space=str(space), trials=4, data=tiny_dir, display=False))
    study = load()
    assert counts.finished == 4
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert failed  # heads 3 with d_model 16 or 32 (the sampler's seed makes some)
    for t in failed:
        assert "divisible by heads" in t.user_attrs["fail_reason"]
    assert all(
        t.params["d_model"] % t.params["heads"] == 0
        for t in study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    )


def _cli(*args: str, cwd: Path, new_session: bool = False) -> subprocess.Popen[str]:
    """The command line in a process of its own (``new_session``: in its own process group too, as a
    terminal's job is, so that a signal can be sent to the group)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "search.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
    )


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


def test_each_run_keeps_its_own_status_folder_and_fails_only_its_killed_workers_trials(
    tmp_path: Path,
) -> None:
    """Two runs of a study from one folder on one host shared ``workers/<host>``, their workers both
    named w0: a kill in one run failed the trial the other run's live w0 was training."""
    import json

    from search.worker import WorkerSpec

    home = tmp_path / "studies" / "unit"
    host = home / "workers" / socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone, alive = host / dead.stdout.strip(), host / str(os.getppid())
    for folder in (gone, alive):
        folder.mkdir(parents=True)
        (folder / "w0.json").write_text("{}")
    (host / "w0.json").write_text("{}")  # a status file from before runs had folders
    mine = supervise_module.run_status_dir(home)
    assert mine == host / str(os.getpid()) and mine.is_dir()
    assert sorted(p.name for p in host.iterdir()) == sorted([alive.name, mine.name])  # the dead run's went

    study = optuna.create_study(
        study_name="unit", storage=open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    )
    ours, theirs = study.ask(), study.ask()
    (mine / "w0.json").write_text(json.dumps({"worker": "w0", "pid": 4242, "trial": ours.number}))
    (alive / "w0.json").write_text(json.dumps({"worker": "w0", "pid": 4343, "trial": theirs.number}))
    spec = WorkerSpec(
        worker="w0",
        device="cpu",
        storage_url="sqlite://",
        study_name="unit",
        space_path="s.yaml",
        cache_dir="c",
        data_root="d",
        trials=2,
        steps=None,
        seed=None,
        heartbeat=1,
        grace=3,
        status_dir=str(mine),
        threads=1,
        max_failures=3,
    )
    assert supervise_module.fail_killed(study, mine, spec, -9, pid=4343) == []  # not this run's process
    assert supervise_module.fail_killed(study, mine, spec, -9, pid=4242) == [ours.number]
    assert study.trials[theirs.number].state == TrialState.RUNNING


def test_killed_workers_restart_while_trials_finish_and_a_crash_loop_stops() -> None:
    """Kills spread over a long study, each after trials have finished, never spend the limit (five
    over a week of OOM kills used to end the run); kills with nothing finishing in between do."""
    budget = supervise_module.RestartBudget(2)
    # Finished trials at each kill: 7 then 7 is two in a row, within the limit of 2.
    assert [budget.allow(finished) for finished in (0, 3, 7, 7, 12, 40)] == [True] * 6
    assert (budget.used, budget.in_a_row) == (6, 1)
    assert [budget.allow(finished) for finished in (40, 40, 40)] == [True, False, False]
    assert budget.allow(41)  # a trial finished meanwhile: a restart again
    assert budget.used == 8
    unknown = supervise_module.RestartBudget(1)  # the storage did not answer: counted as in a row
    assert [unknown.allow(None), unknown.allow(None)] == [True, False]


def test_a_config_killed_on_every_retry_does_not_spend_the_next_configs_restarts() -> None:
    """A trial that fails for good once its retries are spent has ended: the next config's kills start a
    new count. Counted by finished trials alone, one such config spent four of five restarts and the
    next one ended an unattended run ("restart limit spent", 0 of 3 trials)."""
    from optuna.trial import create_trial

    study = optuna.create_study()
    budget = supervise_module.RestartBudget(4)

    def killed(number: int, retry_of: int | None) -> bool:
        """Trial ``number`` killed (FAIL), its worker restart asked for."""
        system = {} if retry_of is None else {"retry_history": [retry_of]}
        study.add_trial(create_trial(state=TrialState.FAIL, system_attrs=system))
        assert study.trials[-1].number == number
        return budget.allow(count_trials(study.get_trials(deepcopy=False)).ended)

    # The first config: trial 0 killed, retried as 1, 2, 3 (each killed too); 3 is not retried again.
    assert [killed(0, None), killed(1, 0), killed(2, 1), killed(3, 2)] == [True] * 4
    assert budget.in_a_row == 4
    counts = count_trials(study.get_trials(deepcopy=False))
    assert (counts.retried, counts.failed, counts.ended) == (3, 1, 1)
    assert killed(4, None)  # the next config's first kill: trial 3 had ended, so a new count
    assert budget.in_a_row == 1


def test_a_run_sweeps_the_folders_of_trials_that_will_not_run_again_and_old_temp_files(
    tmp_path: Path,
) -> None:
    """A trial killed on each of its retries failed for good with its last.pt and best.pt kept, and a
    worker killed while writing a checkpoint left its temp file: both stayed for the life of the study."""
    from optuna.trial import create_trial

    study = optuna.create_study()
    study.add_trial(create_trial(state=TrialState.FAIL))  # 0: failed for good
    running = study.ask()  # 1: running now (on another machine, say)
    study.add_trial(
        create_trial(state=TrialState.COMPLETE, value=0.5)
    )  # 2: its worker died before it emptied
    study.add_trial(create_trial(state=TrialState.FAIL))  # 3: failed, its retry (4) queued
    study.enqueue_trial({}, user_attrs={})
    study._storage.set_trial_system_attr(study.trials[4]._trial_id, "failed_trial", 3)
    assert running.number == 1 and study.trials[4].state == TrialState.WAITING
    home = tmp_path / "unit"
    for n in range(4):
        (home / "trials" / f"{n:05d}").mkdir(parents=True)
        (home / "trials" / f"{n:05d}" / "last.pt").write_bytes(b"x")
    (home / "artifacts").mkdir()
    old, new = home / "artifacts" / ".abc.tmp", home / "trials" / "00001" / ".last.pt.xyz.tmp"
    for tmp in (old, new, home / "trials" / "00003" / ".best.pt.q.tmp"):
        tmp.write_bytes(b"partial")
    (home / "trials" / "0").mkdir()  # not a name a worker gives a trial's folder (00000): not touched
    hour_ago = time.time() - study_module.TEMP_AGE_S - 60
    os.utime(old, (hour_ago, hour_ago))
    os.utime(home / "trials" / "00003" / ".best.pt.q.tmp", (hour_ago, hour_ago))
    study_module._sweep_leftovers(study, home / "trials", home / "artifacts")
    assert sorted(p.name for p in (home / "trials").iterdir()) == ["0", "00001", "00003"]
    assert not old.exists() and new.exists()  # a temp file written a moment ago may have its writer
    assert sorted(p.name for p in (home / "trials" / "00003").iterdir()) == ["last.pt"]


def test_a_run_sweeps_again_once_its_workers_end(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finished study is not run again, so what its last run's killed workers left stayed for good."""
    from optuna.trial import create_trial

    left: list[Path] = []

    def supervise(specs: object, study: optuna.Study, *rest: object) -> tuple[dict[str, int | None], int]:
        # What the workers left: a trial killed on each of its retries, failed for good with its
        # checkpoints kept, then the two trials that met the budget.
        study.add_trial(create_trial(state=TrialState.FAIL))
        number = study.trials[-1].number
        folder = Path(study.user_attrs["trials_dir"]) / f"{number:05d}" / f"{number:05d}"
        folder.mkdir(parents=True)
        (folder / "last.pt").write_bytes(b"x")
        left.append(folder)
        for value in (0.5, 0.6):
            study.add_trial(create_trial(state=TrialState.COMPLETE, value=value))
        return {"w0": 0}, 0

    monkeypatch.setattr(study_module, "supervise", supervise)
    space = write_space(tmp_path / "unit.yaml")
    counts = run(RunOptions(space=str(space), trials=2, data=tiny_dir, display=False))
    assert counts.finished == 2 and left and left[0].parent.parent.is_dir()
    assert not left[0].parent.exists()


def test_the_sweep_never_follows_a_trials_folder_edited_in_the_database(
    tmp_path: Path, tiny_dir: Path
) -> None:
    """The sweep removed the ended trials' folders under the recorded ``trials_dir``: anyone who could
    write the database (a shared PostgreSQL study) could aim it at any folder of every machine's user."""
    space = write_space(tmp_path / "unit.yaml")
    assert run(RunOptions(space=str(space), trials=1, data=tiny_dir, display=False)).finished == 1
    victim = tmp_path / "victim" / "00000"
    victim.mkdir(parents=True)
    (victim / "notes.txt").write_text("mine")
    study = load()
    study.set_user_attr("trials_dir", str(victim.parent))
    assert run(RunOptions(space=str(space), trials=2, data=tiny_dir, display=False)).finished == 2
    assert (victim / "notes.txt").read_text() == "mine"
    assert (Path("studies") / "unit" / "trials").is_dir()  # trials ran in the study's own folder


def test_a_stopped_trial_left_without_its_retry_is_resumed_by_the_run(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stopped worker queues its trial's retry as a best effort on its way out; once none was queued
    (seen in the SIGTERM-then-Ctrl-C reliability test), the trial was lost. A run queues it at its start
    (before its sweep deletes the trial's folder) and once its own workers have stopped."""
    from optuna.trial import create_trial

    from search.storage import default_storage_url

    (tmp_path / "studies" / "unit").mkdir(parents=True)
    study = optuna.create_study(study_name="unit", storage=open_storage(default_storage_url("unit")))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"interrupted": True}))  # 0, no retry
    space = write_space(tmp_path / "unit.yaml")
    assert run(RunOptions(space=str(space), trials=1, data=tiny_dir, display=False)).finished == 1
    (done,) = load().get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert done.system_attrs["retry_history"] == [0]  # trial 0 resumed, not replaced by a new trial

    def stop_now(*_: object) -> None:  # the workers have started; a trial of theirs lost its retry
        user = {"interrupted": True, "lost": True}
        load().add_trial(create_trial(state=TrialState.FAIL, user_attrs=user))
        raise KeyboardInterrupt

    monkeypatch.setattr(supervise_module, "wait_for_exit", stop_now)
    with pytest.raises(supervise_module.WorkersStopped):
        run(RunOptions(space=str(space), trials=4, data=tiny_dir, display=False))
    trials = load().get_trials()
    (lost,) = [t.number for t in trials if t.user_attrs.get("lost") and "failed_trial" not in t.system_attrs]
    assert [t.state for t in trials if t.system_attrs.get("retry_history", [None])[-1] == lost] == [
        TrialState.WAITING
    ]


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
        "60",  # the stale check would wait 180 s: the driver itself fails the killed trial at once
        "--quiet",
        cwd=tmp_path,
    )
    status = tmp_path / "studies/unit/workers" / socket.gethostname()
    killed_at: list[float] = []

    def ready() -> list[dict[str, object]]:
        victims = [wait_for_step(status, 120, timeout=120)]
        killed_at.append(time.time())
        return victims

    [victim], out = _kill_worker_once(proc, ready)
    study = load()
    by_state = states(study)
    assert by_state.get(TrialState.COMPLETE) == 3 and TrialState.RUNNING not in by_state, by_state
    killed = study.get_trials(states=(TrialState.FAIL,))
    assert [t.number for t in killed] == [victim["trial"]]
    # Failed within seconds of the kill, with the reason the driver saw (it stayed RUNNING until a stale
    # check after another whole trial, then said "no reason recorded").
    complete = killed[0].datetime_complete
    assert complete is not None and complete.timestamp() - killed_at[0] < 20, (complete, killed_at)
    reason = killed[0].user_attrs["fail_reason"]
    assert re.match(
        rf"its worker w[01] \(cpu\) on {re.escape(socket.gethostname())} was killed by SIGKILL", reason
    ), reason  # whichever of the two workers was killed
    retries = [
        t for t in study.get_trials(deepcopy=False) if t.system_attrs.get("failed_trial") == victim["trial"]
    ]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == killed[0].params
    assert retries[0].user_attrs["resumed_from_step"] >= 100  # from its last checkpoint, not step 0
    assert "failed 0, retried 1" in " ".join(out.split()), out  # the summary tells the two apart


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
    space = long_space(tmp_path)
    args = ("run", "--space", str(space), "--trials", "1", "--data", str(tiny_dir), "--quiet")
    status = tmp_path / "studies/unit/workers" / socket.gethostname()
    out = _ctrl_c_once(_cli(*args, cwd=tmp_path), lambda: wait_for_step(status, 120, timeout=120))
    assert "Stopped: running trials were marked and will resume" in " ".join(out.split()), out
    study = load()
    by_state = states(study)
    assert TrialState.RUNNING not in by_state
    assert by_state.get(TrialState.WAITING) == 1  # the interrupted trial is queued to resume
    resumed = _cli(*args, cwd=tmp_path)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    done = load().get_trials(states=(TrialState.COMPLETE,))
    assert len(done) == 1 and done[0].user_attrs["resumed_from_step"] >= 100
    # The retry inherits its original's attrs; the ones that described the stop are cleared.
    assert not any(t.user_attrs.get("interrupted") or t.user_attrs.get("fail_reason") for t in done)


def _stat(path: Path) -> list[str] | None:
    """The fields of a /proc/<pid>/stat file after the command name (state, parent, ...); None if gone."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _process_tree(pid: int) -> set[int]:
    """The live (not zombie) descendants of ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(stat)
        if fields is not None and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    fields = _stat(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from Linux /proc")
def test_workers_of_a_killed_driver_stop_by_themselves_and_queue_their_trials(
    tmp_path: Path, tiny_dir: Path
) -> None:
    """A driver killed outright (SIGKILL, OOM) cannot stop its workers: each must notice and stop itself."""
    space = long_space(tmp_path)
    args = ("run", "--space", str(space), "--trials", "2", "--data", str(tiny_dir), "--workers", "2")
    proc = _cli(*args, "--quiet", cwd=tmp_path)
    status = tmp_path / "studies/unit/workers" / socket.gethostname()
    try:
        first = wait_for_step(status, 60, timeout=120)
        started = _process_tree(proc.pid)
        assert int(first["pid"]) in started  # type: ignore[call-overload]
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.time() + 60
        while time.time() < deadline and any(_alive(pid) for pid in started):
            time.sleep(0.2)
        left = [pid for pid in started if _alive(pid)]
    finally:
        proc.kill()
    for pid in left:  # leave no process behind for the next test, whatever happened here
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes of the killed driver still running after 60 s: {left}"
    study = load()
    by_state = states(study)
    assert TrialState.RUNNING not in by_state, by_state  # each stopped trial is failed and queued again
    assert by_state.get(TrialState.WAITING) == 2, by_state
    reasons = [t.user_attrs["fail_reason"] for t in study.get_trials(states=(TrialState.FAIL,))]
    assert len(reasons) == 2, reasons  # not "interrupted (Ctrl-C or SIGTERM)": no one sent either
    assert all(r.startswith("stopped: the run that started its worker died") for r in reasons), reasons


def _write_environment(path: str, key: str) -> None:
    Path(path).write_text(json.dumps({"cwd": os.getcwd(), key: os.environ.get(key)}))


def test_a_worker_from_the_fork_server_has_the_drivers_environment_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fork server keeps the environment and folder it started with (another, here): a worker
    started later gets the driver's as they are then, as a spawned one would."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("SPKID_TEST_MARK", raising=False)
    first = worker_context().Process(target=time.sleep, args=(0,))  # starts the server if none runs yet
    first.start()
    first.join(120)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPKID_TEST_MARK", "set after the server started")
    out = tmp_path / "seen.json"
    args = (dict(os.environ), _write_environment, str(out), "SPKID_TEST_MARK")
    proc = worker_context().Process(target=in_environment, args=args)
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0
    seen = json.loads(out.read_text())
    assert seen == {"cwd": str(tmp_path), "SPKID_TEST_MARK": "set after the server started"}, seen


_CUDA_SPY = """
import importlib, json, sys
import torch
calls = []
def spy(name, real):
    def call(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    return call
for owner, name in [(torch.cuda, n) for n in ("is_available", "device_count", "init", "_lazy_init",
                     "current_device", "mem_get_info", "set_device")] + [(torch._C, "_cuda_getDeviceCount")]:
    if hasattr(owner, name):
        setattr(owner, name, spy(name, getattr(owner, name)))
for module in json.loads(sys.argv[1]):
    importlib.import_module(module)
print(json.dumps(calls))
"""


def test_the_fork_servers_imports_never_touch_cuda() -> None:
    """Workers are forked from the server after it has imported WORKER_PRELOAD. A CUDA query there (even
    torch.cuda.is_available(), which initialises the driver) would leave every forked worker unable to
    use its GPU ("Cannot re-initialize CUDA in forked subprocess"); on a machine without a GPU nothing
    would show it, so this watches the calls themselves."""
    modules = json.dumps(supervise_module.WORKER_PRELOAD)
    done = subprocess.run(
        [sys.executable, "-c", _CUDA_SPY, modules], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], done.stdout


def _write_bad_fork(path: str) -> None:
    import torch

    Path(path).write_text(json.dumps(torch._C._cuda_isInBadFork()))  # type: ignore[attr-defined]


_QUERY_THEN_FORK = """
import os, sys, torch
torch.cuda.device_count()
pid = os.fork()
if pid == 0:
    sys.stdout.write(str(torch._C._cuda_isInBadFork()))
    sys.stdout.flush()
    os._exit(0)
os.waitpid(pid, 0)
"""


def test_a_forked_worker_may_still_initialise_cuda(tmp_path: Path) -> None:
    """The flag torch sets in a child forked after a CUDA query, and checks before it lets the child use
    a GPU ("Cannot re-initialize CUDA in forked subprocess"). Unlike the spy above it also sees queries
    made from C++; it is read in a worker the real fork server started."""
    out = tmp_path / "bad-fork.json"
    proc = worker_context().Process(target=_write_bad_fork, args=(str(out),))
    proc.start()
    proc.join(120)
    assert proc.exitcode == 0 and json.loads(out.read_text()) is False
    # The control: on this torch build (CUDA or not, GPU or not) a query before the fork does set it.
    done = subprocess.run(
        [sys.executable, "-c", _QUERY_THEN_FORK], capture_output=True, text=True, timeout=120
    )
    assert done.stdout == "True", done.stdout + done.stderr


def _wait_for_fork_server(pid: int, timeout: float) -> None:
    """Return once process ``pid`` has started its fork server (Linux /proc)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in _process_tree(pid):
            try:
                if b"forkserver" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return
            except OSError:
                continue
        time.sleep(0.02)
    raise AssertionError(f"no fork server started within {timeout} s")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from Linux /proc")
def test_a_broken_torchaudio_is_one_line_and_leaves_no_study(tmp_path: Path, tiny_dir: Path) -> None:
    """A torchaudio built for another torch (a plain install once paired 2.11.1 with torch 2.11.0) made
    run print three tracebacks: the fork server's, and the driver's EOFError when the dead server could
    not fork a worker. Now the driver meets it in its own imports and says it in one line."""
    fake = tmp_path / "site" / "torchaudio"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise OSError("Could not load this library: libtorchaudio.so")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    done = subprocess.run(
        [sys.executable, "-m", "search.cli", "run", "--space", str(long_space(tmp_path)), "--trials", "1"]
        + ["--data", str(tiny_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.splitlines() == [
        "spkid-search run: error: torch/torchaudio cannot be loaded (Could not load this library: "
        "libtorchaudio.so); reinstall the versions pyproject.toml pins: pip install --force-reinstall -e "
        "<this repository>"
    ], done.stderr
    assert not (tmp_path / "studies").exists()


def test_ctrl_c_while_the_worker_server_imports_is_one_line_not_its_traceback(
    tmp_path: Path, tiny_dir: Path
) -> None:
    """Ctrl-C reaches the whole process group, the fork server too, which is importing torch for a few
    seconds after run starts: it used to die of it with a KeyboardInterrupt traceback on the terminal."""
    space = long_space(tmp_path)
    args = ("run", "--space", str(space), "--trials", "2", "--data", str(tiny_dir))
    proc = _cli(*args, cwd=tmp_path, new_session=True)
    try:
        _wait_for_fork_server(proc.pid, timeout=60)
        time.sleep(0.3)  # well inside its imports (seconds)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)  # the server shares the pipe: this waits for it too
    finally:
        proc.kill()
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
    # Stopped before any worker started: no trial of this run was marked (the line used to say so).
    assert out.strip().splitlines()[-2:] == [
        "Stopped while no trial of this run was running; run the same command to go on.",
        "spkid-search run: interrupted",
    ], out


def test_a_stop_inside_a_workers_start_stops_that_worker_too(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM or Ctrl-C that lands inside Process.start() (the driver waits there for the fork server's
    answer, seconds while the server still imports torch) is acted on once the worker has started, and
    that worker is stopped like any other. It used to interrupt start(): the driver ended in an
    AssertionError traceback ("can only join a started process") and never stopped the forked worker."""
    real_start = mp.process.BaseProcess.start
    started: list[mp.process.BaseProcess] = []

    def stopped_start(proc: mp.process.BaseProcess) -> None:  # the first start gets a SIGTERM on the way
        if not started:
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs right here, inside start()
        real_start(proc)
        started.append(proc)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # as the command's handler does

    monkeypatch.setattr(mp.process.BaseProcess, "start", stopped_start)
    space = str(long_space(tmp_path))
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with pytest.raises(supervise_module.WorkersStopped):
            run(RunOptions(space=space, trials=1, data=tiny_dir, display=False))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert len(started) == 1  # start() was not cut short
    assert started[0].exitcode is not None  # and the worker it started was stopped and waited for
    assert TrialState.RUNNING not in states(load())


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
    lanes = read_status(tmp_path / "studies/unit/workers" / socket.gethostname())
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


_RACE_RUN = """
import sys, time
from pathlib import Path
import optuna
import search.study
from search.study import RunOptions, run
space, data, role = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
if role == "first":  # after its first identity write, wait until the second run is about to look
    original = optuna.Study.set_user_attr
    def set_user_attr(self, key, value):
        original(self, key, value)
        if not Path("first-wrote").exists():
            Path("first-wrote").touch()
            deadline = time.time() + 60
            while not Path("second-looks").exists() and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(1.0)  # the second run's look would land here, mid-way through the identity
    optuna.Study.set_user_attr = set_user_attr
else:  # starts once the first has begun writing; says when it is about to open the study
    while not Path("first-wrote").exists():
        time.sleep(0.01)
    serialize = search.study.serialize_state_changes
    def serialize_state_changes(storage, url):
        serialize(storage, url)
        Path("second-looks").touch()
    search.study.serialize_state_changes = serialize_state_changes
run(RunOptions(space=space, trials=2, data=data, display=False))
"""


def test_two_runs_starting_a_new_study_at_once_both_go_on(tmp_path: Path, tiny_dir: Path) -> None:
    """The second machine read the study's identity while the first was still writing it, and refused
    the study ("run with another search space"): now created, checked and recorded as one step."""
    space = write_space(tmp_path / "unit.yaml")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _RACE_RUN, str(space), str(tiny_dir), role],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for role in ("first", "second")
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert (tmp_path / "second-looks").exists()  # the race was staged
    assert count_trials(load().get_trials()).finished == 2


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


def _lanes_run(tmp_path: Path, tiny_dir: Path, heartbeat: int) -> tuple[list[str], dict[str, str]]:
    """Two 250-step trials, two lanes of one CPU worker (what --per-gpu 2 does on a GPU)."""
    space = long_space(tmp_path, steps=250)
    command = [sys.executable, "-c", _LANES_RUN, str(space), str(tiny_dir), str(heartbeat)]
    return command, {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _both_lanes_at(status: Path, step: int, timeout: float) -> list[dict[str, object]]:
    deadline = time.time() + timeout
    while True:
        lanes = [w for w in read_status(status) if int(w.get("step") or 0) >= step]
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


@pytest.mark.parametrize(
    "server",
    [
        pytest.param("pg_database", marks=pytest.mark.postgres),
        pytest.param("mysql_database", marks=pytest.mark.mysql),
    ],
)
def test_three_workers_on_a_database_server(
    tmp_path: Path, tiny_dir: Path, server: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue(server)
    space = write_space(tmp_path / "unit.yaml")
    counts = run(
        RunOptions(
            space=str(space),
            trials=6,
            data=tiny_dir,
            workers=3,
            storage=url,
            heartbeat=2,
            display=False,
        )
    )
    assert counts.finished == 6
    study = load(url=url)
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


def test_a_run_that_does_not_see_the_studys_folder_is_refused(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A second machine on a shared database that had not mounted the shared studies folder had its
    workers create the recorded folder locally and train their trials there, and ended well; export-top
    elsewhere then missed their checkpoints. The study's folder is the one its first run recorded."""
    space = str(write_space(tmp_path / "space.yaml"))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    argv = ["run", "--space", space, "--storage", url, "--study", "unit", "--data", str(tiny_dir), "--quiet"]

    def artifacts(folder: Path) -> int:
        return len([p for p in (folder / "unit" / "artifacts").glob("*") if not p.name.startswith(".")])

    first, moved = tmp_path / "first", tmp_path / "moved"
    monkeypatch.setenv("SPKID_SEARCH_STUDIES", str(first))
    assert main([*argv, "--trials", "1"]) == 0
    mark = (first / "unit" / ".study-mark").read_text().strip()
    assert (
        len(mark) == 32
        and optuna.load_study(study_name="unit", storage=url).user_attrs["folder_mark"] == mark
    )
    monkeypatch.delenv("SPKID_SEARCH_STUDIES")  # ./studies here, but the recorded folder is still seen
    assert main([*argv, "--trials", "2"]) == 0
    assert artifacts(first) == 2 and not (tmp_path / "studies" / "unit" / "artifacts").exists()
    capsys.readouterr()
    first.rename(moved)  # as a machine that mounts it elsewhere, or not at all
    monkeypatch.setenv("SPKID_SEARCH_STUDIES", str(moved))
    assert main([*argv, "--trials", "3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{first}/unit: not found, so this machine does not see the folder study 'unit'" in err, err
    assert f"--allow-changed to keep them in {moved}/unit from now on" in err
    assert len(optuna.load_study(study_name="unit", storage=url).trials) == 2 and not first.exists()
    (first / "unit").mkdir(parents=True)  # the recorded path made here, locally (as workers once did)
    assert main([*argv, "--trials", "3"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"{first}/unit: has no .study-mark, so this machine does not see the folder" in err, err
    shutil.rmtree(first)
    assert main([*argv, "--trials", "3", "--allow-changed"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert (
        f"note: study 'unit' keeps its checkpoints in {moved}/unit from now on ({first}/unit is not seen"
        in err
    )
    recorded = optuna.load_study(study_name="unit", storage=url).user_attrs
    assert recorded["artifact_dir"] == str((moved / "unit" / "artifacts").resolve()) and artifacts(moved) == 3
    assert not first.exists() and (moved / "unit" / ".study-mark").read_text().strip() == mark


def test_a_new_study_in_a_folder_holding_another_studys_checkpoints_is_refused(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two storages with a study of one name shared studies/<name>: the second overwrote the first's mark
    and their trials' folders collided. A leftover folder with no checkpoint in it is taken over."""
    space = str(write_space(tmp_path / "space.yaml"))
    argv = ["run", "--space", space, "--study", "unit", "--trials", "1", "--data", str(tiny_dir), "--quiet"]
    assert main([*argv, "--storage", f"sqlite:///{tmp_path / 'one.db'}"]) == 0
    mark = (tmp_path / "studies" / "unit" / ".study-mark").read_text()
    capsys.readouterr()
    assert main([*argv, "--storage", f"sqlite:///{tmp_path / 'two.db'}"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds the checkpoints of another study named 'unit'" in err, err
    assert (tmp_path / "studies" / "unit" / ".study-mark").read_text() == mark
    (tmp_path / "studies" / "unit" / ".study-mark").unlink()  # a study from before the mark: the same
    assert main([*argv, "--storage", f"sqlite:///{tmp_path / 'two.db'}"]) == 2
    assert "holds the checkpoints of another study named 'unit'" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "studies" / "unit" / "artifacts")  # nothing of it left
    assert main([*argv, "--storage", f"sqlite:///{tmp_path / 'two.db'}"]) == 0
    assert (tmp_path / "studies" / "unit" / ".study-mark").read_text() != mark


def test_a_resume_whose_folder_holds_another_studys_mark_or_none_yet(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resume whose folder another storage's study of its name took over is refused, and may move with
    --allow-changed (it was refused with advice for a new study); a study from before the mark whose
    folder was never made here (its first run stopped before any trial) gets it made, not refused."""
    space = str(write_space(tmp_path / "space.yaml"))
    url = f"sqlite:///{tmp_path / 'one.db'}"
    argv = ["run", "--space", space, "--study", "unit", "--data", str(tiny_dir), "--quiet", "--storage", url]
    assert main([*argv, "--trials", "1"]) == 0
    mark_file = tmp_path / "studies" / "unit" / ".study-mark"
    mark_file.write_text("0" * 32 + "\n")  # as another study of this name once wrote over it
    capsys.readouterr()
    assert main([*argv, "--trials", "2"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "unit: has another study's .study-mark (another storage's study of this name?)" in err, err
    assert "pass --allow-changed to keep them in" in err
    assert main([*argv, "--trials", "2", "--allow-changed"]) == 0
    study = optuna.load_study(study_name="unit", storage=url)
    assert mark_file.read_text().strip() == study.user_attrs["folder_mark"]
    study.set_user_attr("folder_mark", None)  # a study from before the mark...
    shutil.rmtree(tmp_path / "studies")  # ...whose folder is not here (it never was, say)
    assert main([*argv, "--trials", "2"]) == 0  # nothing to do, and nothing refused
    assert main([*argv, "--trials", "3"]) == 0
    assert (
        mark_file.read_text().strip()
        == optuna.load_study(study_name="unit", storage=url).user_attrs["folder_mark"]
    )


def test_a_server_that_does_not_answer_is_said_before_the_data_set_is_opened(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong PostgreSQL host or database was said only after run had packed the data set (minutes for
    HW4); here the data folder does not exist either, and the storage is what run names."""
    space = write_space(tmp_path / "space.yaml")
    missing = tmp_path / "no-such-data"
    argv = ["run", "--space", str(space), "--trials", "1", "--data", str(missing)]
    code = main([*argv, "--storage", "postgresql://nobody:secret@127.0.0.1:1/none"])
    err = capsys.readouterr().err
    assert code == 2 and "--storage postgresql://nobody:***@127.0.0.1:1/none: cannot connect" in err, err
    assert "no-such-data" not in err and "secret" not in err


def test_the_driver_says_once_that_the_storage_is_lost_and_once_that_it_is_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    outage = supervise_module.OutageLog(patience=300)
    outage.back()  # never lost: nothing to say
    for _ in range(3):  # the driver polls every second through an outage
        outage.lost("connection refused", 0.0)
    outage.back()
    outage.back()
    lines = [" ".join(line.split()) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [
        "storage unreachable (connection refused); workers wait and retry for up to 300 s",
        "storage reachable again",
    ]


def test_run_never_adds_a_study_to_another_programs_sqlite_file(tmp_path: Path, tiny_dir: Path) -> None:
    import sqlite3

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("create table notes(x)")
    before = other.read_bytes()
    space = str(write_space(tmp_path / "unit.yaml"))
    with pytest.raises(UserError, match="other.db holds another program's tables \\(notes\\) and no study"):
        run(RunOptions(space=space, trials=1, data=tiny_dir, storage=f"sqlite:///{other}", display=False))
    assert other.read_bytes() == before
    assert not (tmp_path / "other.db.state-lock").exists()
