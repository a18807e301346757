"""Export and vote on a small real study: tiny models trained for a few dozen steps, stored in Optuna.

The study is built here exactly as the contract in search/study.py describes it (study attributes,
per-trial config/checkpoint_artifact/checkpoint_sha256/valid_acc), so these tests do not depend on the
search driver. Training is session-scoped (a few seconds in all); studies built from those checkpoints
are cheap, so tests that damage a study get their own copy.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from optuna.artifacts import upload_artifact
from optuna.trial import TrialState
from rich.console import Console

from search.checkpoint import load_model, read_checkpoint
from search.cli import build_parser
from search.config import Config
from search.data import FeatureStore, PackedData, index_digest, make_split, pack
from search.ensemble import combine, method_weights, softmax
from search.errors import UserError
from search.export import ExportResult, export_top, greedy_select, render_export, usable_trials
from search.files import sha256_file, umask
from search.infer import checkpoint_logits, predict_logits
from search.manifest import export_data_root, read_manifest
from search.storage import artifact_store, open_storage
from search.train import train
from search.vote import predict, render_vote, vote
from tests.hw4fake import make_hw4

VALID_RATIO = 0.25
SPLIT_SEED = 0

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and a busy 2-core machine cannot stall them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclass(frozen=True)
class Trained:
    config: Config
    checkpoint: Path
    valid_acc: float
    best_step: int
    parameters: int


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> PackedData:
    """12 speakers, 14 utterances each (48 validate at ratio 0.25), 24 test utterances with answers."""
    root = make_hw4(
        tmp_path_factory.mktemp("ev") / "Dataset", speakers=12, per_speaker=14, test=24, seed=1, max_len=160
    )
    return pack(root, tmp_path_factory.mktemp("ev-cache"), progress=False)


@pytest.fixture(scope="session")
def trained(data: PackedData, tmp_path_factory: pytest.TempPathFactory) -> list[Trained]:
    """Six diverse, deliberately under-trained transformers (40 steps): accuracies spread, not all 1.0."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and immune to a busy machine
    split = make_split(data, VALID_RATIO, SPLIT_SEED)
    base = dict(
        heads=2, ffn_dim=32, steps=40, batch_size=16, segment_len=48, warmup_steps=5, valid_steps=20,
        lr=3e-3, valid_ratio=VALID_RATIO, split_seed=SPLIT_SEED,
    )  # fmt: skip
    out = []
    for i, (seed, d_model) in enumerate([(1, 16), (2, 24), (3, 16), (4, 32), (5, 24), (6, 16)]):
        config = Config.from_dict({**base, "seed": seed, "d_model": d_model})
        run_dir = tmp_path_factory.mktemp(f"run{i}")
        result = train(config, data, "cpu", out_dir=run_dir, split=split, log_every=1000)
        assert result.checkpoint is not None
        out.append(
            Trained(config, result.checkpoint, result.best_accuracy, result.best_step, result.parameters)
        )
    torch.set_num_threads(threads)
    return out


def build_study(root: Path, name: str, data: PackedData, trained: list[Trained]) -> optuna.Study:
    """An Optuna study in the layout search/study.py writes: 5 COMPLETE, 1 PRUNED, 1 FAIL trial."""
    split = make_split(data, VALID_RATIO, SPLIT_SEED)
    root.mkdir(parents=True, exist_ok=True)
    storage = open_storage(f"sqlite:///{root / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    attrs = {
        "fingerprint": data.fingerprint,
        "split_id": split.split_id,
        "valid_ratio": VALID_RATIO,
        "split_seed": SPLIT_SEED,
        "data_root": str(data.root),
        "index_digest": index_digest(data.root),  # as run records it
        "space_name": "test",
        "artifact_dir": str(root / "artifacts"),
    }
    for key, value in attrs.items():
        study.set_user_attr(key, value)
    store = artifact_store(study)
    dist = optuna.distributions.IntDistribution(1, 100)
    for i, run in enumerate(trained):
        trial = study.ask({"seed": dist, "d_model": dist})
        artifact = upload_artifact(artifact_store=store, file_path=str(run.checkpoint), study_or_trial=trial)
        user_attrs = {
            "config": run.config.to_dict(),
            "checkpoint_artifact": artifact,
            "checkpoint_sha256": sha256_file(run.checkpoint),
            "valid_acc": run.valid_acc,
            "best_step": run.best_step,
            "parameters": run.parameters,
            "device": "cpu",
        }
        for key, value in user_attrs.items():
            trial.set_user_attr(key, value)
        if i == len(trained) - 1:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, run.valid_acc)
    failed = study.ask({"seed": dist, "d_model": dist})
    study.tell(failed, state=TrialState.FAIL)
    return study


@pytest.fixture(scope="session")
def study(data: PackedData, trained: list[Trained], tmp_path_factory: pytest.TempPathFactory) -> optuna.Study:
    """The shared, read-only study (tests that damage a study build their own)."""
    return build_study(tmp_path_factory.mktemp("studies") / "ev", "ev", data, trained)


@dataclass(frozen=True)
class Exports:
    top: ExportResult
    greedy: ExportResult


