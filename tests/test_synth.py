"""The synthetic generator: exact HW4 layout, determinism, safe writes, and a real (not trivial) task."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from search import synth
from search.errors import UserError
from search.synth import LOG_FLOOR, MARKER, PRESETS, generate, utterance_lengths

UTTR = re.compile(r"uttr-[0-9a-f]{32}\.pt")
SPEAKER = re.compile(r"id\d{5}")
OWN_FILES = {"mapping.json", "metadata.json", "testdata.json", "answers.csv", MARKER}


def _json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _answers(root: Path) -> list[list[str]]:
    with open(root / "answers.csv", encoding="utf-8", newline="") as f:
        return list(csv.reader(f))


def _load(root: Path, name: str) -> np.ndarray:
    tensor = torch.load(root / name)
    assert isinstance(tensor, torch.Tensor)
    return tensor.numpy()


def test_presets() -> None:
    hw4 = PRESETS["hw4"]
    assert (hw4.speakers, hw4.utterances, hw4.test, hw4.n_mels) == (600, 56666, 8000, 40)
    assert (hw4.min_len, hw4.median_len, hw4.max_len) == (91, 540, 7193)
    tiny = PRESETS["tiny"]
    assert tiny.speakers * 3 <= tiny.utterances and tiny.max_len <= 300
    for spec in PRESETS.values():
        assert spec.utterances >= 3 * spec.speakers and spec.min_len <= spec.median_len <= spec.max_len


def test_layout_is_exactly_hw4(tiny_dir: Path) -> None:
    spec = PRESETS["tiny"]
    mapping = _json(tiny_dir / "mapping.json")
    meta = _json(tiny_dir / "metadata.json")
    testdata = _json(tiny_dir / "testdata.json")

    assert set(mapping) == {"speaker2id", "id2speaker"}
    s2i, i2s = mapping["speaker2id"], mapping["id2speaker"]
    assert list(i2s) == [str(i) for i in range(spec.speakers)]
    assert all(isinstance(v, int) for v in s2i.values())
    assert {str(v): k for k, v in s2i.items()} == i2s
    assert all(SPEAKER.fullmatch(name) for name in s2i)
    by_id = [i2s[str(i)] for i in range(spec.speakers)]
    assert by_id != sorted(by_id), "ids must not follow sorted speaker order"

    assert set(meta) == {"n_mels", "speakers"} and meta["n_mels"] == 40
    assert set(meta["speakers"]) == set(s2i)
    counts = [len(utts) for utts in meta["speakers"].values()]
    assert sum(counts) == spec.utterances and min(counts) >= 3
    assert set(testdata) == {"n_mels", "utterances"} and testdata["n_mels"] == 40
    assert len(testdata["utterances"]) == spec.test

    entries = [u for utts in meta["speakers"].values() for u in utts] + testdata["utterances"]
    names = [u["feature_path"] for u in entries]
    assert len(set(names)) == len(names)
    on_disk = {p.name for p in tiny_dir.iterdir()}
    assert on_disk == set(names) | OWN_FILES
    for u in entries:
        assert set(u) == {"feature_path", "mel_len"}
        assert UTTR.fullmatch(u["feature_path"]) and isinstance(u["mel_len"], int)
        assert spec.min_len <= u["mel_len"] <= spec.max_len
        feats = torch.load(tiny_dir / u["feature_path"])
        assert isinstance(feats, torch.Tensor) and feats.dtype == torch.float32
        assert tuple(feats.shape) == (u["mel_len"], 40) and feats.is_contiguous()

    marker = _json(tiny_dir / MARKER)
    assert marker["generator"] == synth.GENERATOR and marker["preset"] == "tiny" and marker["seed"] == 0


def test_answers_follow_testdata_order(tiny_dir: Path) -> None:
    rows = _answers(tiny_dir)
    assert rows[0] == ["Id", "Category"]
    order = [u["feature_path"] for u in _json(tiny_dir / "testdata.json")["utterances"]]
    assert [r[0] for r in rows[1:]] == order
    speakers = _json(tiny_dir / "mapping.json")["speaker2id"]
    assert all(r[1] in speakers for r in rows[1:])
    assert len({r[1] for r in rows[1:]}) > 1
    assert (tiny_dir / "answers.csv").read_bytes().endswith(b"\n")


def test_values_in_the_real_range(tiny_dir: Path) -> None:
    lows, highs = [], []
    for path in sorted(tiny_dir.glob("uttr-*.pt")):
        x = _load(tiny_dir, path.name)
        assert np.isfinite(x).all()
        lows.append(float(x.min()))
        highs.append(float(x.max()))
    assert min(lows) >= LOG_FLOOR - 1e-4
    assert min(highs) >= 5.5 and max(highs) <= 7.5  # peak-normalised like sox --norm
    assert abs(LOG_FLOOR - (-20.7233)) < 1e-4


def test_floor_is_reached_in_band_limited_sessions() -> None:
    geo = synth._geometry(40)
    rng = np.random.default_rng(3)
    voice = synth._make_voice(rng, 40)
    hits = 0.0
    for _ in range(60):
        session = synth._make_session(rng, voice, geo)
        x = synth._render(rng, voice, session, geo, 200)
        assert x.dtype == np.float32 and x.shape == (200, 40)
        hits += float((x < LOG_FLOOR + 0.5).mean())
    assert hits > 0, "some sessions should put bins at (or next to) the ln(1e-9) floor"


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, tiny_dir: Path) -> None:
    again = generate(tmp_path / "again", preset="tiny", seed=0, progress=False)
    files = sorted(p.name for p in tiny_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name

    other = generate(tmp_path / "other", preset="tiny", seed=1, progress=False)
    for name in ("mapping.json", "metadata.json", "testdata.json", "answers.csv"):
        assert (other / name).read_bytes() != (tiny_dir / name).read_bytes()
    first = _json(other / "testdata.json")["utterances"][0]
    assert first["feature_path"] not in files


def test_parallel_workers_give_the_same_files(tmp_path: Path) -> None:
    one, two = (
        generate(tmp_path / n, "tiny", speakers=4, utterances=12, test=4, seed=5, progress=False, workers=w)
        for n, w in (("one", 1), ("two", 2))
    )
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in two.iterdir())
    assert all((one / n).read_bytes() == (two / n).read_bytes() for n in names)


def test_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not empty"):
        generate(out, preset="tiny", progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert not (tmp_path / ".mine.synth-partial").exists()

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        generate(a_file, preset="tiny", progress=False)

    # A synth output with a stranger's file added is no longer ours to delete.
    made = generate(tmp_path / "made", preset="tiny", speakers=3, utterances=9, test=2, progress=False)
    (made / "extra.txt").write_text("x")
    with pytest.raises(UserError, match="not an earlier synth output"):
        generate(made, preset="tiny", progress=False, force=True)


def test_empty_dir_and_earlier_output_are_replaced(tmp_path: Path) -> None:
    """An empty folder is filled; an earlier output is replaced only with force (studies key on it)."""
    out = tmp_path / "set"
    out.mkdir()
    generate(out, preset="tiny", speakers=3, utterances=9, test=2, seed=1, progress=False)
    assert len(list(out.glob("uttr-*.pt"))) == 11
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="already holds a generated set.*--force"):
        generate(out, preset="tiny", speakers=4, utterances=12, test=3, seed=2, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []

    generate(out, preset="tiny", speakers=4, utterances=12, test=3, seed=2, progress=False, force=True)
    fresh = generate(
        tmp_path / "fresh", preset="tiny", speakers=4, utterances=12, test=3, seed=2, progress=False
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in fresh.iterdir())
    assert len(list(out.glob("uttr-*.pt"))) == 15
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_run_leaves_no_finished_looking_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = synth._render

    def flaky(*args: Any, **kwargs: Any) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synth, "_render", flaky)
    out = tmp_path / "set"
    with pytest.raises(KeyboardInterrupt):
        generate(out, preset="tiny", progress=False)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no hidden half-written set left beside it either

    monkeypatch.setattr(synth, "_render", real)
    generate(out, preset="tiny", speakers=3, utterances=9, test=2, progress=False)
    assert (out / "metadata.json").exists() and [p.name for p in tmp_path.iterdir()] == ["set"]


def test_the_current_folder_is_filled_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--out .`` (or the current folder by name) ended in a traceback (a folder named "" has no
    partial to put beside it) or removed the folder the user's shell was in."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    generate(Path("."), preset="tiny", speakers=3, utterances=9, test=2, progress=False)
    assert here.stat().st_ino == inode and (here / "metadata.json").exists()
    generate(here, preset="tiny", speakers=4, utterances=12, test=3, progress=False, force=True)
    assert here.stat().st_ino == inode and len(list(here.glob("uttr-*.pt"))) == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_overrides_and_bad_arguments(tmp_path: Path) -> None:
    out = generate(tmp_path / "o", preset="small", speakers=5, utterances=23, test=7, progress=True)
    meta = _json(out / "metadata.json")
    assert len(meta["speakers"]) == 5
    assert sum(len(v) for v in meta["speakers"].values()) == 23
    assert len(_json(out / "testdata.json")["utterances"]) == 7
    assert len(_answers(out)) == 8

    spec = synth.resolve_spec("small", speakers=10)
    per = PRESETS["small"].utterances // PRESETS["small"].speakers
    assert (spec.speakers, spec.utterances, spec.test) == (10, 10 * per, PRESETS["small"].test)
    assert synth.resolve_spec("hw4", test=0).test == 0

    with pytest.raises(UserError, match="preset"):
        generate(tmp_path / "x", preset="huge", progress=False)
    with pytest.raises(
        UserError, match="too few: the labelled utterances in all need 3 per speaker, 30 for 10"
    ):
        generate(tmp_path / "x", preset="tiny", speakers=10, utterances=29, progress=False)
    with pytest.raises(UserError, match="seed"):
        generate(tmp_path / "x", preset="tiny", seed=-1, progress=False)
    with pytest.raises(UserError, match="speakers"):
        generate(tmp_path / "x", preset="tiny", speakers=0, progress=False)
    with pytest.raises(UserError, match="speakers must be between 2 and"):  # one: trivially "identified"
        generate(tmp_path / "x", preset="tiny", speakers=1, progress=False)
    with pytest.raises(UserError, match="workers"):
        generate(tmp_path / "x", preset="tiny", workers=0, progress=False)
    assert not (tmp_path / "x").exists()


def test_hw4_preset_lengths_follow_the_real_quantiles() -> None:
    lengths = utterance_lengths(PRESETS["hw4"], np.random.default_rng(0), 64666)
    assert lengths.min() >= 91 and lengths.max() <= 7193
    p5, p25, p50, p75, p95, p99 = np.percentile(lengths, [5, 25, 50, 75, 95, 99])
    assert abs(p5 - 368) < 10 and abs(p25 - 440) < 10 and abs(p50 - 540) < 10 and abs(p75 - 737) < 15
    assert abs(p95 - 1337) < 40 and abs(p99 - 2144) < 120
    assert abs(lengths.mean() - 657) < 15
    assert (lengths < 128).sum() < 20


def test_hw4_preset_makes_long_utterances(tmp_path: Path) -> None:
    out = generate(tmp_path / "h", preset="hw4", speakers=3, utterances=12, test=3, seed=4, progress=False)
    meta = _json(out / "metadata.json")
    lens = [u["mel_len"] for v in meta["speakers"].values() for u in v]
    assert max(lens) > 300
    x = _load(out, meta["speakers"][next(iter(meta["speakers"]))][0]["feature_path"])
    assert x.shape[1] == 40 and x.max() <= 7.5


# ---------------------------------------------------------------------------------------------------
# Learnability: mean+std per utterance, a linear classifier. Clearly above chance, clearly below 100%,
# and short crops are harder than whole utterances.


def _stats(x: np.ndarray) -> np.ndarray:
    return np.concatenate([x.mean(0), x.std(0)])


def _logreg_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, tests: list[np.ndarray], test_y: np.ndarray
) -> list[float]:
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    torch.manual_seed(0)
    x = torch.tensor((train_x - mu) / sd, dtype=torch.float32)
    y = torch.tensor(train_y)
    lin = torch.nn.Linear(x.shape[1], int(train_y.max()) + 1)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + 1e-3 * (lin.weight**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return [
            float((lin(torch.tensor((t - mu) / sd, dtype=torch.float32)).argmax(1).numpy() == test_y).mean())
            for t in tests
        ]


def test_a_real_learning_problem(tmp_path: Path) -> None:
    out = generate(tmp_path / "learn", preset="small", speakers=20, utterances=800, test=300, progress=False)
    mapping = _json(out / "mapping.json")["speaker2id"]
    train_x, train_y = [], []
    for name, utts in _json(out / "metadata.json")["speakers"].items():
        for u in utts:
            train_x.append(_stats(_load(out, u["feature_path"])))
            train_y.append(mapping[name])
    rng = np.random.default_rng(0)
    whole, crops, test_y = [], [], []
    for file, speaker in _answers(out)[1:]:
        x = _load(out, file)
        start = int(rng.integers(0, len(x) - 40 + 1))
        whole.append(_stats(x))
        crops.append(_stats(x[start : start + 40]))
        test_y.append(mapping[speaker])
    acc_whole, acc_crop = _logreg_accuracy(
        np.array(train_x), np.array(train_y), [np.array(whole), np.array(crops)], np.array(test_y)
    )
    chance = 1 / 20
    assert acc_whole > 4 * chance, acc_whole
    assert acc_whole < 0.9, acc_whole
    assert acc_crop < acc_whole - 0.05, (acc_crop, acc_whole)


def test_two_commands_needing_the_default_set_at_once_get_one_whole_set(tmp_path: Path) -> None:
    """Two runs started together on a new machine each generated into the same partial folder: one
    removed the other's as a leftover (a traceback), or installed it half-written, and every later
    command without --data used that broken set. Here both start while a third holds the lock."""
    import os
    import subprocess
    import sys
    import time

    from search.layout import read_layout

    env = {**os.environ, "SPKID_SEARCH_DATA": str(tmp_path / "data"), "SPKID_SEARCH_SYNTH_PRESET": "tiny"}
    script = "from search.synth import default_set\nprint(default_set(progress=False))"
    root = tmp_path / "data" / "synth-tiny"
    logs = [tmp_path / f"err{i}.txt" for i in range(2)]
    procs = []
    with synth.generating(root, wait=False):
        for log in logs:
            with log.open("w") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", script],
                        env=env,
                        cwd=Path(__file__).parents[1],
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                    )
                )
        deadline = time.monotonic() + 120
        while not all("waiting for another command that is generating" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.1)
        with pytest.raises(UserError, match="another command is generating .*synth-tiny; wait for it"):
            generate(root, preset="tiny", progress=False)  # synth --out on the same folder: refused
    for proc in procs:
        proc.communicate(timeout=300)
    said = " ".join(log.read_text() for log in logs)
    assert [proc.returncode for proc in procs] == [0, 0], said
    assert said.count("generating the synthetic 'tiny' set") == 1, said  # one generated it ...
    assert said.count("using the synthetic 'tiny' set") == 1, said  # ... and the other used it
    layout = read_layout(root)
    assert all((root / u.feature_path).is_file() for u in layout.train + layout.test)
    assert sorted(p.name for p in root.parent.iterdir()) == ["synth-tiny"]  # nothing else left


def test_a_data_folder_whose_name_looks_like_markup_is_named_as_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The notices were rich markup with the path inside: '[/old]' in it was a MarkupError traceback."""
    monkeypatch.setenv("SPKID_SEARCH_DATA", str(tmp_path / "sets[/old]"))
    monkeypatch.setenv("SPKID_SEARCH_SYNTH_PRESET", "tiny")
    root = synth.default_set(progress=False)
    assert root == tmp_path / "sets[/old]" / "synth-tiny" and (root / "testdata.json").is_file()
    assert f"generating the synthetic 'tiny' set in {root}" in " ".join(capsys.readouterr().err.split())
