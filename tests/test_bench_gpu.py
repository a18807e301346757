"""The GPU benchmark scripts' CPU dry runs: each script works end to end and writes its JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from search.train import PhaseClock

ROOT = Path(__file__).resolve().parent.parent


def _check_dry_run_results(result: dict[str, Any]) -> None:
    """What bench/gpu_bench.py --dry-run --processes writes (gpu.json): every section, every check."""
    assert len(result["steps_per_s"]) == 6 and all(v > 0 for v in result["steps_per_s"].values())
    checks = result["checks"]
    assert checks["loss_falls"] and checks["padding_invariant"] and checks["bf16_fp32_agree"]
    assert checks["graph_matches_eager"] and result["trainer_without_graph"]["steady_steps_per_s"] > 0
    lanes = result["aggregate_trial_steps_per_s"]  # K trials as threads of one process, as run does
    assert set(lanes) == {"1", "2"} and all(v["steps_per_s"] > 0 for v in lanes.values())
    assert all(v["step_modes"] == ["eager"] for v in lanes.values())  # CPU: the graph is CUDA only
    ratio = result["aggregate_over_one_trial"]
    assert ratio["1"] == 1.0 and ratio["2"] == round(lanes["2"]["steps_per_s"] / lanes["1"]["steps_per_s"], 2)
    processes = result["aggregate_trial_steps_per_s_processes"]
    assert set(processes) == {"1", "2"} and all(v > 0 for v in processes.values())
    assert checks["bf16_fp32_same_prediction"] >= 0.99
    assert result["validation_utterances"] > 0 and result["projected_70k_strong_trial_min"] > 0


def test_gpu_script_refuses_without_cuda(tmp_path: Path) -> None:
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the real benchmark would run")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0 and "no CUDA GPU visible" in proc.stderr


def _bench_script(tmp_path: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run bench/<script> in ``tmp_path`` with this interpreter, its output in ``tmp_path``, and ``env``."""
    return subprocess.run(
        ["bash", str(ROOT / "bench" / script), *args],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHON": sys.executable,
            "OUT": str(tmp_path),
            "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
            **env,
        },
    )


def test_gpu_lanes_script_runs_on_cpu_and_writes_its_figures(tmp_path: Path) -> None:
    """bench/gpu_lanes.sh drives `run --per-gpu K`; on CPU that is one worker, which checks the script."""
    simple = str(ROOT / "spaces" / "baselines" / "simple.yaml")
    proc = _bench_script(tmp_path, "gpu_lanes.sh", "2", STEPS="10", PRESET="tiny", CONFIG=simple)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "lanes.json").read_text())
    assert set(result) == {"1", "2"}
    for k, row in result.items():
        assert row["trials"] == int(k) and row["steps_per_trial"] == 10
        assert row["trial_steps_per_s"] > 0 and row["trial_steps_per_s_with_startup"] > 0
        assert row["step_modes"] == ["eager"] and row["workers"] == ["w0"]  # CPU: no graph, no lanes
        parts = dict(row["trial_s"])  # where a trial's time went: its parts add up to its total
        assert parts.pop("trials") == int(k)
        total = parts.pop("total")
        assert list(parts) == [*PhaseClock.PHASES, "rest_of_train", "outside_train"]
        assert parts["steps"] > 0 and parts["validation"] > 0 and parts["checkpoints"] > 0
        assert parts["rest_of_train"] > -0.1 and parts["outside_train"] > -0.1
        assert abs(sum(parts.values()) - total) <= 0.05
        # one worker on CPU: its first trial apart from the later ones
        assert row["trial_s_first_of_lane"]["trials"] == 1
        assert row.get("trial_s_later", {"trials": 0})["trials"] == int(k) - 1
    assert proc.stdout.count("gpu_lanes: --per-gpu") == 2


def _training(scratch: Path) -> bool:
    """True once a worker of the script's run reports a training step (its status file)."""
    for path in scratch.glob("*/studies/lanes1/workers/*/*/*.json"):
        try:
            if "step" in json.loads(path.read_text()):
                return True
        except (OSError, ValueError):  # being replaced right now
            continue
    return False


def test_stopped_bench_script_lets_its_run_end_before_removing_the_folder(tmp_path: Path) -> None:
    """A time cap (timeout's SIGTERM to the process group) stops gpu_lanes.sh mid-run: the run marks its
    trial and ends, then the script removes its scratch folder. It used to remove the folder at once,
    and the still-stopping worker died with a FileNotFoundError traceback."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path),
        "STEPS": "100000",  # never ends by itself
        "PRESET": "tiny",
        "CONFIG": str(ROOT / "spaces" / "baselines" / "simple.yaml"),
        "TMPDIR": str(scratch),  # the script's mktemp -d lands here
        # and not torch's cache: importing torch._dynamo makes $TMPDIR/torchinductor_<user>
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
    }
    proc = subprocess.Popen(
        ["bash", str(ROOT / "bench" / "gpu_lanes.sh")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
        start_new_session=True,  # its own process group, as under timeout
    )
    try:
        deadline = time.time() + 300
        while not _training(scratch):
            assert proc.poll() is None and time.time() < deadline, "the run never started a trial"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, out[-2000:] + err[-2000:]
    assert "gpu_lanes.sh: stopped" in err
    assert "Traceback" not in err, err[-3000:]
    assert "interrupted" in err  # the run itself saw the stop and ended its way
    assert list(scratch.iterdir()) == []  # the scratch folder is gone, after the run ended


def test_gpu_session_runs_every_stage_under_its_own_cap(tmp_path: Path) -> None:
    """bench/gpu_session.sh (one command for a lent GPU session) on CPU at toy sizes: a stage that runs out
    of its cap is recorded as such and the next stages still run; the command then exits non-zero."""
    # LANES_CAP: far too short for the lanes stage's two runs, so it is stopped mid-way.
    proc = _bench_script(tmp_path, "gpu_session.sh", DRY="1", STAGES="lanes smoke steady", LANES_CAP="3")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "session.json").read_text())
    assert [(s["stage"], s["exit"], s["cap"]) for s in summary] == [
        ("lanes", 124, 3),
        ("smoke", 0, 170),
        ("steady", 0, 130),
    ]
    assert "gpu_session: lanes ran out of its 3 s" in proc.stdout
    assert "gpu_session: smoke ok" in proc.stdout and "gpu_session: steady ok" in proc.stdout
    # The smoke stage went from a generated set through run, export-top and vote to a submission.
    rows = (tmp_path / "smoke-submission.csv").read_text().splitlines()
    assert rows[0] == "Id,Category" and len(rows) > 1
    # The steady stage ran gpu.sh's whole dry run (gpu_bench.py, from an install check to its JSON).
    _check_dry_run_results(json.loads((tmp_path / "gpu.json").read_text()))
    assert (tmp_path / "session-lanes.log").exists() and "Traceback" not in (
        tmp_path / "session-lanes.log"
    ).read_text()


def test_gpu_session_refuses_a_bad_setting_before_running_anything(tmp_path: Path) -> None:
    for setting, message in (
        ({"STAGES": "lanes bogus"}, "unknown stage 'bogus' in STAGES (known: lanes smoke steady)"),
        ({"DRY": "yes"}, "DRY must be 0 or 1, not 'yes'"),
    ):
        proc = _bench_script(tmp_path, "gpu_session.sh", **setting)
        assert proc.returncode == 2 and proc.stderr.strip() == f"gpu_session: {message}", proc.stderr
        assert not list(tmp_path.glob("session*")), setting  # not even the first stage ran
