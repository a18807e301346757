"""A study's trials counted: the budget they hold, and which retries may run.

Pure functions over Optuna's frozen trials, shared by the driver, the workers and the displays. A
trial queued again after a kill, a stop or a storage outage (a "retry") keeps its original's place in
the budget: ``system_attrs["failed_trial"]`` names the original, ``retry_history`` the trials before it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from optuna.trial import FrozenTrial, TrialState

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    skipped: int = 0
    retried: int = 0  # FAIL trials queued again (killed, interrupted, cut off by an outage): not failures

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def ended(self) -> int:
        """Trials that will not run again: finished, or failed for good (not queued again)."""
        return self.finished + self.failed

    @property
    def holding(self) -> int:
        """Trials that will end finished unless they fail: the budget they already claim."""
        return self.finished + self.running + self.waiting


def is_skipped(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get("skipped"))


def on_other_data(trial: FrozenTrial, study_attrs: Mapping[str, Any]) -> bool:
    """Whether ``trial`` trained on another data set or train/valid split than the study's current ones
    (``run --allow-changed`` may have replaced either); what a trial did not record counts as the study's.

    Why the split too: a trial of another split trained on some of the current validation utterances,
    so its accuracy and its validation logits (temperature, greedy selection) would be in-sample.
    Trials from before they recorded their ``split_id`` are judged by their config's ratio and seed.
    """
    fingerprint = study_attrs.get("fingerprint")
    if trial.user_attrs.get("fingerprint", fingerprint) != fingerprint:
        return True
    recorded = trial.user_attrs.get("split_id")
    if recorded is not None:
        return bool(recorded != study_attrs.get("split_id", recorded))
    config = trial.user_attrs.get("config") or {}
    return any(
        key in config and key in study_attrs and config[key] != study_attrs[key]
        for key in ("valid_ratio", "split_seed")
    )


def count_trials(trials: list[FrozenTrial]) -> Counts:
    """Trials by state; a FAIL trial that was queued again counts as retried, not as failed.

    Only real failures (a bad configuration, divergence, out of memory, a checkpoint that could not be
    stored) count toward ``--max-failures``: a study stopped twice with Ctrl-C must still resume.
    """
    requeued = _requeued(trials)
    c = Counts()
    for t in trials:
        if t.state == TrialState.COMPLETE:
            c.complete += 1
        elif t.state == TrialState.PRUNED:
            c.pruned += 1
        elif t.state == TrialState.RUNNING:
            c.running += 1
        elif t.state == TrialState.WAITING:
            c.waiting += 1
        elif t.state == TrialState.FAIL:
            if is_skipped(t):
                c.skipped += 1
            elif t.number in requeued:
                c.retried += 1
            else:
                c.failed += 1
    return c


def _requeued(trials: list[FrozenTrial]) -> set[int]:
    return {n for t in trials for n in (t.system_attrs.get("retry_history") or [])}


def real_failures(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The FAIL trials that count as failures (as in :func:`count_trials`): not retried, not skipped."""
    requeued = _requeued(trials)
    return [
        t for t in trials if t.state == TrialState.FAIL and not is_skipped(t) and t.number not in requeued
    ]


class TrialLike(Protocol):
    """What the budget's count reads of a trial: a FrozenTrial, or a row of :func:`states.trial_rows`."""

    @property
    def number(self) -> int: ...
    @property
    def state(self) -> TrialState: ...
    @property
    def system_attrs(self) -> dict[str, Any]: ...


def root_of(t: TrialLike) -> int:
    """The original trial a trial is an attempt at (itself, unless it is a retry)."""
    return int(t.system_attrs.get("failed_trial", t.number))


def ended_roots(trials: list[FrozenTrial]) -> set[int]:
    """The original trials none of whose attempts is queued or running: nothing resumes from their
    folder (``trials/<n>/``) again."""
    alive = {root_of(t) for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)}
    return {root_of(t) for t in trials} - alive


def held_before(trials: Sequence[TrialLike], number: int) -> int:
    """Budget claimed by the trials begun before new trial ``number``, counted per original trial.

    A retry holds its original's place, whatever its own number: a retry queued (with a higher number)
    while trial ``number`` was being created still counts, and an original with a retry counts once.
    """
    holds: dict[int, bool] = {}
    for t in trials:
        root = root_of(t)
        if t.number == number or root >= number:
            continue
        live = t.state in FINISHED or t.state in (TrialState.RUNNING, TrialState.WAITING)
        holds[root] = holds.get(root, False) or live
    return sum(holds.values())


def retry_is_redundant(trials: list[FrozenTrial], number: int, root: int) -> bool:
    """True when retry ``number`` of trial ``root`` must not run: the original (or another retry of it)
    finished, or an earlier retry of it is queued or running. Only one trial per original may finish."""
    for t in trials:
        if t.number == number or root_of(t) != root:
            continue
        if t.state in FINISHED:
            return True
        if t.number < number and t.state in (TrialState.RUNNING, TrialState.WAITING):
            return True
    return False


def trial_accuracy(t: FrozenTrial) -> float | None:
    """A finished trial's whole-utterance validation accuracy (None: none recorded, or not finite)."""
    acc = t.user_attrs.get("valid_acc", t.value)
    return float(acc) if isinstance(acc, (int, float)) and math.isfinite(acc) else None


def best_first(t: FrozenTrial) -> tuple[float, int]:
    """Sort key: the most accurate first, ties to the lower trial number (status and export agree)."""
    return (-(trial_accuracy(t) or 0.0), t.number)


def ranked(
    trials: list[FrozenTrial],
    study_attrs: Mapping[str, Any],
    states: Sequence[TrialState] = (TrialState.COMPLETE,),
) -> list[FrozenTrial]:
    """The trials in ``states`` with an accuracy, on the study's current data set and split, best first.

    Why not ``study.best_trial``: it ranks trials of an earlier data set or split (run --allow-changed)
    too, whose figures are in-sample on the current validation set.
    """
    return sorted(
        (
            t
            for t in trials
            if t.state in states and trial_accuracy(t) is not None and not on_other_data(t, study_attrs)
        ),
        key=best_first,
    )


def current_best(trials: list[FrozenTrial], study_attrs: Mapping[str, Any]) -> FrozenTrial | None:
    """The most accurate COMPLETE trial on the study's current data set and split (None: none yet)."""
    best = ranked(trials, study_attrs)
    return best[0] if best else None


def summary_rows(trials: list[FrozenTrial], study_attrs: Mapping[str, Any], top: int) -> list[dict[str, Any]]:
    """The best ``top`` finished trials, best first, as plain dicts (for status tables); ``study_attrs``:
    the study's user attrs, to mark trials trained on an earlier data set or split."""
    done = sorted((t for t in trials if t.state in FINISHED), key=best_first)
    return [
        {
            "number": t.number,
            "state": t.state.name,
            "valid_acc": trial_accuracy(t),
            "best_step": t.user_attrs.get("best_step"),
            "parameters": t.user_attrs.get("parameters"),
            "steps_per_s": t.user_attrs.get("steps_per_s"),
            "device": t.user_attrs.get("device"),
            "params": dict(t.params),
            # Trained on an earlier data set or split (run --allow-changed since): not comparable, not
            # exported.
            "other_data": on_other_data(t, study_attrs),
        }
        for t in done[:top]
    ]
