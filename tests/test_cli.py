from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from search.checkpoint import read_checkpoint
from search.cli import build_parser, main
from search.config import load_config
from search.data import PackedData
from search.train import TrainResult, train

COMMANDS = ["synth", "prepare", "train", "run", "status", "dashboard", "export-top", "vote", "predict"]


def test_every_command_explains_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    top = capsys.readouterr().out
    registered = set(build_parser()._subparsers._group_actions[0].choices or ())  # type: ignore[union-attr]
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
def test_wrong_arguments_exit_2_with_one_line_that_points_to_help(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    prog = "spkid-search" if argv[0] == "frobnicate" else f"spkid-search {argv[0]}"
    assert lines[0].startswith(f"{prog}: error: ") and lines[0].endswith(f"; see '{prog} --help'"), lines


def test_an_unknown_option_is_reported_with_its_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["run", "--space", "smoke", "--trials", "1", "--bogus"])
    assert info.value.code == 2
    assert capsys.readouterr().err == (
        "spkid-search run: error: unrecognized argument --bogus; see 'spkid-search run --help'\n"
    )


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        # Misspelt, a required option is missing: the misspelling was not named ("required: --trials").
        (
            ["run", "--space", "smoke", "--trails", "3"],
            "unrecognized argument --trails (did you mean --trials?)",
        ),
        (
            ["run", "--spaec", "smoke", "--trials", "3"],
            "unrecognized argument --spaec (did you mean --space?)",
        ),
        (["export-top", "3", "--studdy=x"], "unrecognized argument --studdy (did you mean --study?)"),
        (["run", "--space", "smoke", "--trials", "3", "--x", "--y"], "unrecognized arguments --x, --y"),
        (["run", "--space", "smoke"], "the following arguments are required: --trials"),
        (["run", "--tri", "3"], "the following arguments are required: --space"),  # --tri: --trials
    ],
)
def test_a_misspelt_option_is_named_with_the_one_meant(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert (
        capsys.readouterr().err
        == f"spkid-search {argv[0]}: error: {said}; see 'spkid-search {argv[0]} --help'\n"
    )


def test_the_bare_command_shows_its_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: spkid-search ") and "export-top" in err and "error" not in err


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "search.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_user_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("d_model: [1, 2\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "comments.yaml").write_text("# d_model: 80\n")
    cases = [
        (("train", "--config", "empty.yaml"), "empty.yaml: the config is empty; set at least the model keys"),
        (("train", "--config", "comments.yaml"), "comments.yaml: the config is empty"),
        (("train", "--config", "missing.yaml"), "missing.yaml: file not found"),
        (("train", "--config", "bad.yaml"), "bad.yaml: malformed YAML"),
        (("run", "--space", "bad.yaml", "--trials", "2"), "bad.yaml: malformed YAML"),
        (("run", "--space", "smoke", "--trials", "2", "--storage", "redis://x"), "expected sqlite:///"),
        (("status", "--study", "nope"), "study 'nope' does not exist"),
        (("train", "--config", "bad.yaml", "--device", "cuda:7"), "bad.yaml"),
        (("vote", "bad.yaml", "--out", "x.csv"), "bad.yaml: is a file, not an export folder"),
    ]
    for argv, message in cases:
        proc = _run(*argv, cwd=tmp_path)
        assert proc.returncode == 2, (argv, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
    for command in (
        ("run", "--space", "smoke", "--trials", "2"),
        ("synth", "--out", "s"),
    ):  # as argparse says
        proc = _run(*command, "--seed", "-1", cwd=tmp_path)
        assert proc.returncode == 2 and "argument --seed: must be 0 or more, got -1" in proc.stderr, (
            proc.stderr
        )


def test_an_empty_gpu_list_or_an_unknown_synth_preset_is_refused_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--gpus "," ran on the CPU without a word; SPKID_SEARCH_SYNTH_PRESET=huge said only "unknown synth
    preset", after "generating the synthetic 'huge' set"."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--space", "smoke", "--trials", "1", "--gpus", ","])
    assert (
        exit_.value.code == 2 and "argument --gpus: expected GPU indices like 0,1" in capsys.readouterr().err
    )
    monkeypatch.setenv("SPKID_SEARCH_SYNTH_PRESET", "huge")
    assert main(["train", "--config", "simple", "--steps", "5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "spkid-search train: error: SPKID_SEARCH_SYNTH_PRESET=huge: unknown synth preset (choose one of: "
        "tiny, small, hw4), or unset it for 'small'"
    ], err
    assert not (tmp_path / "studies").exists()


_WITHOUT_TORCH = """
import json, sys
from search.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # argparse's refusals
    code = exc.code
print(json.dumps([code, "torch" in sys.modules]))
"""


def test_bad_paths_and_configs_are_refused_before_torch_is_imported(tmp_path: Path) -> None:
    """Importing torch takes seconds: a typo in a path or a config must be refused before it."""
    (tmp_path / "bad.yaml").write_text("d_model: [1, 2\n")
    (tmp_path / "not-an-export").mkdir()
    cases = [
        ("train", "--config", "bad.yaml"),
        ("vote", "missing", "--out", "x.csv"),
        ("vote", "not-an-export", "--out", "x.csv"),
        ("vote", "missing", "--data", "also-missing", "--out", "x.csv", "--device", "cuda:99"),
        ("train", "--config", "simple", "--device", "gpu"),  # said before a finished run in --out was
    ]
    (tmp_path / "studies" / "runs" / "simple").mkdir(parents=True)
    (tmp_path / "studies" / "runs" / "simple" / "best.pt").write_bytes(b"x")
    for argv in cases:
        proc = subprocess.run(
            [sys.executable, "-c", _WITHOUT_TORCH, *argv],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert json.loads(proc.stdout.splitlines()[-1]) == [2, False], (argv, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, (argv, proc.stderr)
        assert "gpu" not in argv or "argument --device: unknown device 'gpu'" in proc.stderr, proc.stderr


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


TINY_TRAIN = {
    "encoder": "transformer",
    "d_model": 16,
    "heads": 2,
    "ffn_dim": 32,
    "steps": 8,
    "valid_steps": 4,
    "checkpoint_steps": 4,
    "batch_size": 8,
    "segment_len": 32,
    "warmup_steps": 2,
}


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_full_disk_is_one_line_naming_the_file_not_a_traceback(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import search.train

    def full(obj: object, path: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINY_TRAIN))
    monkeypatch.setattr(search.train, "save_atomic", full)
    argv = ["train", "--config", "c.yaml", "--data", str(tiny_dir), "--device", "cpu"]
    argv += ["--quiet", "--out", "run"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(lines) and lines[0].startswith("Training c.yaml")
    line = lines[-1]
    assert line.startswith("spkid-search train: error: no space left on device writing ")
    assert str(Path("run") / "best.pt") in line and "run the same command again" in line

    def broken(obj: object, path: Path) -> None:  # any other OSError is a bug to show whole
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(search.train, "save_atomic", broken)
    with pytest.raises(OSError, match="Input/output error"):
        main([*argv, "--force"])


def test_a_ctrl_c_dropped_inside_a_gc_callback_still_stops_the_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python drops an exception raised in a weakref callback ("Exception ignored in ..."): a Ctrl-C
    that landed in SQLAlchemy's let export-top run to its end, after printing a traceback."""
    import time
    import weakref

    import search.cli

    class Thing:
        pass

    def raising(exc: BaseException) -> Callable[[object], None]:
        def callback(ref: object) -> None:
            raise exc

        return callback

    seen: list[type[BaseException]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_type))
    before = sys.unraisablehook
    ran_on = []

    def status(args: object) -> int:
        for exc in (ValueError("a bug in a callback"), KeyboardInterrupt()):
            thing = Thing()
            ref = weakref.ref(thing, raising(exc))
            del thing  # the callback runs now; what it raises goes to sys.unraisablehook
            assert ref() is None
        for _ in range(200):  # 2 s of work the stop must cut short
            time.sleep(0.01)
        ran_on.append("to the end")
        return 0

    monkeypatch.setattr(search.cli, "cmd_status", status)
    assert main(["status"]) == 130
    err = capsys.readouterr().err
    assert ran_on == [] and err.strip() == "spkid-search status: interrupted"
    assert seen == [ValueError]  # other dropped exceptions still reach the hook there was before
    assert sys.unraisablehook is before  # put back as main() returns


def test_train_keeps_a_finished_run_unless_forced_and_resumes_an_interrupted_one(
    tmp_path: Path,
    tiny_dir: Path,
    tiny_data: PackedData,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINY_TRAIN))
    argv = ["train", "--config", "c.yaml", "--data", str(tiny_dir), "--device", "cpu", "--quiet"]
    assert main([*argv, "--out", "run", "--steps", "4"]) == 0
    best = tmp_path / "run" / "best.pt"
    before = best.read_bytes()
    capsys.readouterr()

    # Refused before the data is even looked at: a missing --data folder is not what gets reported.
    refused = ["train", "--config", "c.yaml", "--data", "nowhere", "--out", "run", "--steps", "8", "--quiet"]
    assert main(refused) == 2
    line = _one_error_line(capsys)
    assert (
        "run/best.pt: a finished run's checkpoint (or a file in its place) is already there; pass --force"
        in line
    )
    assert best.read_bytes() == before and not (tmp_path / "nowhere").exists()

    assert main([*argv, "--out", "run", "--steps", "8", "--force"]) == 0
    assert read_checkpoint(best)["config"]["steps"] == 8

    # An interrupted run (last.pt beside best.pt) goes on without --force, from where it stopped.
    def stop_at_4(step: int, metrics: dict[str, float]) -> str | None:
        if step == 4:
            raise KeyboardInterrupt
        return None

    config = load_config(tmp_path / "c.yaml")
    with pytest.raises(KeyboardInterrupt):
        train(config, tiny_data, "cpu", report=stop_at_4, out_dir=tmp_path / "part")
    assert (tmp_path / "part" / "best.pt").exists() and (tmp_path / "part" / "last.pt").exists()
    results: list[TrainResult] = []

    def recorded(*args: Any, **kwargs: Any) -> TrainResult:
        results.append(train(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr("search.train.train", recorded)
    capsys.readouterr()
    assert main([*argv, "--out", "part"]) == 0, capsys.readouterr().err
    assert [r.resumed_from for r in results] == [4] and results[0].last_step == 8
    assert not (tmp_path / "part" / "last.pt").exists()


def test_train_command_checkpoints_so_a_ctrl_c_resumes_and_says_so(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A config without checkpoint_steps still leaves last.pt behind a Ctrl-C (at each validation)."""
    config = {k: v for k, v in TINY_TRAIN.items() if k != "checkpoint_steps"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    argv = [
        "train",
        "--config",
        "c.yaml",
        "--data",
        str(tiny_dir),
        "--device",
        "cpu",
        "--out",
        "run",
        "--quiet",
    ]
    last = tmp_path / "run" / "last.pt"

    at = {"step": 2}

    def ctrl_c_at(config: Any, data: Any, device: Any, report: Any, **kwargs: Any) -> TrainResult:
        def stop(step: int, metrics: dict[str, float]) -> str | None:
            if step == at["step"]:
                raise KeyboardInterrupt
            return report(step, metrics)

        return train(config, data, device, report=stop, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr("search.train.train", ctrl_c_at)
        assert main([*argv, "--log-every", "1"]) == 130  # before the first checkpoint: says so
        assert not last.exists()
        shown = " ".join(capsys.readouterr().err.split())
        assert "stopped before the first checkpoint (every 4 steps): nothing was saved; the same" in shown
        at["step"] = 4
        assert main(argv) == 130
    assert last.exists()
    shown = " ".join(capsys.readouterr().err.split())
    assert "run/last.pt holds the last checkpoint: run the same command to resume from it" in shown
    # Another budget is another run: refused, and the interrupted one is kept.
    assert main([*argv, "--steps", "12"]) == 2
    assert "run/last.pt: an interrupted run of another config or data set" in _one_error_line(capsys)
    assert last.exists()
    # Cut short (a full disk as it was written): not "replace it with one you trust" but start over.
    kept = last.read_bytes()
    last.write_bytes(kept[: len(kept) // 2])
    assert main(argv) == 2
    assert _one_error_line(capsys).endswith(
        "run/last.pt: the interrupted run's checkpoint cannot be resumed (not a loadable checkpoint: the zip "
        "archive is cut short or corrupt); pass --force to start over"
    )
    last.write_bytes(kept)
    assert main(argv) == 0
    assert "resuming from step 4" in " ".join(capsys.readouterr().err.split())
    assert not last.exists()  # finished: nothing left to resume
    assert main([*argv, "--force"]) == 0  # starts over
    assert "for 8 steps, from step 0" in " ".join(capsys.readouterr().err.split())
    assert main([*argv, "--force", "--steps", "2"]) == 0  # warmup_steps 2 of 8 is scaled down with them
    assert "within warmup_steps" not in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**config, "steps": 2, "warmup_steps": 2}))
    assert main([*argv, "--force"]) == 0  # a config whose own warm-up fills its steps is told so
    err = " ".join(capsys.readouterr().err.split())
    assert "note: 2 steps is within warmup_steps (2)" in err and "padding costs time" not in err
    # Crops longer than every utterance: all padding (1000x slower at 5000 frames), said once.
    meta = json.loads((tiny_dir / "metadata.json").read_text())
    longest = max(u["mel_len"] for utts in meta["speakers"].values() for u in utts)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**config, "steps": 2, "segment_len": longest + 1}))
    assert main([*argv, "--force"]) == 0
    assert (
        f"note: segment_len {longest + 1} is longer than every labelled utterance (the longest has {longest} "
        "frames)" in " ".join(capsys.readouterr().err.split())
    )


def test_synth_replaces_an_earlier_output_only_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["synth", "--out", "s", "--preset", "tiny", "--speakers", "3", "--utterances", "9", "--test", "2"]
    assert main([*argv, "--quiet"]) == 0
    marker = tmp_path / "s" / "synth.json"
    assert json.loads(marker.read_text())["seed"] == 0
    capsys.readouterr()
    assert main([*argv, "--seed", "1", "--quiet"]) == 2
    line = _one_error_line(capsys)
    assert "s already holds a generated set" in line and "--force" in line
    assert line.startswith("spkid-search synth: error: s already")  # the command is named once
    assert json.loads(marker.read_text())["seed"] == 0
    assert main([*argv, "--seed", "1", "--force", "--quiet"]) == 0
    assert json.loads(marker.read_text())["seed"] == 1


def test_status_never_shows_the_storage_password(
    pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The storage line under the tables and the unknown-study error name the URL with its password
    masked (the local server trusts every connection, so any password connects)."""
    import optuna

    from search.storage import open_storage

    url = pg_database.replace("postgres@", "postgres:s3cret@")
    optuna.create_study(study_name="pw", storage=open_storage(url))
    assert main(["status", "--storage", url]) == 0
    shown = capsys.readouterr()
    assert "s3cret" not in shown.out + shown.err and "postgres:***@" in shown.out
    assert main(["status", "--storage", url, "--study", "nope"]) == 2
    line = _one_error_line(capsys)
    assert "s3cret" not in line and "study 'nope' does not exist in postgresql://postgres:***@" in line


def test_an_out_under_a_file_is_one_line_for_every_writing_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """synth, train and export-top failed with a traceback (NotADirectoryError, FileExistsError) when
    --out could not be created; each now says so in one line before doing any work."""
    monkeypatch.chdir(tmp_path)
    Path("afile").write_text("x")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"steps": 5}))
    for argv in (
        ["synth", "--out", "afile/x", "--preset", "tiny"],
        ["train", "--config", str(config), "--out", "afile/x"],
    ):
        assert main(argv) == 2, argv
        assert "afile/x" in _one_error_line(capsys) and not Path("studies").exists()


def test_train_without_a_terminal_prints_a_whole_line_per_report_and_quiet_none(
    tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Piped or in docker, the bar was drawn once at the end, cut at 80 columns (its step count lost)."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINY_TRAIN))
    argv = ["train", "--config", "c.yaml", "--data", str(tiny_dir), "--device", "cpu", "--log-every", "2"]
    assert main([*argv, "--out", "run"]) == 0
    steps = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train step ")]
    assert [line.split()[2] for line in steps] == ["2/8", "4/8", "6/8", "8/8"], steps
    assert " valid " in steps[1] and " valid " in steps[3] and " valid " not in steps[0]
    assert all(line.endswith(" steps/s") and "…" not in line for line in steps)
    assert main([*argv, "--out", "quiet", "--quiet"]) == 0
    assert "train step" not in capsys.readouterr().err


def test_read_only_commands_never_add_optunas_tables_to_a_database(
    tmp_path: Path, pg_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """status, export-top and dashboard pointed at a database that holds no study (another program's
    SQLite file, an empty file, another PostgreSQL database) used to create Optuna's dozen tables in
    it before saying it held no study. Now they say so in one line and leave it as it was."""
    import sqlite3

    import sqlalchemy

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("create table notes(x)")
    empty = tmp_path / "empty.db"
    empty.touch()
    with sqlalchemy.create_engine(pg_database.replace("postgresql://", "postgresql+psycopg://")).begin() as c:
        c.execute(sqlalchemy.text("create table notes(x int)"))
    for url in (f"sqlite:///{other}", f"sqlite:///{empty}", pg_database):
        for argv in (["status"], ["export-top", "1"], ["dashboard"]):
            assert main([*argv, "--storage", url]) == 2, (argv, url)
            assert "holds no Optuna study" in _one_error_line(capsys)
    with sqlite3.connect(other) as con:
        assert [r[0] for r in con.execute("select name from sqlite_master")] == ["notes"]
    assert empty.stat().st_size == 0
    engine = sqlalchemy.create_engine(pg_database.replace("postgresql://", "postgresql+psycopg://"))
    assert sqlalchemy.inspect(engine).get_table_names() == ["notes"]
    engine.dispose()


def test_notices_in_a_pipe_are_whole_lines(tmp_path: Path) -> None:
    """Without a terminal rich broke every notice at 80 columns, so a log line could not be grepped."""
    out = tmp_path / ("a-folder-name-long-enough-to-push-the-line-past-eighty-columns" * 2) / "data"
    proc = subprocess.run(
        [sys.executable, "-m", "search.cli", "synth", "--out", str(out), "--preset", "tiny", "--quiet"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"Wrote synthetic HW4 set to {out}" in proc.stderr.splitlines()


def _python(script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by this Python in a process of its own, from the repository's folder."""
    return subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parents[1],
    )


def test_a_second_ctrl_c_while_the_first_is_reported_still_exits_130_without_a_traceback() -> None:
    """A run printed "interrupted" and then died of SIGINT (exit -2): a second Ctrl-C landed in main()'s
    report of the first, and its KeyboardInterrupt escaped. Here the second one comes as that line is
    written, in a process of its own, as the command runs."""
    script = (
        "import os, signal, sys\n"
        "import search.cli as cli\n"
        "class Err:\n"
        "    sent = False\n"
        "    def write(self, text):\n"
        "        sys.__stderr__.write(text)\n"
        "        if 'interrupted' in text and not Err.sent:\n"
        "            Err.sent = True\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "    def flush(self):\n"
        "        sys.__stderr__.flush()\n"
        "def stopped(args):\n"
        "    raise KeyboardInterrupt\n"
        "cli.cmd_status = stopped\n"
        "sys.stderr = Err()\n"
        "sys.argv = ['spkid-search', 'status']\n"
        "cli.entry()\n"
    )
    proc = _python(script)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert "spkid-search status: interrupted" in proc.stderr


def test_a_stop_after_the_work_is_done_does_not_turn_it_into_a_failure(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """export-top and vote printed "wrote ..." and then exited 130 without a word when Ctrl-C came
    as the command was exiting; SIGTERM during the work exits 143, as shells report it."""
    import search.cli as cli_module

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    real_main = cli_module.main
    try:
        monkeypatch.setattr(cli_module, "main", lambda: 0)
        monkeypatch.setattr(cli_module.gc, "freeze", lambda: os.kill(os.getpid(), signal.SIGINT))
        with pytest.raises(SystemExit) as done:
            cli_module.entry()
        assert done.value.code == 0
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])

    def terminated(args: object) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        return 0

    monkeypatch.setattr(cli_module, "cmd_status", terminated)
    try:
        assert real_main(["status"]) == 143
    finally:
        signal.signal(signal.SIGTERM, handlers[1])


def test_spkid_search_studies_moves_the_cache_the_generated_set_and_trains_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """run packed into ./studies/cache while export-top looked in $SPKID_SEARCH_STUDIES/cache (the set
    was packed twice), and train's runs and the generated set stayed in ./studies."""
    from search.data import default_cache_root
    from search.synth import default_data_dir

    monkeypatch.delenv("SPKID_SEARCH_CACHE", raising=False)
    monkeypatch.delenv("SPKID_SEARCH_DATA", raising=False)
    monkeypatch.setenv("SPKID_SEARCH_STUDIES", str(tmp_path / "alt"))
    assert default_cache_root() == tmp_path / "alt" / "cache"
    assert default_data_dir().parent == tmp_path / "alt" / "data"
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text("d_model: 32\n")
    Path("studies/runs/c").mkdir(parents=True)  # the old default: not where it looks any more
    Path("studies/runs/c/best.pt").write_bytes(b"x")
    (tmp_path / "alt/runs/c").mkdir(parents=True)
    (tmp_path / "alt/runs/c/best.pt").write_bytes(b"x")
    assert main(["train", "--config", str(config)]) == 2
    assert f"{tmp_path / 'alt/runs/c/best.pt'}: a finished run's checkpoint" in capsys.readouterr().err


def test_a_stop_while_the_command_line_is_still_loading_exits_130_without_a_traceback() -> None:
    """A Ctrl-C in the command's first tens of milliseconds (Python importing search.cli) printed a
    KeyboardInterrupt traceback from inside an import. The stop lands in that import here."""
    script = (
        "import builtins, sys\n"
        "real_import = builtins.__import__\n"
        "def stopped_import(name, *args, **kwargs):\n"
        "    if name == 'search.stops':\n"
        "        raise KeyboardInterrupt\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = stopped_import\n"
        "from search.launch import entry\n"
        "sys.argv = ['spkid-search', '--version']\n"
        "entry()\n"
    )
    proc = _python(script)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""
    # Loaded without a stop, it is the command line itself.
    proc = _python(
        "import sys\nfrom search.launch import entry\nsys.argv = ['spkid-search', '--version']\nentry()\n"
    )
    assert proc.returncode == 0 and "spkid-search" in proc.stdout + proc.stderr, proc.stderr


def test_the_installed_command_starts_at_the_launcher() -> None:
    """The console script must enter through search.launch, or the loading window is unguarded again."""
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()  # tomllib: Python 3.11+
    assert re.search(r'^spkid-search = "search\.launch:entry"$', pyproject, re.MULTILINE)
