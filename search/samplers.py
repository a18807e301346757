"""Optuna samplers and pruners from a search space's ``sampler:`` and ``pruner:`` settings.

Every option is checked against the builder's own signature (its name and annotated type) and the
ranges Optuna checks only when it samples, so a wrong one is refused when the space is loaded rather
than failing trial after trial. A seeded search reseeds the sampler from (seed, trial number) as each
trial starts (:class:`TrialSeededSampler`), so workers on many machines never repeat each other's draws.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from search.errors import UserError, shown

SAMPLERS = ("tpe", "random", "cmaes", "gp")
PRUNERS = ("median", "successive_halving", "hyperband", "patient", "none")

# Options that take Python objects (callables, samplers, trial lists): a YAML file cannot give them.
_OBJECT_OPTIONS = {"constraints_func", "weights", "gamma", "independent_sampler", "source_trials", "x0"}
# Whole-number options and their least value; the resources may also be "auto".
_COUNTS = {
    "n_startup_trials": 0,
    "n_warmup_steps": 0,
    "interval_steps": 1,
    "n_min_trials": 1,
    "n_ei_candidates": 1,
    "min_resource": 1,
    "max_resource": 1,
    "reduction_factor": 2,
    "min_early_stopping_rate": 0,
    "bootstrap_count": 0,
    "patience": 0,
    "popsize": 2,  # CMA-ES learns from the best half of each generation: 1 failed every trial after the first
    "inc_popsize": 1,
}


# Options that take numbers with a range Optuna checks only when it samples (trials fail one by one).
_LEAST_FLOAT = {"prior_weight": (0.0, True), "sigma0": (0.0, False)}  # (bound, whether it is allowed)
_CHOICES = {"restart_strategy": (None, "ipop", "bipop")}


def _check_options(opts: dict[str, Any], types: dict[str, set[str]], where: str) -> None:
    """Unknown keys, values of the wrong type and out-of-range counts, named before Optuna sees them.

    Why: Optuna reports a misspelt option in Python's words and accepts some impossible values
    (``min_resource: 0`` only fails, as a division by zero, once trials run; ``prior_weight: -3`` failed
    every trial after the first; ``multivariate: "false"``, a non-empty text, turned the option on).
    """
    unknown = sorted(set(opts) - set(types))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(sorted(types)) or 'none'})")
    for key, least in _COUNTS.items():
        value = opts.get(key)
        if key not in opts or (key.endswith("_resource") and value == "auto"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            auto = " or 'auto'" if key.endswith("_resource") else ""
            raise UserError(f"{where}: {key} must be a whole number >= {least}{auto} (got {value!r})")
    for key, value in opts.items():
        if not _of_type(value, types[key]):
            names = sorted(types[key], key=lambda t: (t == "None", t))  # "null" last
            wanted = " or ".join(_TYPE_WORDS.get(t, t) for t in names)
            raise UserError(f"{where}: {key} must be {wanted}, got {shown(value)}")
    for key, (bound, inclusive) in _LEAST_FLOAT.items():
        value = opts.get(key)
        if value is not None and (value < bound if inclusive else value <= bound):
            raise UserError(
                f"{where}: {key} must be {'>=' if inclusive else '>'} {bound:g}, got {shown(value)}"
            )
    for key, allowed in _CHOICES.items():
        if key in opts and opts[key] not in allowed:
            shown_allowed = ", ".join("null" if a is None else str(a) for a in allowed)
            raise UserError(f"{where}: {key} must be one of {shown_allowed}, got {shown(opts[key])}")
    low, high = opts.get("min_resource"), opts.get("max_resource")
    if isinstance(low, int) and isinstance(high, int) and high < low:
        raise UserError(f"{where}: max_resource ({high}) < min_resource ({low})")


_TYPE_WORDS = {
    "None": "null",
    "bool": "true or false",
    "int": "a whole number",
    "float": "a number",
    "str": "text",
}


def _of_type(value: Any, names: set[str]) -> bool:
    """Whether a YAML value fits an option annotated with the type ``names`` ({"bool", "None"}...)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (
        ("None" in names and value is None)
        or ("bool" in names and isinstance(value, bool))
        or ("int" in names and number and isinstance(value, int))
        or ("float" in names and number and math.isfinite(value))
        or ("str" in names and isinstance(value, str))
    )


def _option_types(*builders: Callable[..., Any]) -> dict[str, set[str]]:
    """The options a sampler or pruner takes from YAML, each with its annotated types by name."""
    types: dict[str, set[str]] = {}
    for builder in builders:
        for name, param in inspect.signature(builder).parameters.items():
            if name in _OBJECT_OPTIONS or name == "wrapped_pruner":
                continue
            note = param.annotation
            text = note if isinstance(note, str) else getattr(note, "__name__", str(note))
            types[name] = {part.strip() for part in text.split("|")}
    return types