@pytest.fixture(scope="session")
def exports(study: optuna.Study, data: PackedData, tmp_path_factory: pytest.TempPathFactory) -> Exports:
    """A top-3 and a greedy-3 export of the shared study (read-only: tests that damage one copy it)."""
    root = tmp_path_factory.mktemp("exports")
    with pytest.MonkeyPatch.context() as mp:  # session fixtures run before the per-test chdir
        mp.chdir(root)  # nothing lands in the repo, whatever goes to the working folder
        top = export_top(study, 3, out=root / "top3", data=data)
        greedy = export_top(study, 3, out=root / "greedy3", strategy="greedy", data=data)
    return Exports(top, greedy)


def test_study_is_diverse(trained: list[Trained]) -> None:
    """The ensemble tests only mean something if the members are imperfect and differ."""
    accs = [t.valid_acc for t in trained]
    assert max(accs) < 1.0 and len(set(accs)) >= 3, accs


def test_export_top_writes_checked_folder(study: optuna.Study, data: PackedData) -> None:
    result = export_top(study, 3, data=data)
    out = Path(study.user_attrs["artifact_dir"]).parent / "export" / "top3"  # beside the study, not in ./
    assert result.out == out and out.is_dir()
    best = usable_trials(study)[:3]
    assert [m.trial for m in result.members] == [t.number for t in best]
    assert [m.valid_acc for m in result.members] == [t.user_attrs["valid_acc"] for t in best]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [f"trial-{t.number}.pt" for t in best]
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["study"] == "ev" and manifest["strategy"] == "top"
    split = make_split(data, VALID_RATIO, SPLIT_SEED)
    assert manifest["data"]["fingerprint"] == data.fingerprint
    assert manifest["split"] == {"ratio": VALID_RATIO, "seed": SPLIT_SEED, "split_id": split.split_id}
    for entry, trial in zip(manifest["members"], best, strict=True):
        assert entry["trial"] == trial.number and entry["weight"] == 1
        assert entry["params"] == trial.params
        assert entry["sha256"] == sha256_file(out / entry["file"]) == trial.user_attrs["checkpoint_sha256"]
    assert result.ensemble_valid_acc is not None
    text = _render(render_export(result))
    assert f"{result.ensemble_valid_acc:.4f}" in text and "soft vote" in text and str(best[0].number) in text


def test_export_without_data_scores_on_the_study_data_folder(
    study: optuna.Study, data: PackedData, tmp_path: Path
) -> None:
    result = export_top(study, 2, out=tmp_path / "e")
    assert result.ensemble_valid_acc is not None
    assert result.ensemble_valid_acc == export_top(study, 2, out=tmp_path / "f", data=data).ensemble_valid_acc


def test_export_skips_scoring_when_the_study_data_is_gone(
    data: PackedData, trained: list[Trained], tmp_path: Path
) -> None:
    study = build_study(tmp_path / "studies" / "moved", "moved", data, trained)
    study.set_user_attr("data_root", str(tmp_path / "moved-away"))
    result = export_top(study, 2, out=tmp_path / "e")
    assert result.ensemble_valid_acc is None and len(result.members) == 2
    assert "pass --data" in _render(render_export(result))
    with pytest.raises(UserError, match="greedy selection needs the validation data"):
        export_top(study, 2, out=tmp_path / "g", strategy="greedy")


def test_a_study_data_folder_edited_in_place_is_said_to_have_changed(
    data: PackedData, trained: list[Trained], tmp_path: Path
) -> None:
    """Without --data, export-top said "--data D: ... not the one the study was trained on (from D); pass
    that folder": the folder it had just refused, and a flag the user never gave."""
    study = build_study(tmp_path / "studies" / "edited", "edited", data, trained)
    study.set_user_attr("fingerprint", "0" * 16)  # as recorded before its files were rewritten
    with pytest.raises(UserError) as info:
        export_top(study, 2, out=tmp_path / "g", strategy="greedy")
    assert str(info.value) == (
        f"{data.root}: its features changed since study 'edited' was trained on them (data set "
        f"{data.fingerprint}, was {'0' * 16}); restore them, or pass --data with an unchanged copy of the set"
    )
    assert not (tmp_path / "g").exists()
    elsewhere = dataclasses.replace(data, root=tmp_path / "copy")  # another folder: "pass that folder"
    with pytest.raises(
        UserError, match=f"^--data {tmp_path / 'copy'}: .* from {data.root}\\); pass that folder"
    ):
        export_top(study, 2, out=tmp_path / "g", strategy="greedy", data=elsewhere)


def test_greedy_rounds_add_the_member_that_mends_the_best_ones_errors() -> None:
    """A (60% right), B (50%) and C (40%) rank A, B, C; no top-n prefix beats A alone, but A + C is right
    on every row: only a selection round finds it (with no rounds run, the tests above still passed)."""
    labels = np.zeros(10, dtype=np.int64)

    def model(p0: list[float]) -> np.ndarray:
        return np.stack([np.array(p0), 1 - np.array(p0)], axis=1)

    a = model([0.9] * 6 + [0.4] * 4)
    b = model([0.9] * 5 + [0.05] + [0.1] * 4)
    c = model([0.45] * 6 + [0.9] * 4)
    counts, acc, history = greedy_select([a, b, c], labels, k=3, rounds=6)
    assert history[0]["valid_acc"] == pytest.approx(0.6)  # the best start: A alone
    assert acc == 1.0 and set(counts) == {0, 2}


