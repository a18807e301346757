"""Export a study's best models as a self-checking ensemble folder that ``vote`` can score.

An export is a folder of ``trial-<n>.pt`` checkpoints plus ``manifest.json`` (study, strategy, members
with their params, validation accuracy, weight and sha256, the data fingerprint, folder and packed
cache, and the validation split). It is built in a temporary folder beside its destination and
renamed into place, so an interrupted or failed export never leaves half a folder, and an existing
export is only replaced with ``force``.

Strategies:

- ``top``: the K finished trials with the best recorded validation accuracy, one vote each.
- ``greedy``: Caruana et al.'s ensemble selection (ICML 2004): forward selection *with replacement*
  maximising the soft-vote accuracy on the study's validation split, weights = selection counts.
  Here K caps the number of *distinct* members (so the export costs at most what top-K costs at
  inference), and selection runs ``rounds`` additions (default 2 * K) after a sorted initialisation:
  the start is the best of the top-n prefixes (n = 1..K, the ``top`` ranking) and the single most
  accurate model on the rebuilt split. The best ensemble seen at any round is kept (accuracy first,
  then validation NLL), so greedy is never below top-K nor below any single trial on validation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.artifacts import download_artifact
from optuna.trial import FrozenTrial, TrialState

from search.checkpoint import read_checkpoint
from search.data import (
    FeatureStore,
    PackedData,
    Split,
    check_index,
    default_cache_root,
    open_data,
    rebuild_split,
)
from search.ensemble import fit_temperature, softmax
from search.errors import UserError
from search.files import atomic_write, check_can_create, install_folder, sha256_file, usual_mode
from search.infer import accuracy, checkpoint_logits
from search.manifest import MANIFEST_FORMAT, MANIFEST_NAME, MANIFEST_VERSION
from search.storage import artifact_dir, artifact_store, study_home
from search.trials import on_other_data, ranked, trial_accuracy

STRATEGIES = ("top", "greedy")
CACHE_FOLDER = "valid_logits"


@dataclass(frozen=True)
class ExportMember:
    """One exported checkpoint; ``weight`` is its number of votes (selection count for greedy)."""

    trial: int
    file: str
    weight: int
    valid_acc: float
    state: str
    params: dict[str, Any]
    sha256: str


@dataclass
class ExportResult:
    """What was exported, and the ensemble's validation accuracy when data was available."""

    study: str
    strategy: str
    k: int
    out: Path
    members: list[ExportMember]
    ensemble_valid_acc: float | None
    replaced: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    candidates: int = 0  # usable trials there were to choose from


# --------------------------------------------------------------------------------------------------
# Trials and their checkpoints
# --------------------------------------------------------------------------------------------------


def usable_trials(study: optuna.Study, include_pruned: bool = False) -> list[FrozenTrial]:
    """Finished trials with a checkpoint and an accuracy, best first (ties: lower trial number).

    Trials trained on another data set or split than the study's current ones (changed under
    ``run --allow-changed``) are left out: their models cannot be validated or voted on this one.
    """
    states = (TrialState.COMPLETE, TrialState.PRUNED) if include_pruned else (TrialState.COMPLETE,)
    trials = ranked(study.get_trials(deepcopy=False, states=states), study.user_attrs, states)
    return [t for t in trials if t.user_attrs.get("checkpoint_artifact")]


def fetch_checkpoint(study: optuna.Study, trial: FrozenTrial, dest: Path) -> str:
    """Copy a trial's checkpoint out of the artifact store to ``dest`` and verify its recorded sha256."""
    artifact_id = str(trial.user_attrs["checkpoint_artifact"])
    where = f"study '{study.study_name}' trial {trial.number}"
    stored = artifact_dir(study) / artifact_id
    try:
        download_artifact(artifact_store=artifact_store(study), file_path=str(dest), artifact_id=artifact_id)
    except Exception as exc:  # noqa: BLE001 - ArtifactNotFound, OSError, ValueError for odd ids
        why = "missing" if not stored.exists() else f"unreadable ({exc.__class__.__name__})"
        raise UserError(
            f"{stored}: checkpoint of {where} is {why}; restore the artifact store, or leave the trial "
            f"out with --exclude {trial.number}"
        ) from None
    expected = trial.user_attrs.get("checkpoint_sha256")
    if not isinstance(expected, str):
        raise UserError(
            f"{stored}: {where} recorded no checkpoint_sha256, so its checkpoint cannot be verified"
        )
    actual = sha256_file(dest)
    if actual != expected.lower():
        raise UserError(
            f"{stored}: checksum mismatch for {where} (sha256 {actual[:12]}.., trial recorded "
            f"{expected[:12]}..): the stored checkpoint was modified or damaged; restore it from a backup, "
            f"or leave the trial out with --exclude {trial.number}"
        )
    return actual


