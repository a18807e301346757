from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from search.cli import build_parser, main

COMMANDS = ["synth", "prepare", "train", "run", "status", "dashboard", "export-top", "vote", "predict"]


def test_every_command_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    top = capsys.readouterr().out
    registered = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for command in COMMANDS:
        if command not in registered:
            continue
        assert command in top
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert len(capsys.readouterr().out) > 200


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--space", "smoke", "--trials", "0"],
        ["run", "--space", "smoke", "--trials", "lots"],
        ["synth", "--out", "x", "--preset", "huge"],
        ["train"],
        ["frobnicate"],
    ],
)
def test_wrong_arguments_exit_2_with_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("d_model: [1, 2\n")
    cases = [
        (("train", "--config", "missing.yaml"), "missing.yaml: file not found"),
        (("train", "--config", "bad.yaml"), "bad.yaml: malformed YAML"),
        (("run", "--space", "bad.yaml", "--trials", "2"), "bad.yaml: malformed YAML"),
        (("run", "--space", "smoke", "--trials", "2", "--storage", "redis://x"), "expected sqlite:///"),
        (("status", "--study", "nope"), "study 'nope' does not exist"),
        (("train", "--config", "bad.yaml", "--device", "cuda:7"), "bad.yaml"),
    ]
    for argv, message in cases:
        proc = _run(*argv, cwd=tmp_path)
        assert proc.returncode == 2, (argv, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (argv, proc.stderr)
        assert "Traceback" not in proc.stderr


def test_train_command_uses_synthetic_data_when_none_given(tmp_path: Path) -> None:
    config = {
        "encoder": "transformer",
        "d_model": 16,
        "heads": 2,
        "ffn_dim": 32,
        "steps": 20,
        "valid_steps": 20,
        "batch_size": 8,
        "segment_len": 32,
        "warmup_steps": 2,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    env_data = tmp_path / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "search.cli", "train", "--config", "c.yaml", "--out", "run", "--quiet"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **__import__("os").environ,
            "SPKID_SEARCH_DATA": str(env_data),
            "SPKID_SEARCH_SYNTH_PRESET": "tiny",
        },
    )
    assert proc.returncode == 0, proc.stderr
    assert "No --data given" in proc.stderr
    assert (tmp_path / "run" / "best.pt").exists()
    assert "best valid accuracy" in proc.stderr