def test_greedy_never_below_top_k_or_best_single(
    exports: Exports, study: optuna.Study, data: PackedData
) -> None:
    """What greedy guarantees by construction (its start includes top-K and the best single model).

    Plain soft voting of the top K carries no such guarantee, so it is only recorded, not asserted.
    """
    top, greedy = _acc(exports.top.ensemble_valid_acc), _acc(exports.greedy.ensemble_valid_acc)
    best_single = max(t.user_attrs["valid_acc"] for t in usable_trials(study))
    assert greedy >= top and greedy >= best_single
    assert len(exports.greedy.members) <= 3
    manifest = json.loads((exports.greedy.out / "manifest.json").read_text())
    weights = {m["trial"]: m["weight"] for m in manifest["members"]}
    added = [n for step in manifest["selection"] for n in step["added"]]
    assert all(w >= 1 for w in weights.values()) and set(weights) <= set(added)
    assert manifest["strategy"] == "greedy" and manifest["candidates"] == len(usable_trials(study))
    print(f"best single {best_single:.4f}; K=3: top {top:.4f}, greedy {greedy:.4f}")
    for k in (1, 4):  # K=1: greedy may pick the best single model or a repeat of it, never worse
        top_k = export_top(study, k, out=Path(f"top{k}"), data=data)
        greedy_k = export_top(study, k, out=Path(f"greedy{k}"), strategy="greedy", data=data)
        assert _acc(greedy_k.ensemble_valid_acc) >= _acc(top_k.ensemble_valid_acc)
        assert _acc(greedy_k.ensemble_valid_acc) >= best_single
        print(f"K={k}: top {top_k.ensemble_valid_acc:.4f}, greedy {greedy_k.ensemble_valid_acc:.4f}")
    # Greedy maximises the figure it prints: the table says it is in-sample (top-K's does not need to).
    assert "chosen on these validation utterances, so optimistic" in " ".join(
        _render(render_export(greedy_k)).split()
    )
    assert "optimistic" not in _render(render_export(top_k))
    # K caps greedy's members: with fewer trials than K it exports them all at most, and says why.
    n = len(usable_trials(study))
    assert f"(K={n + 2}, but only {n} usable trials to choose from)" in " ".join(
        _render(
            render_export(export_top(study, n + 2, out=Path("greedy-many"), strategy="greedy", data=data))
        ).split()
    )
    assert "usable trials to choose from" not in _render(render_export(greedy_k))
    # Fewer members than K, with more trials than K to choose from: greedy stopped gaining, and says so.
    shown = " ".join(_render(render_export(greedy_k)).split())
    said = "(K=4 at most: adding another trial did not raise the ensemble's score)"
    assert (said in shown) == (len(greedy_k.members) < 4), shown
    wide = dataclasses.replace(exports.greedy, k=len(exports.greedy.members) + 1, candidates=n)
    assert f"(K={wide.k} at most: adding another" in " ".join(_render(render_export(wide)).split())


def test_vote_round_trip_writes_kaggle_csv(exports: Exports, data: PackedData, tmp_path: Path) -> None:
    out = tmp_path / "submission.csv"
    result = vote(exports.top.out, data, out)
    lines = out.read_text().splitlines()
    assert lines[0] == "Id,Category"
    rows = list(csv.reader(lines[1:]))
    listing = json.loads((Path(data.root) / "testdata.json").read_text())["utterances"]
    assert [r[0] for r in rows] == [u["feature_path"] for u in listing]
    mapping = json.loads((Path(data.root) / "mapping.json").read_text())
    assert {r[1] for r in rows} <= set(mapping["id2speaker"].values())
    assert [r[1] for r in rows] == result.categories
    assert len(result.members) == 3 and all(m.valid_acc is not None for m in result.members)
    assert result.test_acc is not None and result.valid_acc is not None
    assert not list(tmp_path.glob(".*.tmp"))  # no temp file left beside the CSV
    # Soft vote on the export reproduces the export's own ensemble score (up to one float near-tie).
    assert abs(_acc(result.valid_acc) - _acc(exports.top.ensemble_valid_acc)) <= 1 / result.n_valid + 1e-9
    assert "ensemble" in _render(render_vote(result))


def test_vote_methods_and_greedy_weights(exports: Exports, data: PackedData, tmp_path: Path) -> None:
    manifest = [m.weight for m in read_manifest(exports.top.out).members]
    for method in ("hard", "weighted"):
        result = vote(exports.top.out, data, tmp_path / f"{method}.csv", method=method)
        assert result.method == method and result.valid_acc is not None
        applied = [m.weight for m in result.members]  # what the table shows is what the vote used
        if method == "hard":
            assert applied == manifest
        else:
            assert applied == pytest.approx(
                [w * (m.valid_acc or 0) for w, m in zip(manifest, result.members, strict=True)]
            )
    greedy = vote(exports.greedy.out, data, tmp_path / "greedy.csv")
    assert abs(_acc(greedy.valid_acc) - _acc(exports.greedy.ensemble_valid_acc)) <= 1 / greedy.n_valid + 1e-9
    with pytest.raises(UserError, match="unknown voting method 'median'"):
        vote(exports.top.out, data, tmp_path / "x.csv", method="median")