# --------------------------------------------------------------------------------------------------
# Validation logits, cached per trial
# --------------------------------------------------------------------------------------------------


class ValidLogits:
    """Each trial's validation logits, computed once and cached under ``studies/<study>/valid_logits``.

    The cache is keyed by the trial's recorded checkpoint sha256 and the split id, so a re-trained
    trial or another split never reuses stale logits; a cached trial needs no checkpoint download.
    """

    def __init__(self, study: optuna.Study, data: PackedData, split: Split, scratch: Path) -> None:
        self.study = study
        self.data = data
        self.split = split
        self.scratch = scratch
        self.folder = study_home(study) / CACHE_FOLDER
        self.labels = data.labels[split.valid]
        self._store: FeatureStore | None = None

    def _cached(self, trial: FrozenTrial) -> np.ndarray | None:
        path = self.folder / f"trial-{trial.number}.npz"
        try:
            with np.load(path) as saved:
                if (
                    str(saved["sha256"]) == trial.user_attrs.get("checkpoint_sha256")
                    and str(saved["split_id"]) == self.split.split_id
                ):
                    return np.asarray(saved["logits"], dtype=np.float32)
        except (OSError, KeyError, ValueError):
            pass
        return None

    def _save(self, trial: FrozenTrial, logits: np.ndarray, digest: str) -> None:
        with contextlib.suppress(OSError):  # a read-only study folder only costs a recomputation
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_write(self.folder / f"trial-{trial.number}.npz") as fh:
                np.savez(fh, logits=logits, sha256=np.array(digest), split_id=np.array(self.split.split_id))

    def get(self, trial: FrozenTrial) -> np.ndarray:
        """(n_valid, classes) float32 logits of ``trial`` on the validation split."""
        cached = self._cached(trial)
        if cached is not None and cached.shape[0] == len(self.split.valid):
            return cached
        path = self.scratch / f"trial-{trial.number}.pt"
        try:
            digest = fetch_checkpoint(self.study, trial, path)
            ckpt = read_checkpoint(path)
        finally:  # the chosen few are fetched (and verified) again into the export: keep disk use flat
            path.unlink(missing_ok=True)
        if self._store is None:
            self._store = FeatureStore(self.data, "cpu")
        (logits,) = checkpoint_logits(ckpt, path, self.data, self._store, [self.split.valid])
        self._save(trial, logits, digest)
        return logits


# --------------------------------------------------------------------------------------------------
# Ensemble selection
# --------------------------------------------------------------------------------------------------


def _key(prob_sum: np.ndarray, total: float, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, -NLL) of an ensemble given its weighted probability sum; larger is better."""
    if len(labels) == 0:
        return (0.0, 0.0)
    acc = accuracy(prob_sum, labels)
    p_true = prob_sum[np.arange(len(labels)), labels] / total
    return (acc, float(np.log(np.maximum(p_true, 1e-12)).mean()))


def _sum(probs: Sequence[np.ndarray], members: Iterable[int]) -> np.ndarray:
    """Float64 sum of some members' probabilities, in the given order (so every caller agrees)."""
    total = np.zeros(probs[0].shape, dtype=np.float64)
    for i in members:
        total += probs[i]
    return total


def greedy_select(
    probs: Sequence[np.ndarray], labels: np.ndarray, k: int, rounds: int
) -> tuple[dict[int, int], float, list[dict[str, Any]]]:
    """Caruana forward selection with replacement over ``probs`` (ranked best-first by the caller).

    Returns (selection counts by candidate index, ensemble accuracy, history of each round).
    """
    ranked = list(range(len(probs)))
    best_single = max(ranked, key=lambda i: (_key(probs[i], 1.0, labels), -i))
    starts: list[list[int]] = [ranked[:n] for n in range(1, min(k, len(ranked)) + 1)]
    starts.append([best_single])
    history: list[dict[str, Any]] = []
    best_start, best_key = starts[0], (-1.0, -math.inf)
    for start in starts:
        key = _key(_sum(probs, start), float(len(start)), labels)
        if key > best_key:
            best_start, best_key = start, key
    counts = dict.fromkeys(best_start, 1)
    prob_sum = _sum(probs, best_start)
    total = float(len(best_start))
    history.append({"round": 0, "added": list(best_start), "valid_acc": best_key[0], "nll": -best_key[1]})
    best_counts = dict(counts)
    for r in range(1, rounds + 1):
        pool = ranked if len(counts) < k else list(counts)
        step_best, step_key = pool[0], (-1.0, -math.inf)
        for i in pool:
            key = _key(prob_sum + probs[i], total + 1.0, labels)
            if key > step_key:
                step_best, step_key = i, key
        counts[step_best] = counts.get(step_best, 0) + 1
        prob_sum = prob_sum + probs[step_best]
        total += 1.0
        history.append({"round": r, "added": [step_best], "valid_acc": step_key[0], "nll": -step_key[1]})
        if step_key > best_key:  # strictly better only: ties keep the smaller ensemble
            best_key, best_counts = step_key, dict(counts)
    return best_counts, best_key[0], history


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------


