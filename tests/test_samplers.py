"""search.samplers: Optuna samplers and pruners from a space's settings, checked before any trial runs."""

from __future__ import annotations

import optuna
import pytest

from search.errors import UserError
from search.samplers import TrialSeededSampler, build_pruner, build_sampler


def test_tpe_defaults_and_a_seed_that_seeds_each_trial() -> None:
    sampler = build_sampler({"name": "tpe", "seed": 3}, seed=4)
    assert isinstance(sampler, TrialSeededSampler) and sampler.seed == 7  # the space's and run's add up
    inner = sampler.inner
    assert isinstance(inner, optuna.samplers.TPESampler)
    assert inner._multivariate and inner._constant_liar and inner._group  # Optuna's own defaults are off
    assert not isinstance(build_sampler({"name": "random"}), TrialSeededSampler)  # unseeded: as Optuna's


def test_the_same_trial_number_draws_the_same_values_in_any_worker() -> None:
    """Workers on two machines share no sampler; a seeded trial's draws depend on its number alone."""
    draws = []
    for _ in range(2):
        study = optuna.create_study(sampler=build_sampler({"name": "random", "seed": 1}))
        draws.append([study.ask().suggest_float("x", 0, 1) for _ in range(3)])
    assert draws[0] == draws[1] and len(set(draws[0])) == 3


def test_options_are_checked_against_the_builders_signature_and_ranges() -> None:
    for settings, said in (
        ({"name": "tpe", "n_startup": 3}, "sampler 'tpe': unknown key 'n_startup'"),
        ({"name": "tpe", "multivariate": "false"}, "multivariate must be true or false"),
        ({"name": "cmaes", "popsize": 1}, "popsize must be a whole number >= 2"),
        ({"name": "tpe", "seed": -1}, "seed must be a whole number >= 0"),
    ):
        with pytest.raises(UserError, match=said):
            build_sampler(settings)
    with pytest.raises(UserError, match=r"pruner 'hyperband': max_resource \(10\) < min_resource \(100\)"):
        build_pruner({"name": "hyperband", "min_resource": 100, "max_resource": 10})


def test_a_pruners_step_options_scale_with_the_trials_budget() -> None:
    pruner = build_pruner({"name": "median", "n_warmup_steps": 10_000, "interval_steps": 1}, scale=0.1)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert pruner._n_warmup_steps == 1_000 and pruner._interval_steps == 1  # at least 1
    patient = build_pruner({"name": "patient", "patience": 3, "n_warmup_steps": 40}, scale=0.5)
    assert isinstance(patient, optuna.pruners.PatientPruner) and patient._patience == 3
    wrapped = patient._wrapped_pruner
    assert isinstance(wrapped, optuna.pruners.MedianPruner) and wrapped._n_warmup_steps == 20