@pytest.mark.parametrize("method", ["soft", "hard", "weighted"])
def test_the_csv_is_the_ensembles_vote_by_its_method(
    exports: Exports, data: PackedData, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each member's test logits, calibrated by the temperature the vote reports and combined by the
    method with the weights it reports, give the CSV's every row (a vote that ignored its method, or
    wrote one member's predictions, passed the tests before)."""
    import search.vote

    used: list[str] = []  # this set's members agree on every test row whatever the method: watch it too
    real = search.vote.combine

    def watched(probs: list[np.ndarray], weights: list[float], method: str) -> np.ndarray:
        used.append(method)
        return real(probs, weights, method)

    monkeypatch.setattr(search.vote, "combine", watched)
    out = tmp_path / f"{method}.csv"
    result = vote(exports.greedy.out, data, out, method=method)
    assert used and set(used) == {method}
    members = read_manifest(exports.greedy.out).members
    store = FeatureStore(data)
    probs = []
    for member, shown in zip(members, result.members, strict=True):
        path = exports.greedy.out / member.file
        (logits,) = checkpoint_logits(read_checkpoint(path), path, data, store, [data.test])
        probs.append(softmax(logits, shown.temperature))
    weights = method_weights([m.weight for m in members], [m.valid_acc for m in result.members], method)
    assert [m.weight for m in result.members] == pytest.approx(weights)
    expected = [data.speakers[i] for i in combine(probs, weights, method).argmax(axis=1)]
    rows = [line.split(",")[1] for line in out.read_text().splitlines()[1:]]
    assert rows == expected


def test_vote_refuses_to_overwrite_csv(exports: Exports, data: PackedData, tmp_path: Path) -> None:
    out = tmp_path / "submission.csv"
    out.write_text("Id,Category\nkeep,me\n")
    with pytest.raises(UserError, match="already exists; pass --force"):
        vote(exports.top.out, data, out)
    assert out.read_text() == "Id,Category\nkeep,me\n"
    vote(exports.top.out, data, out, force=True)
    assert out.read_text().startswith("Id,Category\n")


def test_force_never_replaces_an_input_with_the_csv(
    exports: Exports, trained: list[Trained], data: PackedData, tmp_path: Path
) -> None:
    """vote --force --out EXPORT/manifest.json and predict --force --out CHECKPOINT replaced their own
    input with the CSV; an --out that cannot be created fails before the members run."""
    export = _copy_export(exports.top.out, tmp_path)
    before = _snapshot(export)
    with pytest.raises(
        UserError, match="^--out .*manifest.json: is a file of .*export, an input of this command"
    ):
        vote(export, data, export / "manifest.json", force=True)
    checkpoint = tmp_path / "one.pt"
    shutil.copy(trained[0].checkpoint, checkpoint)
    with pytest.raises(UserError, match="^--out .*one.pt: is .*one.pt, an input of this command"):
        predict(checkpoint, data, checkpoint, force=True)
    assert read_checkpoint(checkpoint)["config"]  # still the checkpoint
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="afile is a file"):
        vote(export, data, tmp_path / "afile" / "submission.csv")
    assert _snapshot(export) == before
    # --force replaces only an earlier submission: not a study database or another export's checkpoint.
    other = tmp_path / "study.db"
    other.write_bytes(b"SQLite format 3\0" + bytes(100))
    for victim in (other, exports.top.out / "manifest.json"):
        kept = victim.read_bytes()
        for force in (True, False):  # without --force too: not told to pass a --force that would not do
            with pytest.raises(UserError, match="exists and is not a submission CSV .*--force replaces only"):
                vote(export, data, victim, force=force)
        assert victim.read_bytes() == kept
    # Nor another data set's answers.csv, whose header is a submission's.
    other_set = tmp_path / "other-set"
    other_set.mkdir()
    for name in ("metadata.json", "testdata.json"):
        (other_set / name).write_text("{}")
    answers = other_set / "answers.csv"
    answers.write_text("Id,Category\nuttr-1.pt,id10001\n")
    with pytest.raises(UserError, match="answers.csv: is a file of the data set in .*, never replaced"):
        vote(export, data, answers, force=True)
    assert answers.read_text() == "Id,Category\nuttr-1.pt,id10001\n"


def _copy_export(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(src, dst)
    return dst


def test_tampered_checkpoint_is_refused(exports: Exports, data: PackedData, tmp_path: Path) -> None:
    export = _copy_export(exports.top.out, tmp_path)
    victim = export / read_manifest(export).members[1].file
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="checksum mismatch") as err:
        vote(export, data, tmp_path / "s.csv")
    assert victim.name in str(err.value) and not (tmp_path / "s.csv").exists()


def test_corrupt_checkpoint_is_refused(exports: Exports, data: PackedData, tmp_path: Path) -> None:
    """A file that matches the manifest but is not a checkpoint: weights_only loading refuses it."""
    export = _copy_export(exports.top.out, tmp_path)
    manifest = json.loads((export / "manifest.json").read_text())
    victim = export / manifest["members"][0]["file"]
    victim.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    manifest["members"][0]["sha256"] = sha256_file(victim)
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a loadable checkpoint") as err:
        vote(export, data, tmp_path / "s.csv")
    assert victim.name in str(err.value)