def default_export_dir(study: optuna.Study, strategy: str, k: int, include_pruned: bool = False) -> Path:
    """``<study folder>/export/<strategy><K>`` (``-with-pruned`` when pruned trials may be members, so
    the two selections do not replace each other), beside the study whatever the working folder."""
    return study_home(study) / "export" / f"{strategy}{k}{'-with-pruned' if include_pruned else ''}"


def _study_split(study: optuna.Study, data: PackedData) -> Split:
    attrs = study.user_attrs
    missing = [a for a in ("fingerprint", "split_id", "valid_ratio", "split_seed") if a not in attrs]
    if missing:
        raise UserError(f"study '{study.study_name}': missing study attribute(s) {', '.join(missing)}")
    if attrs["fingerprint"] != data.fingerprint:
        recorded = attrs.get("data_root")
        if recorded and Path(recorded).resolve() == data.root.resolve():  # "pass that folder": this one
            raise UserError(
                f"{data.root}: its features changed since study '{study.study_name}' was trained on them "
                f"(data set {data.fingerprint}, was {attrs['fingerprint']}); restore them, or pass --data "
                "with an unchanged copy of the set"
            )
        raise UserError(
            f"--data {data.root}: data set {data.fingerprint} is not the one study '{study.study_name}' "
            f"was trained on ({attrs['fingerprint']}, from {recorded or '?'}); pass that folder"
        )
    ratio, seed = float(attrs["valid_ratio"]), int(attrs["split_seed"])
    return rebuild_split(data, ratio, seed, str(attrs["split_id"]), f"study '{study.study_name}'")


def study_data_root(study: optuna.Study) -> Path | None:
    """The data folder the study recorded, where it is still there (None: not recorded, or gone)."""
    root = study.user_attrs.get("data_root")
    return Path(root) if root and (Path(root) / "testdata.json").is_file() else None


def _open_study_data(study: optuna.Study, required: bool) -> PackedData | None:
    """The study's recorded data folder, packed; None (or, when ``required``, an error) if it is gone."""
    root = study_data_root(study)
    if root is None:
        if not required:
            return None
        recorded = study.user_attrs.get("data_root") or "not recorded"
        raise UserError(
            f"study '{study.study_name}': greedy selection needs the validation data, and the study's "
            f"data folder ({recorded}) is not available; pass --data DIR"
        )
    return open_data(root, study_cache_root(study), progress=False)


def check_data_folder(study: optuna.Study, root: Path) -> None:
    """Refuse ``--data root`` whose JSON index is not the one the study recorded (studies run before it
    was recorded are checked after packing, by the set's fingerprint)."""
    attrs = study.user_attrs
    check_index(
        root,
        attrs.get("index_digest"),
        f"study '{study.study_name}'",
        attrs.get("data_root"),
        "pass that folder",
    )


def study_cache_root(study: optuna.Study) -> Path:
    """The packed-data cache its run used: ``cache`` beside the study's folder (or $SPKID_SEARCH_CACHE)."""
    return default_cache_root(study_home(study).parent)


