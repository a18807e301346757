"""The GPU benchmark script's CPU dry run: the script itself works end to end and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_dry_run_writes_results(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_bench.py"),
            "--dry-run",
            "--processes",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
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


def test_gpu_lanes_script_runs_on_cpu_and_writes_its_figures(tmp_path: Path) -> None:
    """bench/gpu_lanes.sh drives `run --per-gpu K`; on CPU that is one worker, which checks the script."""
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "OUT": str(tmp_path),
        "STEPS": "10",
        "PRESET": "tiny",
        "CONFIG": str(ROOT / "spaces" / "baselines" / "simple.yaml"),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_lanes.sh"), "2"],
        capture_output=True,
        text=True,
        timeout=400,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "lanes.json").read_text())
    assert set(result) == {"1", "2"}
    for k, row in result.items():
        assert row["trials"] == int(k) and row["steps_per_trial"] == 10
        assert row["trial_steps_per_s"] > 0 and row["trial_steps_per_s_with_startup"] > 0
        assert row["step_modes"] == ["eager"] and row["workers"] == ["w0"]  # CPU: no graph, no lanes
    assert proc.stdout.count("gpu_lanes: --per-gpu") == 2