def test_an_export_mixing_studies_is_refused(exports: Exports, data: PackedData, tmp_path: Path) -> None:
    """A member trained on another validation split (copied in from another study's export, manifest
    updated to match): its validation rows may be another member's training rows."""
    export = _copy_export(exports.top.out, tmp_path)
    manifest = json.loads((export / "manifest.json").read_text())
    victim = export / manifest["members"][0]["file"]
    torch.save({**read_checkpoint(victim), "split_id": "0123456789abcdef"}, victim)
    manifest["members"][0]["sha256"] = sha256_file(victim)
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="trained on validation split 0123456789abcdef.*mixes studies"):
        vote(export, data, tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.parametrize("escape", ["../outside.pt", "/etc/passwd", "sub/../../outside.pt", "link.pt"])
def test_manifest_path_escaping_the_folder_is_refused(
    exports: Exports, data: PackedData, tmp_path: Path, escape: str
) -> None:
    export = _copy_export(exports.top.out, tmp_path)
    outside = tmp_path / "outside.pt"
    shutil.copy(export / read_manifest(export).members[0].file, outside)
    if escape == "link.pt":
        (export / "link.pt").symlink_to(outside)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["members"][0]["file"] = escape
    manifest["members"][0]["sha256"] = sha256_file(outside)
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="outside the export folder|escapes the export folder") as err:
        vote(export, data, tmp_path / "s.csv")
    assert escape in str(err.value)


def test_export_records_its_data_folder(exports: Exports, data: PackedData, tmp_path: Path) -> None:
    assert export_data_root(read_manifest(exports.top.out)) == Path(data.root)  # vote's default --data
    export = _copy_export(exports.top.out, tmp_path)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["data"]["root"] = str(tmp_path / "gone")
    (export / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="is not available; pass --data"):
        export_data_root(read_manifest(export))


