"""The README's workflow as a new user runs it: run -> status -> export-top -> vote, all via the CLI."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from search.cli import main
from search.display import size_text


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # The default packed-data cache (studies/cache), as a user has it; conftest points tests elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "SPKID_SEARCH_CACHE"} | {"COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "search.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, f"{args}: {proc.stderr[-3000:]}"
    return proc


def test_run_export_vote_round_trip(
    tmp_path: Path,
    tiny_dir: Path,
    fake_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = str(tiny_dir)
    cli("run", "--space", "smoke", "--trials", "3", "--steps", "60", "--data", data, "--quiet", cwd=tmp_path)
    status = cli("status", cwd=tmp_path)
    assert "best trials" in status.stdout and "best trials" not in status.stderr  # results: stdout
    store = tmp_path / "studies" / "smoke" / "artifacts"
    stored = [p for p in store.iterdir() if not p.name.startswith(".")]
    assert len(stored) == 3  # every trial keeps its best checkpoint; status says how many and where
    line = " ".join(next(x for x in status.stdout.splitlines() if x.startswith("checkpoints")).split())
    assert line.startswith(f"checkpoints 3 files, {size_text(sum(p.stat().st_size for p in stored))} in ")
    assert line.split(" free ")[1].endswith(("kB", "MB", "GB", "TB"))
    cli("export-top", "2", "--data", data, "--quiet", cwd=tmp_path)
    export = tmp_path / "studies" / "smoke" / "export" / "top2"
    manifest = json.loads((export / "manifest.json").read_text())
    assert len(manifest["members"]) == 2
    vote = cli("vote", str(export), "--data", data, "--out", "submission.csv", "--quiet", cwd=tmp_path)
    rows = list(csv.reader((tmp_path / "submission.csv").open()))
    test = json.loads((tiny_dir / "testdata.json").read_text())["utterances"]
    speakers = set(json.loads((tiny_dir / "mapping.json").read_text())["speaker2id"])
    assert rows[0] == ["Id", "Category"]
    assert [r[0] for r in rows[1:]] == [u["feature_path"] for u in test]
    assert all(r[1] in speakers for r in rows[1:])
    # answers.csv exists: the ensemble's row gives its test accuracy beside its validation accuracy
    assert re.search(r"ensemble[^\n]*\d\.\d{4}[^\n]*\d\.\d{4}", vote.stdout), vote.stdout

    # export-top --storage from another working folder wrote its export (and re-packed the data) under
    # that folder's ./studies; the export goes beside the study and the run's packed cache is reused.
    # (In this process, to spare three start-ups; the environment is the subprocesses'.)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("SPKID_SEARCH_CACHE")
    url = f"sqlite:///{tmp_path / 'studies' / 'smoke' / 'study.db'}"
    # Another set's --data is refused by its JSON index, before it is packed (minutes for HW4).
    caches = sorted(p.name for p in (tmp_path / "studies" / "cache").iterdir())
    assert main(["export-top", "1", "--storage", url, "--data", str(fake_dir), "--quiet"]) == 2
    assert f"--data {fake_dir}: not the data set study 'smoke' was run on" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "studies" / "cache").iterdir()) == caches
    assert main(["export-top", "1", "--storage", url, "--data", data, "--quiet"]) == 0
    capsys.readouterr()
    assert main(["export-top", "1", "--storage", url, "--strategy", "greedy"]) == 0
    said = " ".join(capsys.readouterr().err.split())  # it says which set it validated on, as vote does
    assert f"No --data given: using the data set study 'smoke' was run on, {Path(data).resolve()}" in said
    home = tmp_path / "studies" / "smoke"
    assert json.loads((home / "export" / "top1" / "manifest.json").read_text())["members"]
    assert json.loads((home / "export" / "greedy1" / "manifest.json").read_text())["members"]
    assert list((home / "valid_logits").glob("trial-*.npz"))  # greedy's logits cache: beside the study
    assert list(elsewhere.iterdir()) == []  # no ./studies (export, cache, re-packed data) here
    # An export that is there already is refused before the data set is opened (packing HW4: minutes).
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("search.data.open_data", lambda *a, **k: pytest.fail("the data set was opened"))
        assert main(["export-top", "1", "--storage", url, "--data", data, "--quiet"]) == 2
    assert "top1: an export already exists there; pass --force" in capsys.readouterr().err
    # vote from there (the study's data folder, from the manifest) reuses the study's packed cache too
    assert main(["vote", str(home / "export" / "top1"), "--out", "here.csv", "--quiet"]) == 0
    assert [p.name for p in elsewhere.iterdir()] == ["here.csv"]