def build_sampler(
    settings: dict[str, Any], src: str = "space", seed: int | None = None
) -> optuna.samplers.BaseSampler:
    """The sampler a space's ``sampler:`` settings name, with Optuna 5's defaults unless they override them.

    A seeded search (the space's ``sampler.seed``, or ``run --seed``; both add up) draws each trial's
    values from a random state reset from (seed, trial number), see :class:`TrialSeededSampler`.
    Without either, the sampler is unseeded, as Optuna's default.
    """
    opts = {k: v for k, v in settings.items() if k != "name"}
    name = settings["name"]
    builders: dict[str, Callable[..., optuna.samplers.BaseSampler]] = {
        "tpe": optuna.samplers.TPESampler,
        "random": optuna.samplers.RandomSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
        "gp": optuna.samplers.GPSampler,
    }
    _check_options(opts, _option_types(builders[name]), f"{src}: sampler '{name}'")
    base = opts.pop("seed", None)  # seeds each trial instead (TrialSeededSampler)
    if base is not None and base < 0:  # numpy's seed sequence refused it in every worker
        raise UserError(f"{src}: sampler '{name}': seed must be a whole number >= 0, got {shown(base)}")
    if name == "tpe":
        opts.setdefault("multivariate", True)
        opts.setdefault("constant_liar", True)
        # The conditional keys (conv_kernel, am_s...) modelled jointly too, in groups of keys drawn
        # together: multivariate TPE alone models only the keys every trial has.
        opts.setdefault("group", bool(opts["multivariate"]))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sampler = builders[name](**opts)
    except (TypeError, ValueError, ImportError) as exc:
        raise UserError(f"{src}: sampler '{name}': {str(exc).splitlines()[0]}") from None
    if base is None and seed is None:
        return sampler
    return TrialSeededSampler(sampler, (base or 0) + (seed or 0))


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """A sampler whose random state is reset from (seed, trial number) as each trial starts.

    Why: a study is run by several workers, and by several ``run`` commands on other machines (they
    join by running the same command). Seeding each sampler once, from what its worker knew, gave two
    commands the same seeds, and they tried the same values twice. Trial numbers are unique across all
    of them, so a trial's random draws are now its own; and one worker with the same seed still makes
    the same search.
    """

    def __init__(self, inner: optuna.samplers.BaseSampler, seed: int) -> None:
        self.inner = inner
        self.seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        state = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
        _reseed(self.inner, state)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.inner.reseed_rng()


def _reseed(sampler: optuna.samplers.BaseSampler, state: int) -> None:
    """Seed every random state a sampler holds, and those of the samplers inside it (TPE's random
    sampler for its first trials, CMA-ES's and GP's independent samplers)."""
    from optuna.samplers._lazy_random_state import LazyRandomState

    for value in vars(sampler).values():
        if isinstance(value, LazyRandomState):
            value.rng.seed(state)
        elif isinstance(value, optuna.samplers.BaseSampler):
            _reseed(value, state)


PRUNER_STEP_OPTIONS = ("n_warmup_steps", "interval_steps", "min_resource", "max_resource")


def build_pruner(
    settings: dict[str, Any], src: str = "space", scale: float | None = None
) -> optuna.pruners.BasePruner:
    """The pruner a space's ``pruner:`` settings name; ``patient`` wraps a median pruner with
    ``patience`` validations. ``scale``: the options counted in steps are multiplied by it."""
    opts = {k: v for k, v in settings.items() if k != "name"}
    if scale is not None:
        for key in PRUNER_STEP_OPTIONS:
            value = opts.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                opts[key] = max(0 if key == "n_warmup_steps" else 1, round(value * scale))
    name = settings["name"]
    pruners = optuna.pruners
    known = {
        "median": _option_types(pruners.MedianPruner),
        "successive_halving": _option_types(pruners.SuccessiveHalvingPruner),
        "hyperband": _option_types(pruners.HyperbandPruner),
        "patient": _option_types(pruners.MedianPruner, pruners.PatientPruner),
        "none": {},
    }
    _check_options(opts, known[name], f"{src}: pruner '{name}'")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # PatientPruner's
            if name == "median":
                return pruners.MedianPruner(**opts)
            if name == "successive_halving":
                return pruners.SuccessiveHalvingPruner(**opts)
            if name == "hyperband":
                return pruners.HyperbandPruner(**opts)
            if name == "patient":
                patience = opts.pop("patience", 2)
                min_delta = opts.pop("min_delta", 0.0)
                return pruners.PatientPruner(pruners.MedianPruner(**opts), patience, min_delta)
            return pruners.NopPruner()
    except (TypeError, ValueError) as exc:
        raise UserError(f"{src}: pruner '{name}': {str(exc).splitlines()[0]}") from None