def test_vote_without_data_says_which_folder_it_used(
    exports: Exports, data: PackedData, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """run says which data set it uses when --data is left out; vote used the manifest's silently."""
    from search.cli import main

    assert main(["vote", str(exports.top.out), "--out", str(tmp_path / "s.csv")]) == 0
    err = capsys.readouterr().err
    assert f"No --data given: using the data set the export's study was run on, {data.root}" in err, err


def test_vote_only_reads_a_packing_of_its_own_where_the_manifest_names_the_cache(
    exports: Exports, data: PackedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is not covered by the members' checksums: an edited or received one named any
    folder as the cache, and vote packed the set into it, or scored a packing planted there."""
    import search.data as data_module
    from search.cli import main

    monkeypatch.delenv("SPKID_SEARCH_CACHE")
    key = Path(data.cache_dir).name
    planted = tmp_path / "planted"
    shutil.copytree(data.cache_dir, planted / key)
    features = np.load(planted / key / "features.npy", mmap_mode="r+")
    features[:] = 0  # every utterance the same: one speaker for every test row
    features.flush()
    del features
    received = tmp_path / "received"
    shutil.copytree(exports.top.out, received)
    manifest = json.loads((received / "manifest.json").read_text())

    def vote_with_cache(cache: Path, out: str) -> list[str]:
        manifest["data"]["cache"] = str(cache)
        (received / "manifest.json").write_text(json.dumps(manifest))
        assert main(["vote", str(received), "--out", out, "--quiet"]) == 0
        return Path(out).read_text().splitlines()

    empty = tmp_path / "empty"
    empty.mkdir()
    honest = vote_with_cache(empty, "honest.csv")
    assert list(empty.iterdir()) == []  # nothing packed where the manifest pointed ...
    assert (Path("studies") / "cache" / key / "index.npz").is_file()  # ... but in this folder's cache
    shutil.rmtree("studies")
    real_uid = os.getuid()
    monkeypatch.setattr(data_module.os, "getuid", lambda: real_uid + 1)  # the planted files: another's
    assert vote_with_cache(planted, "planted.csv") == honest
    monkeypatch.setattr(data_module.os, "getuid", lambda: real_uid)
    shutil.rmtree("studies")
    assert vote_with_cache(Path(data.cache_dir).parent, "own.csv") == honest  # the study's own packing ...
    assert not (Path("studies") / "cache").exists()  # ... read where it is: nothing packed again


def test_vote_refuses_other_data(exports: Exports, fake_data: PackedData, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="pass the data folder the study 'ev' was trained on"):
        vote(exports.top.out, fake_data, tmp_path / "s.csv")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_export_never_overwrites_and_force_replaces(
    study: optuna.Study, data: PackedData, tmp_path: Path
) -> None:
    out = tmp_path / "exp" / "mine"
    export_top(study, 2, out=out)
    before = _snapshot(out)
    with pytest.raises(UserError, match="already exists there; pass --force"):
        export_top(study, 3, out=out, strategy="greedy", data=data)
    assert _snapshot(out) == before
    result = export_top(study, 3, out=out, force=True)
    assert result.replaced and len(result.members) == 3
    assert json.loads((out / "manifest.json").read_text())["k"] == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["mine"]  # no temp or old folder left
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask()  # not tempfile's private 0700
    assert (out / "manifest.json").stat().st_mode & 0o777 == 0o666 & ~umask()


def test_force_never_wipes_a_folder_that_is_not_an_export(
    study: optuna.Study, data: PackedData, tmp_path: Path
) -> None:
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("my notes")
    for force in (False, True):
        with pytest.raises(UserError, match=r"is not an export \(no manifest.json\); choose another --out"):
            export_top(study, 1, out=precious, force=force, data=data)
    assert (precious / "notes.txt").read_text() == "my notes" and len(list(precious.iterdir())) == 1
    for here in (Path("."), Path("..")):  # the current folder or one above it: refused, even with --force
        with pytest.raises(UserError, match="is the current folder or one above it"):
            export_top(study, 1, out=here, force=True, data=data)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="exists and is not a folder"):
        export_top(study, 1, out=blocker, force=True, data=data)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert not export_top(study, 1, out=empty, data=data).replaced  # an empty folder is used as it is
    assert (empty / "manifest.json").is_file()


def test_force_replaces_an_export_but_not_a_users_file_inside_it(
    study: optuna.Study, data: PackedData, tmp_path: Path
) -> None:
    """A submission voted into the export folder was deleted without a word by export-top --force."""
    out = tmp_path / "top2"
    export_top(study, 2, out=out)
    (out / "submission.csv").write_text("Id,Category\nuttr-1.pt,id1\n")
    before = _snapshot(out)
    with pytest.raises(
        UserError, match=r"holds files that are not the export's \(submission.csv\); move them"
    ):
        export_top(study, 3, out=out, force=True)
    assert _snapshot(out) == before
    (out / "submission.csv").unlink()
    assert export_top(study, 3, out=out, force=True).replaced  # the export's own files alone: replaced


def test_fewer_than_k_usable_trials_leaves_nothing(study: optuna.Study) -> None:
    with pytest.raises(UserError, match=r"only 5 usable trial\(s\).*fewer than K=6.*--include-pruned"):
        export_top(study, 6)
    assert not Path("studies").exists()
    with_pruned = export_top(study, 6, include_pruned=True)
    assert len(with_pruned.members) == 6  # the PRUNED one has a checkpoint
    assert with_pruned.out.name == "top6-with-pruned"  # not the folder a plain top-6 export uses
    with pytest.raises(UserError, match="only 6 usable"):
        export_top(study, 7, out=Path("elsewhere") / "deep" / "x", include_pruned=True)
    assert not Path("elsewhere").exists()
    # greedy's K caps the distinct members ("at most K distinct"): 5 usable trials still make a greedy 6
    greedy = export_top(study, 6, strategy="greedy")
    assert 1 <= len(greedy.members) <= 5 and greedy.out.name == "greedy6"


@pytest.mark.parametrize("damage", ["missing", "modified"])
def test_broken_artifact_is_refused_and_nothing_written(
    damage: str, data: PackedData, trained: list[Trained], tmp_path: Path
) -> None:
    study = build_study(tmp_path / "own", "own", data, trained)
    victim = usable_trials(study)[1]
    stored = Path(study.user_attrs["artifact_dir"]) / victim.user_attrs["checkpoint_artifact"]
    if damage == "missing":
        stored.unlink()
    else:
        stored.write_bytes(stored.read_bytes() + b"\0")
    pattern = "is missing" if damage == "missing" else "checksum mismatch"
    out = tmp_path / "exports" / "t"
    with pytest.raises(UserError, match=pattern) as err:
        export_top(study, 3, out=out, data=data)
    assert str(stored) in str(err.value) and f"trial {victim.number}" in str(err.value)
    assert not (tmp_path / "exports").exists()
    kept = tmp_path / "kept"
    export_top(study, 1, out=kept, data=data)  # the best trial alone is intact
    before = _snapshot(kept)
    with pytest.raises(UserError, match=pattern):  # a failed --force leaves the old export as it was
        export_top(study, 3, out=kept, force=True, data=data)
    written = {p.name for p in tmp_path.iterdir()} - {"studies"}  # studies/own/: cached validation logits
    assert _snapshot(kept) == before and written == {"kept", "own"}
    with pytest.raises(UserError, match=pattern):  # greedy needs every candidate's logits
        export_top(study, 2, out=out, strategy="greedy", data=data)
    assert not (tmp_path / "exports").exists()
    if damage == "missing":  # the message's advice works: the export goes on without that trial
        assert f"--exclude {victim.number}" in str(err.value)
        result = export_top(study, 3, out=out, strategy="greedy", data=data, exclude={victim.number})
        assert victim.number not in {m.trial for m in result.members}
        with pytest.raises(UserError, match=f"not counting --exclude {victim.number}\\), fewer than K=9"):
            export_top(study, 9, out=tmp_path / "nine", data=data, exclude={victim.number})
        with pytest.raises(
            UserError, match="--exclude: study 'own' has no trial 98, 99; see 'spkid-search status'"
        ):
            export_top(study, 1, out=tmp_path / "typo", data=data, exclude={victim.number, 98, 99})
        everyone = {t.number for t in usable_trials(study)}
        with pytest.raises(
            UserError, match="only 0 usable .*none to select from; pass --include-pruned or run"
        ):
            export_top(study, 2, out=tmp_path / "none", strategy="greedy", data=data, exclude=everyone)
    else:
        assert f"--exclude {victim.number}" in str(err.value)  # a damaged one can be left out too


def test_export_top_exclude_is_a_list_of_trial_numbers() -> None:
    parser = build_parser()
    assert parser.parse_args(["export-top", "2", "--exclude", "3,7"]).exclude == {3, 7}
    assert parser.parse_args(["export-top", "2"]).exclude == set()
    for bad in ("x", "-1", ","):
        with pytest.raises(SystemExit):
            parser.parse_args(["export-top", "2", "--exclude", bad])


def test_predict_single_checkpoint(trained: list[Trained], data: PackedData, tmp_path: Path) -> None:
    run = trained[0]
    out = tmp_path / "one.csv"
    result = predict(run.checkpoint, data, out)
    assert len(result.members) == 1 and result.valid_acc == pytest.approx(
        run.valid_acc, abs=1 / result.n_valid
    )
    model, _, ckpt = load_model(run.checkpoint)
    expected = predict_logits(model, FeatureStore(data), data.test).argmax(axis=1)
    rows = out.read_text().splitlines()
    assert rows[0] == "Id,Category"
    assert [r.split(",")[1] for r in rows[1:]] == [ckpt["speakers"][int(c)] for c in expected]
    shown = _render(render_vote(result))
    assert "prediction ->" in shown and "ensemble" not in shown  # one model: no ensemble row
    with pytest.raises(UserError, match="already exists"):
        predict(run.checkpoint, data, out)
    with pytest.raises(UserError, match="checkpoint not found"):
        predict(tmp_path / "nope.pt", data, tmp_path / "two.csv")


def test_predict_on_an_exports_member_names_its_trial(
    exports: Exports, data: PackedData, tmp_path: Path
) -> None:
    member = read_manifest(exports.top.out).members[0]
    result = predict(exports.top.out / member.file, data, tmp_path / "one.csv")
    assert [m.trial for m in result.members] == [member.trial] and member.trial is not None
    # Another checkpoint copied in under that name is no trial's.
    export = _copy_export(exports.top.out, tmp_path)
    other = read_manifest(exports.top.out).members[1]
    shutil.copyfile(exports.top.out / other.file, export / member.file)
    result = predict(export / member.file, data, tmp_path / "two.csv")
    assert [m.trial for m in result.members] == [None]


def test_predict_refuses_a_checkpoint_of_another_data_set(
    trained: list[Trained], data: PackedData, tmp_path: Path
) -> None:
    """Its class ids would name other speakers: another set, other mel bins or another speaker list."""
    ckpt = read_checkpoint(trained[0].checkpoint)
    reversed_speakers = list(reversed(ckpt["speakers"]))
    for change, said in (
        (
            {"fingerprint": "0123456789abcdef", "speakers": reversed_speakers},
            "trained on data set 0123456789abcdef, its speaker list differs from",
        ),
        ({"n_mels": 80}, "expects 80 mel bins, --data"),
        ({"speakers": reversed_speakers}, "its speaker list differs from"),
    ):
        edited = tmp_path / f"edited-{next(iter(change))}.pt"
        torch.save({**ckpt, **change}, edited)
        with pytest.raises(UserError, match=said):
            predict(edited, data, tmp_path / "out.csv")
        assert not (tmp_path / "out.csv").exists()


def _same_speakers_other_set(data: PackedData, tmp_path: Path) -> tuple[PackedData, set[str]]:
    """Another data set of the same speakers: the study's set with its last four test utterances left
    out and every third labelled utterance under a new name (as new recordings); those names."""
    root = tmp_path / "other"
    shutil.copytree(data.root, root)
    listing = json.loads((root / "testdata.json").read_text())
    listing["utterances"] = listing["utterances"][:-4]
    (root / "testdata.json").write_text(json.dumps(listing))
    meta = json.loads((root / "metadata.json").read_text())
    renamed = set()
    for entries in meta["speakers"].values():
        for entry in entries[::3]:
            new = "new-" + entry["feature_path"]
            (root / entry["feature_path"]).rename(root / new)
            entry["feature_path"] = new
            renamed.add(new)
    (root / "metadata.json").write_text(json.dumps(meta))
    other = pack(root, tmp_path / "other-cache", progress=False)
    assert other.fingerprint != data.fingerprint and other.speakers == data.speakers
    return other, renamed


def test_vote_and_predict_score_another_set_of_the_same_speakers(
    exports: Exports,
    trained: list[Trained],
    data: PackedData,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """New recordings of the speakers a study learnt were refused as "not the data set it was trained
    on"; only the class ids must mean the same speakers. Its labelled utterances validate, but those the
    study's set also holds (by name) when vote can read that set; the test list is the other set's."""
    from search.cli import main

    other, renamed = _same_speakers_other_set(data, tmp_path)
    result = vote(exports.top.out, other, tmp_path / "other.csv")
    assert result.n_test == len(other.test) == len(data.test) - 4
    assert result.n_valid == len(renamed) < len(other.labelled) and result.valid_acc is not None
    assert (
        "is not the data set the export's study 'ev' was trained on, but has its 12 speakers" in result.note
    )
    assert f"{len(renamed)} of its labelled utterances (none in the study's own set)" in result.note
    with (tmp_path / "other.csv").open() as fh:
        assert [row["Id"] for row in csv.DictReader(fh)] == [other.ids[int(i)] for i in other.test]
    # A checkpoint does not say where its training set is: every labelled utterance, and a warning.
    one = predict(trained[0].checkpoint, other, tmp_path / "one.csv")
    assert one.n_valid == len(other.labelled) and "a fair figure only if none of them was in" in one.note
    # Through the command: the other set's JSON index differs from the export's, its speakers do not.
    argv = [
        "vote",
        str(exports.top.out),
        "--data",
        str(other.root),
        "--out",
        str(tmp_path / "cli.csv"),
        "--quiet",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "cli.csv").read_bytes() == (tmp_path / "other.csv").read_bytes()


def test_the_same_audio_prepared_with_another_seed_is_known_as_the_studys_own(tmp_path: Path) -> None:
    """Names are a hash of the seed and the source path, so the same audio prepared with --seed 1 shared
    no name with the study's seed-0 set: all of it validated, trained on or not. prepare's records (the
    source's path, size and time) tell; a new recording under an old file name does not match."""
    from search.prepare import prepare
    from search.vote import _also_in_set
    from tests.test_prepare import small_corpus

    audio = tmp_path / "audio"
    small_corpus(audio, speakers=2, per=4)
    prepare(audio, tmp_path / "study-set", test_per_speaker=0, progress=False)
    shutil.copy(audio / "spk0" / "0.wav", audio / "spk0" / "new.wav")  # a new recording
    prepare(audio, tmp_path / "again", test_per_speaker=0, seed=1, progress=False)
    again = pack(tmp_path / "again", tmp_path / "cache", progress=False)
    names = {again.ids[int(i)]: i for i in again.labelled}
    seen = _also_in_set(str(tmp_path / "study-set"), again)
    assert seen is not None and len(seen) == 8 and len(names) == 9  # all but the new one
    assert _also_in_set(str(again.root), again) is None  # its own folder: cannot tell what it held
    # The same audio copied (new file times) and prepared with the same seed: known by name.
    copied = tmp_path / "copied"
    shutil.copytree(audio, copied, copy_function=shutil.copyfile)
    prepare(copied, tmp_path / "same-seed", test_per_speaker=0, progress=False)
    same_seed = pack(tmp_path / "same-seed", tmp_path / "cache", progress=False)
    assert len(_also_in_set(str(tmp_path / "study-set"), same_seed) or ()) == 8
    assert _also_in_set(str(tmp_path / "gone"), again) is None


def test_soft_vote_against_best_member_recorded(exports: Exports, data: PackedData, tmp_path: Path) -> None:
    """Soft voting is not guaranteed to beat its best member; record it, assert only it is sane."""
    result = vote(exports.top.out, data, tmp_path / "s.csv")
    best = max(m.valid_acc or 0.0 for m in result.members)
    print(f"soft top-3 ensemble {result.valid_acc:.4f} vs best member {best:.4f}")
    assert result.valid_acc is not None and result.valid_acc >= min(
        m.valid_acc or 0.0 for m in result.members
    )
    assert np.isfinite([m.temperature for m in result.members]).all()


def _acc(value: float | None) -> float:
    assert value is not None, "expected a validation accuracy"
    return value


def _render(table: object) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_predict_and_vote_check_their_files_before_packing_the_data(
    exports: Exports, fake_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A typo in a path must not cost minutes of packing 56,666 utterances first."""
    from search.cli import main

    cache = tmp_path / "cache"  # SPKID_SEARCH_CACHE (see conftest): where packing would write
    assert main(["predict", "nosuch.pt", "--data", str(fake_dir), "--out", "p.csv", "--quiet"]) == 2
    assert "nosuch.pt: checkpoint not found" in capsys.readouterr().err
    Path("taken.csv").write_text("Id,Category\nkeep,me\n")  # an earlier submission
    assert main(["vote", str(exports.top.out), "--data", str(fake_dir), "--out", "taken.csv", "--quiet"]) == 2
    assert "taken.csv: already exists; pass --force" in capsys.readouterr().err
    member = exports.top.out / read_manifest(exports.top.out).members[0].file
    for given in (["vote", str(exports.top.out)], ["predict", str(member)]):  # a --device no one has
        assert (
            main([*given, "--data", str(fake_dir), "--out", "new.csv", "--device", "cuda:99", "--quiet"]) == 2
        )
        assert "--device cuda:99: " in capsys.readouterr().err
    # Another set's --data: refused by the JSON index the manifest records, before it is packed.
    assert main(["vote", str(exports.top.out), "--data", str(fake_dir), "--out", "new.csv", "--quiet"]) == 2
    assert f"--data {fake_dir}: not the data set the export's study" in capsys.readouterr().err
    assert not cache.exists() and Path("taken.csv").read_text() == "Id,Category\nkeep,me\n"


def test_a_folder_or_a_manifest_given_for_the_other_is_named_for_what_it_is(
    exports: Exports, tmp_path: Path
) -> None:
    with pytest.raises(UserError, match="manifest.json: pass the export folder that holds it"):
        read_manifest(exports.top.out / "manifest.json")
    (tmp_path / "runs").mkdir()
    with pytest.raises(UserError, match="runs: is a folder; pass a checkpoint file$"):
        read_checkpoint(tmp_path / "runs")
