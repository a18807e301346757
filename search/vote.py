"""Score the test set with an exported ensemble (or one checkpoint) and write the Kaggle CSV.

Everything an export folder claims is checked before any model runs: each member file must stay inside
the folder and match its manifest sha256 (so a tampered or half-copied checkpoint is never unpickled),
and the data set must be the one the study trained on, or another of the same speakers (new
recordings of them), whose labelled utterances then validate. Members are loaded one at a time with
``weights_only`` and run on whole utterances with :func:`search.infer.predict_logits`; their outputs
are calibrated and combined by :mod:`search.ensemble` (soft, hard or weighted).

:func:`predict` runs the same path for a single checkpoint, so one model and an ensemble can never
disagree about how the CSV is written.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search.checkpoint import read_checkpoint
from search.config import Config
from search.data import FeatureStore, PackedData, Split, make_split, rebuild_split, unseen_split
from search.ensemble import check_method, combine, fit_temperature, method_weights, softmax
from search.errors import UserError
from search.files import sha256_file
from search.infer import accuracy, check_compatible, checkpoint_logits
from search.layout import PREPARE_STATE, read_layout, read_prepare_state
from search.manifest import MANIFEST_NAME, Manifest, read_manifest, verify_members
from search.submission import ANSWERS_NAME, check_out, read_answers, write_submission


def accuracy_of(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Top-1 accuracy, None when there is nothing to score (no answers, no validation split)."""
    return accuracy(scores, labels) if len(labels) else None


# --------------------------------------------------------------------------------------------------
# Results, CSV, answers
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemberScore:
    """How one member did: its calibration temperature and accuracies (None: not measurable)."""

    name: str
    trial: int | None
    weight: float  # as applied in the vote (for ``weighted``: the manifest's times validation accuracy)
    temperature: float
    valid_acc: float | None
    test_acc: float | None


@dataclass
class VoteResult:
    """What vote/predict wrote and how well the members and the ensemble did."""

    out: Path
    method: str
    members: list[MemberScore]
    valid_acc: float | None
    test_acc: float | None
    n_valid: int
    n_test: int
    categories: list[str]
    note: str = ""


def _test_ids(data: PackedData) -> list[str]:
    """Test ids in testdata.json order, cross-checked against the file when it is there."""
    ids = [data.ids[int(i)] for i in data.test]
    listing = Path(data.root) / "testdata.json"
    if listing.is_file():
        try:
            utterances = json.loads(listing.read_text(encoding="utf-8"))["utterances"]
            expected = [u["feature_path"] for u in utterances]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{listing}: cannot read the test list ({exc}); restore the file") from None
        if expected != ids:
            raise UserError(
                f"{listing}: the test list changed since {data.root} was packed; run the command again"
            )
    return ids