def check_export_target(out: Path, force: bool) -> None:
    """Refuse an ``--out`` that export could damage, before any work is done.

    Only an earlier export (a folder with ``manifest.json``) may be replaced, and only with ``--force``:
    ``--force`` must never wipe a folder of other files, the current folder or one above it.
    """
    here = Path.cwd().resolve()
    target = out.resolve()
    if target == here or target in here.parents:
        raise UserError(
            f"--out {out}: is the current folder or one above it; name a new folder for the export"
        )
    check_can_create(out)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise UserError(f"--out {out}: exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return  # an empty folder is as good as a new one
    if not (out / MANIFEST_NAME).is_file():
        raise UserError(
            f"--out {out}: holds other files and is not an export (no {MANIFEST_NAME}); choose another --out"
        )
    if not force:
        raise UserError(
            f"{out}: an export already exists there; pass --force to replace it or --out elsewhere"
        )
    others = sorted(p.name for p in out.iterdir() if not _export_file(p.name))
    if others:  # a submission voted into the folder, say: --force replaces the export, not the user's files
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(
            f"--out {out}: holds files that are not the export's ({shown}); move them out of the folder "
            "or choose another --out"
        )


def _export_file(name: str) -> bool:
    """Whether a file name is one export writes: the manifest, or a member's ``trial-N.pt``."""
    number = name.removeprefix("trial-").removesuffix(".pt")
    return name == MANIFEST_NAME or (name == f"trial-{number}.pt" and number.isdigit())


def _install(tmp: Path, out: Path, force: bool) -> bool:
    """Move the finished temp folder to ``out``; with force, swap out the old one. True if replaced."""
    replacing = out.exists() and (not out.is_dir() or any(out.iterdir()))
    if replacing:
        check_export_target(out, force)  # again: the folder may have changed while the members were copied
    install_folder(tmp, out)
    return replacing


def export_top(
    study: optuna.Study,
    k: int,
    out: Path | None = None,
    strategy: str = "top",
    include_pruned: bool = False,
    force: bool = False,
    data: PackedData | None = None,
    exclude: Collection[int] = (),
) -> ExportResult:
    """Export K members of ``study`` (see the module docstring for the two strategies); trials numbered
    in ``exclude`` are left out."""
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy: unknown strategy '{strategy}' (choose from {', '.join(STRATEGIES)})")
    if k < 1:
        raise UserError(f"export-top: K must be at least 1, got {k}")
    out = Path(out) if out is not None else default_export_dir(study, strategy, k, include_pruned)
    check_export_target(out, force)
    unknown = sorted(set(exclude) - {t.number for t in study.get_trials(deepcopy=False)})
    if unknown:  # a typo would otherwise go unnoticed
        raise UserError(
            f"--exclude: study '{study.study_name}' has no trial {', '.join(map(str, unknown))}; "
            "see 'spkid-search status' for its trials"
        )
    trials = [t for t in usable_trials(study, include_pruned) if t.number not in exclude]
    # greedy's K caps the distinct members: fewer trials than K still make an ensemble (of them all at most)
    if len(trials) < (1 if strategy == "greedy" else k):
        which = "COMPLETE or PRUNED" if include_pruned else "COMPLETE"
        if any(on_other_data(t, study.user_attrs) for t in study.get_trials(deepcopy=False)):
            which += ", trained on the study's current data set and split,"
        ways = ([] if strategy == "greedy" else ["lower K"]) + (
            [] if include_pruned else ["pass --include-pruned"]
        )
        advice = ", ".join(ways) + (" or " if ways else "") + "run more trials"
        left_out = f", not counting --exclude {','.join(map(str, sorted(exclude)))}" if exclude else ""
        short = "none to select from" if strategy == "greedy" else f"fewer than K={k}"
        raise UserError(
            f"study '{study.study_name}': only {len(trials)} usable trial(s) ({which} with a checkpoint"
            f"{left_out}), {short}; {advice}"
        )
    if data is None:  # the folder the study trained on; top-k without it just skips the ensemble's score
        data = _open_study_data(study, required=strategy == "greedy")
    split = _study_split(study, data) if data is not None else None

    created = []  # folders this call creates, deepest first, removed again if it fails
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        created.append(folder)
        folder = folder.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = scratch = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        usual_mode(tmp, folder=True)  # it becomes the export folder
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.scratch-", dir=out.parent))
        chosen, weights, ensemble_acc, history = _choose(
            study, trials, k, strategy, data, split, scratch, 2 * k
        )
        members = []
        for trial in chosen:
            name = f"trial-{trial.number}.pt"
            digest = fetch_checkpoint(study, trial, tmp / name)
            members.append(
                ExportMember(
                    trial=trial.number,
                    file=name,
                    weight=weights[trial.number],
                    valid_acc=trial_accuracy(trial) or 0.0,
                    state=trial.state.name,
                    params=dict(trial.params),
                    sha256=digest,
                )
            )
        _write_manifest(
            tmp / MANIFEST_NAME, study, strategy, k, members, trials, split, ensemble_acc, history
        )
        replaced = _install(tmp, out, force)
    except BaseException:
        for made in (tmp, scratch):
            if made is not None:
                shutil.rmtree(made, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):  # rmdir refuses a folder someone else filled meanwhile
                folder.rmdir()
        raise
    shutil.rmtree(scratch, ignore_errors=True)
    return ExportResult(
        study=study.study_name,
        strategy=strategy,
        k=k,
        out=out,
        members=members,
        ensemble_valid_acc=ensemble_acc,
        replaced=replaced,
        history=history,
        candidates=len(trials),
    )


def _choose(
    study: optuna.Study,
    trials: list[FrozenTrial],
    k: int,
    strategy: str,
    data: PackedData | None,
    split: Split | None,
    scratch: Path,
    rounds: int,
) -> tuple[list[FrozenTrial], dict[int, int], float | None, list[dict[str, Any]]]:
    """Pick the members and weights; score the ensemble's soft vote on validation when data is given."""
    if data is None or split is None:
        top = trials[:k]
        return top, {t.number: 1 for t in top}, None, []
    logits = ValidLogits(study, data, split, scratch)
    pool = trials if strategy == "greedy" else trials[:k]
    probs = []
    for trial in pool:
        trial_logits = logits.get(trial)
        temperature = fit_temperature(trial_logits, logits.labels)
        probs.append(softmax(trial_logits, temperature).astype(np.float32))  # float32: half the memory
    if strategy == "top":
        acc = _key(_sum(probs, range(len(probs))), float(k), logits.labels)[0] if len(split.valid) else None
        return pool, {t.number: 1 for t in pool}, acc, []
    counts, acc, history = greedy_select(probs, logits.labels, k, rounds)
    for step in history:
        step["added"] = [pool[i].number for i in step["added"]]
    chosen = [pool[i] for i in sorted(counts, key=lambda i: (-counts[i], i))]
    return chosen, {pool[i].number: n for i, n in counts.items()}, acc, history


def _write_manifest(
    path: Path,
    study: optuna.Study,
    strategy: str,
    k: int,
    members: list[ExportMember],
    pool: list[FrozenTrial],
    split: Split | None,
    ensemble_acc: float | None,
    history: list[dict[str, Any]],
) -> None:
    attrs = study.user_attrs
    by_number = {t.number: t for t in pool}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "study": study.study_name,
        "strategy": strategy,
        "k": k,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "data": {
            "fingerprint": attrs.get("fingerprint"),
            "index": attrs.get("index_digest"),
            "root": attrs.get("data_root"),
            "cache": str(study_cache_root(study).resolve()),  # vote from any folder reuses the packing
        },
        "split": {
            "ratio": split.ratio if split else attrs.get("valid_ratio"),
            "seed": split.seed if split else attrs.get("split_seed"),
            "split_id": split.split_id if split else attrs.get("split_id"),
        },
        "ensemble_valid_acc": ensemble_acc,
        "candidates": len(pool) if strategy == "greedy" else k,
        "members": [
            {
                "trial": m.trial,
                "file": m.file,
                "sha256": m.sha256,
                "weight": m.weight,
                "valid_acc": m.valid_acc,
                "state": m.state,
                "params": m.params,
                "parameters": by_number[m.trial].user_attrs.get("parameters"),
                "best_step": by_number[m.trial].user_attrs.get("best_step"),
            }
            for m in members
        ],
        "selection": history,
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=2, default=str)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def render_export(result: ExportResult) -> Any:
    """A rich Table of the exported members (the CLI prints it)."""
    from rich.table import Table

    title = f"study '{result.study}': {result.strategy} export of {len(result.members)} -> {result.out}"
    if result.strategy == "greedy" and 0 < result.candidates < result.k:  # K caps the members: say why fewer
        title += f" (K={result.k}, but only {result.candidates} usable trials to choose from)"
    elif result.strategy == "greedy" and len(result.members) < result.k:
        title += f" (K={result.k} at most: adding another trial did not raise the ensemble's score)"
    table = Table(title=title)
    for column in ("trial", "state", "weight", "valid acc", "params"):
        table.add_column(column, justify="left" if column == "params" else "right", overflow="fold")
    for m in result.members:
        params = ", ".join(f"{key}={_short(value)}" for key, value in sorted(m.params.items()))
        table.add_row(str(m.trial), m.state, str(m.weight), f"{m.valid_acc:.4f}", params or "-")
    table.add_section()
    total = sum(m.weight for m in result.members)
    if result.ensemble_valid_acc is not None:
        how = "soft vote"
        if result.strategy == "greedy":  # chosen to maximise this very number: not a held-out estimate
            how += "; members chosen on these validation utterances, so optimistic"
        table.add_row("[bold]ensemble", "", str(total), f"[bold]{result.ensemble_valid_acc:.4f}", how)
    else:
        table.add_row("[bold]ensemble", "", str(total), "-", "data folder not found: pass --data to score it")
    return table


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
