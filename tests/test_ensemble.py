"""Tests for search/ensemble.py: temperature calibration and the soft, hard and weighted votes."""

from __future__ import annotations

import numpy as np
import pytest

from search.ensemble import combine, fit_temperature, method_weights, softmax


def test_fit_temperature_recovers_the_true_scale() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, size=(4000, 10)).astype(np.float32)
    p = softmax(logits, 2.0)
    labels = np.array([rng.choice(10, p=row) for row in p])
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.1)
    assert fit_temperature(logits[:0], labels[:0]) == 1.0


def test_a_member_right_on_all_of_a_small_validation_set_is_not_made_one_hot() -> None:
    """A member that got all 16 validation utterances right was fitted T = 0.05 (the range's end): its
    probabilities turned one-hot and it alone decided every soft vote. Read as (n+1)/(n+2) right, it
    keeps a calibrated doubt (on a large set with errors the fit is as before: the test above)."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, size=16)
    logits = rng.normal(0, 1, size=(16, 10))
    logits[np.arange(16), labels] = logits.max(axis=1) + rng.uniform(0.5, 3.0, size=16)  # right on all
    temperature = fit_temperature(logits, labels)
    assert temperature > 0.2  # was 0.05, the end of the range
    right = softmax(logits, temperature)[np.arange(16), labels].mean()
    assert 0.8 < right < 0.97  # about (n+1)/(n+2) = 0.94 with one T for every row; one-hot was 1.0


def test_hard_vote_breaks_ties_by_summed_probability() -> None:
    a = np.array([[0.6, 0.4, 0.0], [0.9, 0.1, 0.0]])
    b = np.array([[0.1, 0.9, 0.0], [0.4, 0.6, 0.0]])
    c = np.array([[0.0, 0.2, 0.8], [0.0, 0.3, 0.7]])
    # Row 0: votes 0/1/2 one each; class 1 has the largest summed probability (1.5).
    # Row 1: same votes; class 0 sums 1.3, class 1 sums 1.0, class 2 0.7 -> class 0.
    assert combine([a, b, c], [1, 1, 1], "hard").argmax(axis=1).tolist() == [1, 0]
    # A weight of 2 is two votes, and outvotes any probability sum.
    assert combine([a, b, c], [1, 1, 2], "hard").argmax(axis=1).tolist() == [2, 2]
    assert combine([a, b], [1, 1], "soft").argmax(axis=1).tolist() == [1, 0]


def test_hard_vote_follows_weighted_votes_whatever_the_weights() -> None:
    # Class 0 has 1.01 votes, class 1 has 1.0 and by far the largest summed probability, class 2 0.5:
    # the most votes win, the probabilities only break ties.
    a = np.array([[0.34, 0.33, 0.33]])
    b = np.array([[0.0, 1.0, 0.0]])
    d = np.array([[0.0, 0.0, 1.0]])
    assert combine([a, b, d], [1.01, 1.0, 0.5], "hard").argmax(axis=1).tolist() == [0]
    # Equal weighted votes reached through different weights still tie: 0.7 + 0.1 is 0.7999... in
    # floating point, against 0.8; the tie goes to class 1's larger summed probability.
    e = np.array([[0.0, 0.45, 0.55]])
    assert combine([b, b, e], [0.7, 0.1, 0.8], "hard").argmax(axis=1).tolist() == [1]


def test_weighted_scales_by_validation_accuracy_unless_every_member_scored_zero() -> None:
    assert method_weights([1, 2], [0.5, 0.25], "weighted") == [0.5, 0.5]
    assert method_weights([1, 2], [0.5, 0.25], "soft") == [1.0, 2.0]
    assert method_weights([1, 2], [0.0, None], "weighted") == [1.0, 2.0]  # nothing to scale by