def _answer_key(data: PackedData, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Positions of the test ids that ``answers.csv`` labels, and their class ids (-1: unknown name)."""
    path = Path(data.root) / ANSWERS_NAME
    if not path.is_file():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    answers = read_answers(path)
    class_of = {name: k for k, name in enumerate(data.speakers)}
    scored = [k for k, i in enumerate(ids) if i in answers]
    truth = [class_of.get(answers[ids[k]], -1) for k in scored]
    return np.array(scored, dtype=np.int64), np.array(truth, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# The one scoring path behind vote and predict
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Member:
    path: Path
    name: str
    trial: int | None
    weight: float


def _score(
    members: Sequence[_Member],
    data: PackedData,
    split: Split | None,
    out: Path,
    method: str,
    device: torch.device | str,
    force: bool,
    preloaded: dict[Path, dict[str, Any]] | None = None,
    note: str = "",
) -> VoteResult:
    """Run every member on validation + test, calibrate, combine, score and write the CSV."""
    check_method(method)
    out = check_out(out, force)  # the callers checked it against their inputs
    ids = _test_ids(data)
    if not ids:
        raise UserError(f"{data.root}/testdata.json: lists no test utterances; nothing to predict")
    valid = split.valid if split is not None else np.zeros(0, dtype=np.int64)
    valid_labels = data.labels[valid]
    scored, truth = _answer_key(data, ids)

    store = FeatureStore(data, device)
    valid_probs, test_probs, scores = [], [], []
    for member in members:
        ckpt = (preloaded or {}).get(member.path) or read_checkpoint(member.path)
        valid_logits, test_logits = checkpoint_logits(ckpt, member.path, data, store, [valid, data.test])
        temperature = fit_temperature(valid_logits, valid_labels)
        valid_probs.append(softmax(valid_logits, temperature).astype(np.float32))  # float32: half the memory
        test_probs.append(softmax(test_logits, temperature).astype(np.float32))
        test_acc = accuracy_of(test_logits[scored], truth)
        scores.append(
            MemberScore(
                member.name,
                member.trial,
                member.weight,
                temperature,
                accuracy_of(valid_logits, valid_labels),
                test_acc,
            )
        )

    weights = method_weights([m.weight for m in members], [s.valid_acc for s in scores], method)
    scores = [dataclasses.replace(s, weight=w) for s, w in zip(scores, weights, strict=True)]  # as applied
    valid_acc = accuracy_of(combine(valid_probs, weights, method), valid_labels) if len(valid) else None
    predicted = combine(test_probs, weights, method).argmax(axis=1)
    categories = [data.speakers[int(c)] for c in predicted]
    test_acc = float((predicted[scored] == truth).mean()) if len(scored) else None
    write_submission(out, ids, categories, data.speakers, force)
    return VoteResult(
        out=out,
        method=method,
        members=scores,
        valid_acc=valid_acc,
        test_acc=test_acc,
        n_valid=len(valid),
        n_test=len(ids),
        categories=categories,
        note=note,
    )


def vote(
    export_dir: Path,
    data: PackedData,
    out: Path,
    method: str = "soft",
    device: torch.device | str = "cpu",
    force: bool = False,
) -> VoteResult:
    """Combine an export's members on ``data``'s test set and write the Kaggle CSV to ``out``."""
    export_dir = Path(export_dir)
    check_method(method)
    manifest = read_manifest(export_dir)
    check_out(out, force, (export_dir, data.root))
    paths = verify_members(export_dir, manifest)
    note = ""
    if manifest.fingerprint == data.fingerprint:
        split = rebuild_split(
            data, manifest.split_ratio, manifest.split_seed, manifest.split_id, str(manifest.path)
        )
    else:  # new recordings of the same speakers, say (checked per member below)
        seen = _also_in_set(manifest.data_root, data)
        split = unseen_split(data, seen or ())
        note = _unseen_note(data, split, f"the export's study '{manifest.study}'", seen is not None)
    members = [
        _Member(path, m.file, m.trial, m.weight) for path, m in zip(paths, manifest.members, strict=True)
    ]
    for member in members:
        # Read every member once up front, so a corrupt one fails before minutes of inference; they are
        # read again one at a time while scoring, so memory holds a single checkpoint at a time.
        ckpt = read_checkpoint(member.path)
        if manifest.fingerprint != data.fingerprint and list(ckpt["speakers"]) != list(data.speakers):
            raise UserError(
                f"{manifest.path}: export was made for data set {manifest.fingerprint}, and --data "
                f"{data.root} ({data.fingerprint}) has other speakers (mapping.json); pass the data "
                f"folder the study '{manifest.study}' was trained on, or a set of the same speakers"
            )
        check_compatible(ckpt, member.path, data)
        if ckpt.get("split_id") not in (None, manifest.split_id):  # (the study's split, on any data)
            raise UserError(
                f"{member.path}: trained on validation split {ckpt.get('split_id')}, the manifest says "
                f"{manifest.split_id}; the export mixes studies, re-export it"
            )
        del ckpt
    return _score(members, data, split, out, method, device, force, note=note)


def export_speakers(export_dir: Path, manifest: Manifest) -> list[str]:
    """The speakers an export's models tell apart, in class id order (its first member's)."""
    paths = verify_members(Path(export_dir), manifest)  # inside the folder, as recorded: then unpickled
    if not paths:
        return []
    return [str(name) for name in read_checkpoint(paths[0]).get("speakers", [])]


def _also_in_set(root: str | None, data: PackedData) -> set[str] | None:
    """The ids of ``data``'s labelled utterances that the labelled part of the set at ``root`` holds too;
    None when that set cannot be read here, or is ``data``'s own folder (changed in place since).

    An utterance is the same by its name, or for sets prepare wrote by its source file (path, size and
    time, from prepare-state.jsonl): the same audio prepared with another --seed gets other names.
    """
    if root is None or Path(root).resolve() == Path(data.root).resolve():
        return None
    try:
        names = [u.feature_path for u in read_layout(Path(root)).train]
    except (UserError, OSError):
        return None
    theirs, ours = _sources(Path(root)), _sources(Path(data.root))
    seen_names, seen_sources = set(names), {theirs[name] for name in names if name in theirs}
    ids = (data.ids[int(i)] for i in data.labelled)
    return {name for name in ids if name in seen_names or ours.get(name) in seen_sources}


def _sources(root: Path) -> dict[str, str]:
    """Feature name -> its source file (path, size, time) in a set prepare wrote; {} for another set."""
    _, records = read_prepare_state(root / PREPARE_STATE)
    return {
        rec["feature"]: f"{key}\0{rec.get('size')}\0{rec.get('mtime_ns')}"
        for key, rec in records.items()
        if isinstance(rec.get("feature"), str)
    }


def _unseen_note(data: PackedData, split: Split, whose: str, checked: bool) -> str:
    """What a vote on another set of the same speakers validated on, and how far to trust it."""
    head = (
        f"--data {data.root} is not the data set {whose} was trained on, but has its {data.n_speakers} "
        "speakers: its test utterances are predicted"
    )
    if not len(split.valid):
        return f"{head}; none of its labelled utterances is left to validate and calibrate on"
    used = f"{len(split.valid):,} of its labelled utterances"
    if checked:
        return (
            f"{head}, and {used} (none in the study's own set) give the validation accuracy and calibration"
        )
    return (
        f"{head}, and {used} give the validation accuracy and calibration: a fair figure only if none of "
        "them was in the set it was trained on (that set is not here to compare with, or was changed in "
        "place)"
    )


def predict(
    checkpoint: Path, data: PackedData, out: Path, device: torch.device | str = "cpu", force: bool = False
) -> VoteResult:
    """Write the Kaggle CSV for a single checkpoint (an ensemble of one, through the same code path).

    Validation accuracy is reported when the checkpoint's own config (valid_ratio, split_seed)
    reproduces the split it recorded; otherwise the validation rows may overlap its training rows,
    so no validation accuracy is claimed.
    """
    checkpoint = Path(checkpoint)
    check_out(out, force, (checkpoint, data.root))
    ckpt = read_checkpoint(checkpoint)
    check_compatible(ckpt, checkpoint, data)
    if not isinstance(ckpt["config"], dict):
        raise UserError(f"{checkpoint}: its 'config' is not a mapping; not an spkid-search checkpoint")
    train_cfg = Config.from_dict(dict(ckpt["config"]), source=f"{checkpoint} (config)", stored=True).train
    note = ""
    split: Split | None
    if ckpt.get("fingerprint") not in (None, data.fingerprint):  # new recordings of its speakers, say
        split = unseen_split(data)  # a checkpoint does not record where its training set is
        note = _unseen_note(data, split, "the checkpoint", checked=False)
    else:
        split = make_split(data, train_cfg.valid_ratio, train_cfg.split_seed)
        if ckpt.get("split_id") not in (None, split.split_id):
            split = None
            note = "validation skipped: the checkpoint's config does not reproduce its validation split"
    member = _Member(checkpoint, checkpoint.name, _exported_trial(checkpoint), 1.0)
    return _score([member], data, split, out, "soft", device, force, {checkpoint: ckpt}, note)


def _exported_trial(checkpoint: Path) -> int | None:
    """The trial an export's member file came from, as its folder's manifest says (None elsewhere):
    a checkpoint does not record its trial, and predict on ``export/top5/trial-3.pt`` showed "-"."""
    if not (checkpoint.parent / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = read_manifest(checkpoint.parent)
    except UserError:
        return None  # a damaged manifest does not stop a prediction that does not need it
    member = next((m for m in manifest.members if m.file == checkpoint.name), None)
    if member is None or sha256_file(checkpoint) != member.sha256:
        return None  # not that member (a file put in its place is no trial's)
    return member.trial


def render_vote(result: VoteResult) -> Any:
    """A rich Table of members and the ensemble (the CLI prints it)."""
    from rich.table import Table

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    what = f"{result.method} vote" if len(result.members) > 1 else "prediction"
    table = Table(title=f"{what} -> {result.out} ({result.n_test} test utterances)")
    for column in ("member", "trial", "weight", "temperature", "valid acc", "test acc"):
        table.add_column(column, justify="left" if column == "member" else "right")
    for m in result.members:
        trial = "-" if m.trial is None else str(m.trial)
        table.add_row(
            m.name, trial, f"{m.weight:g}", f"{m.temperature:.3f}", pct(m.valid_acc), pct(m.test_acc)
        )
    if len(result.members) > 1:  # one model's row already is the result
        table.add_section()
        table.add_row(
            "[bold]ensemble", "", "", "", f"[bold]{pct(result.valid_acc)}", f"[bold]{pct(result.test_acc)}"
        )
    if result.note:
        table.caption = result.note
    return table
