"""Counting a study's trials: the budget each original holds, and which retries may run."""

from __future__ import annotations

import optuna
from optuna.trial import TrialState

from search.trials import (
    current_best,
    held_before,
    on_other_data,
    retry_is_redundant,
    summary_rows,
    trial_accuracy,
)


def test_budget_counts_each_original_once_and_retries_hold_its_place() -> None:
    def make(number: int, state: TrialState, root: int | None = None) -> optuna.trial.FrozenTrial:
        t = optuna.trial.create_trial(state=state, value=1.0 if state == TrialState.COMPLETE else None)
        t.number = number
        if root is not None:
            t._system_attrs = {"failed_trial": root, "retry_history": [root]}
        return t

    # 0 finished, 1 failed as stale and retried as 3 (queued while new trial 2 was being created).
    trials = [
        make(0, TrialState.COMPLETE),
        make(1, TrialState.FAIL),
        make(2, TrialState.RUNNING),
        make(3, TrialState.WAITING, root=1),
    ]
    assert held_before(trials, 2) == 2  # 0 and 1's retry: trial 2 is the third
    assert held_before([*trials, make(4, TrialState.RUNNING)], 4) == 3  # 4 must skip
    assert not retry_is_redundant(trials, 3, 1)
    # Two retries of 1 (a double stale check) or a retry of a trial that finished: only one may run.
    assert retry_is_redundant([*trials, make(5, TrialState.RUNNING, root=1)], 5, 1)
    assert retry_is_redundant([make(1, TrialState.COMPLETE), *trials[2:]], 3, 1)


def test_a_trial_is_on_other_data_when_it_recorded_another_data_set_or_split() -> None:
    """A trial of another split (run --allow-changed with another split_seed) trained on some of the
    current validation utterances: export-top ranked it beside the others and vote then refused it."""

    def trial(**attrs: object) -> optuna.trial.FrozenTrial:
        return optuna.trial.create_trial(state=TrialState.COMPLETE, value=1.0, user_attrs=attrs)

    study = {"fingerprint": "new", "split_id": "s2", "valid_ratio": 0.1, "split_seed": 7}
    assert on_other_data(trial(fingerprint="old"), study)
    assert on_other_data(trial(fingerprint="new", split_id="s1"), study)
    assert not on_other_data(trial(fingerprint="new", split_id="s2"), study)
    assert not on_other_data(trial(), study)  # from before trials recorded their data set
    # From before trials recorded their split: their config's ratio and seed tell.
    assert on_other_data(trial(fingerprint="new", config={"valid_ratio": 0.1, "split_seed": 0}), study)
    assert not on_other_data(trial(fingerprint="new", config={"valid_ratio": 0.1, "split_seed": 7}), study)
    assert not on_other_data(trial(fingerprint="new", split_id="s1"), {"fingerprint": "new"})


def test_the_run_displays_the_best_trial_of_the_current_data_set_and_split() -> None:
    """The live footer took study.best_trial: a trial of an earlier split, its figure in-sample, led."""
    study = {"fingerprint": "f", "split_id": "new"}
    trials = []
    for number, (state, acc, split) in enumerate(
        [
            (TrialState.COMPLETE, 0.99, "old"),
            (TrialState.PRUNED, 0.95, "new"),
            (TrialState.COMPLETE, 0.7, "new"),
        ]
    ):
        t = optuna.trial.create_trial(
            state=state,
            value=acc,
            intermediate_values={1: acc},
            user_attrs={"valid_acc": acc, "split_id": split},
        )
        t.number = number
        trials.append(t)
    best = current_best(trials, study)
    assert best is not None and best.number == 2
    assert current_best(trials[:2], study) is None


def test_status_and_export_rank_trials_alike_and_a_non_finite_accuracy_last() -> None:
    """status sorted a NaN valid_acc anywhere (export left it out): one definition serves both now."""
    trials = []
    for number, acc in enumerate([0.5, float("nan"), 0.9, 0.5]):
        t = optuna.trial.create_trial(value=0.0, user_attrs={"valid_acc": acc})
        t.number = number
        trials.append(t)
    assert [trial_accuracy(t) for t in trials] == [0.5, None, 0.9, 0.5]
    rows = summary_rows(trials, {}, top=10)
    assert [r["number"] for r in rows] == [2, 0, 3, 1] and rows[-1]["valid_acc"] is None
