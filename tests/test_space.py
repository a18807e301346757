from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml

from search.errors import UserError
from search.samplers import TrialSeededSampler
from search.space import (
    SPACES_DIR,
    ConstraintViolation,
    load_space,
    make_pruner,
    make_sampler,
    space_changes,
)

GOOD = {
    "name": "t",
    "params": {
        "steps": 50,
        "encoder": {"choices": ["transformer", "conformer"]},
        "d_model": {"low": 32, "high": 64, "step": 32},
        "heads": {"choices": [2, 4]},
        "lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
        "conv_kernel": {"choices": [7, 15], "when": {"encoder": "conformer"}},
        "head": {"choices": ["linear", "amsoftmax"]},
        "am_m": {"low": 0.1, "high": 0.3, "when": {"head": ["amsoftmax", "aamsoftmax"]}},
    },
    "constraints": ["d_model % heads == 0"],
}


def write(tmp_path: Path, data: object, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def with_params(**params: object) -> dict[str, object]:
    return {**GOOD, "params": {**GOOD["params"], **params}}  # type: ignore[dict-item]


@pytest.mark.parametrize("name", ["smoke", "simple", "medium", "strong", "boss"])
def test_shipped_spaces_load_and_sample(name: str) -> None:
    space = load_space(name)
    assert space.path == SPACES_DIR / f"{name}.yaml"
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space))
    sampled = 0
    for _ in range(50):  # until 5 configs: a draw that breaks a constraint is told FAIL and gives none
        trial, config = space.ask(study)
        if config is None:
            continue
        assert config.model.d_model % config.model.heads == 0
        study.tell(trial, 0.5)
        sampled += 1
        if sampled == 5:
            break
    assert sampled == 5
    assert make_pruner(space) is not None


@pytest.mark.parametrize("name", ["simple", "medium", "strong", "boss"])
def test_ladder_spaces_enqueue_their_baseline(name: str) -> None:
    space = load_space(name)
    baseline = yaml.safe_load((SPACES_DIR / "baselines" / f"{name}.yaml").read_text())
    assert space.enqueue, "trial 0 must reproduce the known config"
    config = space.config_for(space.enqueue[0]).to_dict()
    for key in ("encoder", "d_model", "heads", "layers", "pooling", "head"):
        assert config[key] == baseline[key]


def test_boss_searches_the_documented_keys() -> None:
    space = load_space("boss")
    searched = {p.name for p in space.params}
    assert {
        "d_model",
        "heads",
        "layers",
        "ffn_dim",
        "dropout",
        "conv_kernel",
        "encoder",
        "pooling",
        "head",
        "am_s",
        "am_m",
        "lr",
        "warmup_steps",
        "batch_size",
        "segment_len",
    } <= searched
    assert searched & {"spec_time_masks", "spec_freq_masks"}


def test_conditional_params_only_when_active(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, GOOD))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen_kernel = seen_without = False
    for _ in range(30):
        trial, config = space.ask(study)
        if config is None:
            continue
        assert ("conv_kernel" in trial.params) == (config.model.encoder == "conformer")
        assert ("am_m" in trial.params) == (config.model.head == "amsoftmax")
        seen_kernel |= "conv_kernel" in trial.params
        seen_without |= "conv_kernel" not in trial.params
        study.tell(trial, 0.0)
    assert seen_kernel and seen_without


def test_space_found_by_name_or_path(tmp_path: Path) -> None:
    assert load_space("boss.yaml").name == "boss"
    assert load_space(write(tmp_path, GOOD)).name == "t"
    assert (
        load_space(write(tmp_path, {k: v for k, v in GOOD.items() if k != "name"}, "mine.yaml")).name
        == "mine"
    )


BAD = [
    ("params: [unclosed", "malformed YAML at the end of the file (line 1)"),
    ("name: x\nparams:\n  lr: {low: 1\n\n", "malformed YAML at the end of the file (line 3)"),
    ("name: x\nparams: [1\nsampler: 2\n", "malformed YAML at line 3, column 8"),
    (
        "name: t\nparams:\n  steps: 60\n  lr: 0.001\n  steps: 70\n",
        "line 5, column 3: key 'steps' is given twice",
    ),
    ({**GOOD, "bogus": 1}, "unknown top-level key 'bogus'"),
    (  # a typo in a condition's value: am_s was silently never searched
        with_params(am_s={"low": 10.0, "high": 20.0, "when": {"head": "amsofmax"}}),
        "params.am_s.when: head is never amsofmax in this space (it can be linear, amsoftmax), so am_s "
        "would never be searched",
    ),
    (  # the condition's key fixed to another value
        with_params(encoder="transformer"),
        "params.conv_kernel.when: encoder is never conformer in this space (it can be transformer)",
    ),
    (  # spaces/baselines/*.yaml are configs: `run --space` on one said only "unknown top-level key"
        {"encoder": "conformer", "layers": 3},
        "a training config, not a search space (its key 'encoder' is a setting); train it with "
        "'spkid-search train --config",
    ),
    (with_params(d_modle={"low": 1, "high": 2}), "params.d_modle: unknown config key"),
    (with_params(d_model={"low": 128, "high": 64}), "params.d_model: low (128) > high (64)"),
    (with_params(d_model={"low": "a", "high": 64}), "params.d_model.low: must be a number"),
    (with_params(pooling={"choices": []}), "params.pooling.choices: must be a non-empty list"),
    (with_params(pooling={"choices": ["mean", "max"]}), "params.pooling.choices: 'max' is not valid"),
    (with_params(steps="many"), "params.steps: must be int"),
    (with_params(d_model={"low": 32, "high": 64, "stepp": 8}), "params.d_model: unknown field 'stepp'"),
    (with_params(lr={"low": 0.0, "high": 0.1, "log": True}), "params.lr: log scale needs low > 0"),
    (with_params(dropout={"low": 0.1, "high": 0.5, "type": "int"}), "params.dropout.type"),
    (with_params(d_model={"low": 32.5, "high": 64}), "an int range needs whole numbers"),
    (with_params(pooling=["mean"]), "params.pooling: a list is ambiguous"),
    ({**GOOD, "params": {}}, "key 'params' must be a non-empty mapping"),
    ({**GOOD, "constraints": ["d_model % heads == 0 and import os"]}, "not a valid expression"),
    ({**GOOD, "constraints": ["__import__('os')"]}, "only arithmetic, comparisons"),
    # 1,000 terms parsed but overflowed Python's compiler: a RecursionError traceback
    ({**GOOD, "constraints": ["+".join(["d_model"] * 1000) + " > 0"]}, "too long (2001 parts, at most 500)"),
    ({**GOOD, "constraints": ["dmodel > 3"]}, "unknown key 'dmodel'"),
    ({**GOOD, "constraints": ["d_model > 1000"]}, "no valid configuration can be sampled"),
    ({**GOOD, "sampler": {"name": "bayes"}}, "sampler: 'name' must be one of"),
    ({**GOOD, "sampler": {"name": "tpe", "n_startup": 3}}, "sampler 'tpe': unknown key 'n_startup' (known: "),
    ({**GOOD, "sampler": {"name": "tpe", "gamma": 3}}, "sampler 'tpe': unknown key 'gamma'"),  # a callable
    (
        {**GOOD, "sampler": {"name": "tpe", "n_startup_trials": -2}},
        "sampler 'tpe': n_startup_trials must be a whole number >= 0 (got -2)",
    ),
    ({**GOOD, "pruner": {"name": "median", "patience": 3}}, "pruner 'median': unknown key 'patience'"),
    (
        {**GOOD, "pruner": {"name": "hyperband", "min_resource": 0}},
        "pruner 'hyperband': min_resource must be a whole number >= 1 or 'auto' (got 0)",
    ),
    (
        {**GOOD, "pruner": {"name": "hyperband", "min_resource": 100, "max_resource": 10}},
        "pruner 'hyperband': max_resource (10) < min_resource (100)",
    ),
    (
        {**GOOD, "pruner": {"name": "successive_halving", "reduction_factor": 1.5}},
        "reduction_factor must be a whole number >= 2 (got 1.5)",
    ),
    (
        {**GOOD, "pruner": {"name": "none", "n_startup_trials": 1}},
        "pruner 'none': unknown key 'n_startup_trials'",
    ),
    ({**GOOD, "enqueue": [{"d_model": 64}]}, "enqueue[0]: gives no value for searched key 'encoder'"),
    ({**GOOD, "enqueue": [{"baseline": "legendary"}]}, "unknown baseline 'legendary'"),
    ({**GOOD, "enqueue": [{"baseline": "strong"}]}, "enqueue[0]: d_model=224 lies outside"),
    (
        {**GOOD, "enqueue": [{"encoder": "lstm", "d_model": 32, "heads": 2, "lr": 1e-3, "head": "linear"}]},
        "enqueue[0]: encoder='lstm' lies outside",
    ),
    ({**GOOD, "study": {"heartbeat": 3}}, "key 'study' may only hold"),
    ({**GOOD, "study": {"max_retry": 5}}, "key 'study' may only hold grace_period, heartbeat_interval"),
    ({**GOOD, "study": {"heartbeat_interval": "abc"}}, "study.heartbeat_interval must be a whole number"),
    ({**GOOD, "study": {"heartbeat_interval": 0}}, "study.heartbeat_interval must be a whole number"),
    ({**GOOD, "study": {"grace_period": -4}}, "study.grace_period must be a whole number of seconds >= 1"),
    ({**GOOD, "study": {"grace_period": 2.5}}, "study.grace_period must be a whole number of seconds >= 1"),
    ("- just\n- a list\n", "expected a mapping at the top level"),
    (  # Optuna narrowed it to [32, 96] with a raw UserWarning, printed twice, and went on
        with_params(d_model={"low": 32, "high": 100, "step": 32}),
        "params.d_model: step 32 does not divide high - low (100 - 32); make high 96 or change step",
    ),
    (
        with_params(dropout={"low": 0.0, "high": 0.25, "step": 0.1}),
        "params.dropout: step 0.1 does not divide high - low (0.25 - 0.0); make high 0.2 or change step",
    ),
    (  # was "must be int, float or categorical, got 'categorical'"
        with_params(lr={"type": "categorical", "low": 0.001, "high": 0.01}),
        "params.lr: type categorical needs 'choices: [...]'",
    ),
    (with_params(heads={"choices": [2, 2, 4]}), "params.heads.choices: 2 is listed twice"),
    ("params:\n  dropout: {low: 0.0, high: .inf, step: 0.1}\n", "params.dropout.high: must be a finite"),
    ("params:\n  dropout: {low: 0.0, high: .nan}\n", "params.dropout.high: must be a finite number"),
    (with_params(dropout={"low": 0.0, "high": 0.3, "step": 7e-30}), "params.dropout.step: 7e-30 is too fine"),
    # A negative or fractional seed: numpy refused it in every worker, with a traceback, after the study
    # had been made (and "run the same command again" could not help).
    (
        {**GOOD, "sampler": {"name": "tpe", "seed": -5}},
        "sampler 'tpe': seed must be a whole number >= 0, got -5",
    ),
    ({**GOOD, "sampler": {"name": "tpe", "seed": 1.5}}, "sampler 'tpe': seed must be a whole number or null"),
    # Values Optuna checks only as it samples: trial 0 trained, then every later trial failed.
    ({**GOOD, "sampler": {"name": "tpe", "prior_weight": -3}}, "prior_weight must be >= 0, got -3"),
    ({**GOOD, "sampler": {"name": "cmaes", "popsize": 1}}, "popsize must be a whole number >= 2 (got 1)"),
    ({**GOOD, "sampler": {"name": "cmaes", "sigma0": -1.0}}, "sigma0 must be > 0, got -1.0"),
    (
        {**GOOD, "sampler": {"name": "cmaes", "restart_strategy": "foo"}},
        "one of null, ipop, bipop, got 'foo'",
    ),
    # Any non-empty text turned a switch on.
    (
        {**GOOD, "sampler": {"name": "tpe", "multivariate": "false"}},
        "multivariate must be true or false or null, got 'false'",
    ),
    ({**GOOD, "pruner": {"name": "patient", "min_delta": "big"}}, "min_delta must be a number, got 'big'"),
    # Constraints: a traceback (OverflowError, MemoryError) or gigabytes allocated inside eval.
    (
        {**GOOD, "constraints": ["'a' * 99999999999999999999 == encoder"]},
        "'a' may only be compared with a key",
    ),
    ({**GOOD, "constraints": ["encoder * 1000000 == 'x'"]}, "'encoder' is a text key: compare it"),
    ({**GOOD, "constraints": ["1" + "0" * 400 + " / heads > 1"]}, "is out of range (at most 2**63)"),
    ({**GOOD, "constraints": ["(encoder or head) * 1000000 != 'x'"]}, "'encoder' is a text key: compare it"),
    ({**GOOD, "constraints": ["1e999 > d_model"]}, "the number inf is not finite"),
    # Said to have "never held in 3000 random draws": it could not be evaluated at all.
    (
        {**GOOD, "constraints": ["encoder > 3"]},
        "constraints 'encoder > 3': cannot be evaluated ('>' not supported",
    ),
    # A condition on a numeric key that it never meets: the key was silently never searched.
    (
        with_params(layers={"low": 1, "high": 2}, conv_kernel={"choices": [7, 15], "when": {"layers": 5}}),
        "params.conv_kernel.when: layers is never 5 in this space (it ranges 1..2), so conv_kernel",
    ),
    (
        with_params(conv_kernel={"choices": [7, 15], "when": {"heads": "2"}}),
        "params.conv_kernel.when: heads is never '2' in this space (it can be 2, 4)",
    ),
    (
        with_params(pooling={"choices": [True, "mean"]}),
        "got True (YAML reads unquoted yes/no/on/off/true/false",
    ),
    (  # the trial ran with conv_kernel 31 (the default), not the 7 asked for
        {
            **GOOD,
            "enqueue": [
                {
                    "encoder": "transformer",
                    "conv_kernel": 7,
                    "d_model": 32,
                    "heads": 2,
                    "lr": 1e-3,
                    "head": "linear",
                }
            ],
        },
        "enqueue[0]: conv_kernel is given, but this entry does not search it (its condition encoder: "
        "conformer does not hold)",
    ),
]


@pytest.mark.parametrize(("content", "message"), BAD)
def test_bad_spaces_give_one_clear_line(tmp_path: Path, content: object, message: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(UserError) as info:
        load_space(path)
    text = str(info.value)
    assert str(path) in text and message in text
    assert "\n" not in text


def test_a_choice_that_never_gave_a_valid_config_is_a_note(tmp_path: Path) -> None:
    """Without the constraint every heads=3 trial failed (the study stopped at --max-failures); with it
    every one broke the constraint. Random draws cannot prove a choice never valid, so it is a note."""
    space = load_space(write(tmp_path, {"params": {"d_model": 32, "heads": {"choices": [2, 3]}}}))
    assert space.notes == (
        f"{tmp_path / 'space.yaml'}: params.heads: the choice 3 gave no valid configuration in 1000 random "
        "draws (key 'd_model' (32) must be divisible by heads (3)); if it can never be valid, drop it: its "
        "trials fail and count against --max-failures",
    )
    constrained = {
        "params": {"d_model": 32, "heads": {"choices": [2, 3]}},
        "constraints": ["d_model % heads == 0"],
    }
    (note,) = load_space(write(tmp_path, constrained)).notes
    assert "constraint 'd_model % heads == 0' never held in 1000 random draws" in note


def test_rare_but_valid_choices_and_grid_values_load_without_a_note(tmp_path: Path) -> None:
    """Spaces the check refused as it was first written: heads 128 fits only d_model 128, 256, ...;
    a constraint on a stepped float's grid value (dropout == 0.1, or its top 0.3) never held with
    uniform draws."""
    rare = {"params": {"d_model": {"low": 64, "high": 1024}, "heads": {"choices": [4, 8, 128]}}}
    assert load_space(write(tmp_path, {**rare, "constraints": ["d_model % heads == 0"]})).notes == ()
    grid = {
        "params": {"dropout": {"low": 0.0, "high": 0.3, "step": 0.1}, "heads": {"choices": [2, 4]}},
        "constraints": ["dropout == 0.1 or heads == 2"],
    }
    assert load_space(write(tmp_path, grid)).notes == ()
    top = {**grid, "constraints": ["dropout == 0.3 or heads == 2"]}  # 0.0 + 3 x 0.1 is not 0.3
    assert load_space(write(tmp_path, top)).notes == ()
    for name in ("smoke", "simple", "medium", "strong", "boss"):
        assert load_space(name).notes == (), name


def test_a_choice_valid_only_with_some_other_values_is_kept(tmp_path: Path) -> None:
    """heads 3 fits d_model 48 only: the space is fine, its other combinations are the constraint's."""
    space = load_space(
        write(
            tmp_path,
            {
                "params": {
                    "d_model": {"choices": [32, 48]},
                    "heads": {"choices": [2, 3]},
                    "steps": {"low": 10, "high": 40, "step": 10},
                    "dropout": {"low": 0.0, "high": 0.3, "step": 0.1},
                },
                "constraints": ["d_model % heads == 0"],
            },
        )
    )
    assert sorted(p.name for p in space.params) == ["d_model", "dropout", "heads", "steps"]


def test_space_changes_names_what_changed(tmp_path: Path) -> None:
    before = load_space(write(tmp_path, GOOD)).body
    changed = with_params(steps=60, pooling="mean", lr={"low": 1.0e-4, "high": 1.0e-2})
    after = load_space(write(tmp_path, {**changed, "constraints": []})).body
    assert space_changes(before, after) == (
        "params.lr {'high': 0.01, 'log': True, 'low': 0.0001} -> {'high': 0.01, 'low': 0.0001}; "
        "params.pooling added; params.steps 50 -> 60; 1 more"
    )
    assert space_changes(before, after, limit=9).endswith("; constraints ['d_model % heads == 0'] -> []")
    assert space_changes(before, before) == "" and space_changes("not json", after) == ""


def test_the_readmes_example_space_loads(tmp_path: Path) -> None:
    """README's example failed to load (its conditions named keys it never searched)."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    space = load_space(write(tmp_path, block))
    assert space.name == "mine" and space.enqueue[0]["d_model"] == 224  # the strong baseline's


def test_missing_space_lists_shipped_ones() -> None:
    with pytest.raises(UserError, match="no such file.*shipped spaces: .*boss"):
        load_space("nonexistent")


def test_constraint_violation_raises_in_sample(tmp_path: Path) -> None:
    space = load_space(write(tmp_path, with_params(d_model={"low": 32, "high": 40})))
    study = optuna.create_study()
    study.enqueue_trial({"encoder": "transformer", "d_model": 33, "heads": 2, "lr": 1e-3, "head": "linear"})
    with pytest.raises(ConstraintViolation, match="d_model % heads == 0"):
        space.sample(study.ask())


def test_patient_pruner_is_built_without_an_experimental_warning(tmp_path: Path) -> None:
    import warnings

    space = load_space(write(tmp_path, {**GOOD, "pruner": {"name": "patient", "patience": 1}}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = make_pruner(space)
    assert isinstance(pruner, optuna.pruners.PatientPruner) and not caught


def test_an_unsatisfiable_space_names_its_file_once(tmp_path: Path) -> None:
    path = write(tmp_path, {**with_params(d_model=30, heads=4), "constraints": []})
    with pytest.raises(UserError) as info:
        load_space(path)
    text = str(info.value)
    assert text.startswith(f"{path}: no valid configuration can be sampled: key 'd_model'")
    assert text.count(str(path)) == 1


def _draws(space_name: str, seed: int | None, workers: int, trials: int) -> list[dict[str, object]]:
    """Params of ``trials`` trials asked in turn by ``workers`` samplers built alike, on one study."""
    space = load_space(space_name)
    storage = optuna.storages.InMemoryStorage()
    optuna.create_study(study_name="s", storage=storage, direction="maximize")
    studies = [
        optuna.load_study(study_name="s", storage=storage, sampler=make_sampler(space, seed=seed))
        for _ in range(workers)
    ]
    drawn = []
    for n in range(trials):
        study = studies[n % workers]
        trial = study.ask()
        with contextlib.suppress(ConstraintViolation):
            space.sample(trial)
        drawn.append(dict(trial.params))
        study.tell(trial, 0.5)
    return drawn


def test_a_seeded_search_draws_each_trials_values_from_its_own_number() -> None:
    """Two run commands on one study (a second machine joins by running the same command) seeded their
    samplers alike and tried the same values twice; and --seed did nothing on a space without a seed."""
    two = _draws("smoke", None, workers=2, trials=4)  # smoke's sampler has seed 0: random start-up trials
    assert all(two[i] != two[j] for i in range(4) for j in range(i))
    assert _draws("smoke", None, workers=1, trials=4) == two  # a trial's draws do not depend on who asks
    assert _draws("smoke", 7, workers=1, trials=4) != two
    boss = _draws("boss", 5, workers=1, trials=3)  # boss names no seed: --seed seeds it
    assert _draws("boss", 5, workers=1, trials=3) == boss != _draws("boss", 6, workers=1, trials=3)
    assert not isinstance(make_sampler(load_space("boss")), TrialSeededSampler)  # unseeded: Optuna's way


def test_a_condition_on_a_key_left_at_its_default_holds(tmp_path: Path) -> None:
    """'when: {encoder: transformer}' with encoder left at its default (transformer) passed validation,
    but sampling saw no encoder and never searched the key."""
    space = {
        "params": {
            "steps": 40,
            "d_model": 32,
            "lr": {"low": 5e-4, "high": 5e-3, "log": True},
            "dropout": {"low": 0.0, "high": 0.2, "when": {"encoder": ["transformer"]}},
        }
    }
    path = tmp_path / "cond.yaml"
    path.write_text(yaml.safe_dump(space))
    loaded = load_space(path)
    trial = optuna.create_study().ask()
    loaded.sample(trial)
    assert set(trial.params) == {"lr", "dropout"}


def test_tpe_samples_the_conditional_keys_jointly_too() -> None:
    """Multivariate TPE models only the keys every trial has; without ``group`` the conditional ones
    (conv_kernel, am_s, am_m: drawn for some choices only) were each sampled on their own, by
    univariate TPE. With groups, each set of keys drawn together is modelled jointly."""
    space = load_space("smoke")
    sampler = make_sampler(space)
    inner = sampler.inner if isinstance(sampler, TrialSeededSampler) else sampler
    alone: list[tuple[int, str]] = []
    independent = inner.sample_independent

    def spy(study: optuna.Study, trial: Any, name: str, distribution: Any) -> Any:
        alone.append((trial.number, name))
        return independent(study, trial, name, distribution)

    inner.sample_independent = spy  # type: ignore[method-assign,assignment]
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for i in range(16):
        trial, config = space.ask(study)
        if config is not None:
            study.tell(trial, (i * 7919) % 13 / 13)
    startup = space.sampler["n_startup_trials"]
    assert {"conv_kernel", "am_s"} <= {k for t in study.trials[startup:] for k in t.params}
    assert not [(n, name) for n, name in alone if n >= startup + 1], alone


def test_a_steps_budget_scales_the_pruners_step_options() -> None:
    """The shipped spaces' median pruner waited 10,000 steps: under ``run --steps 2000`` it never pruned,
    and the search cost what one without a pruner does."""
    strong = load_space("strong")
    assert strong.pruner["n_warmup_steps"] == 10_000 and strong.config_for({}).train.steps == 70_000

    def prunes(pruner: optuna.pruners.BasePruner) -> bool:
        """Whether a trial far below five finished ones at step 1,000 is pruned there."""
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for _ in range(5):
            trial = study.ask()
            trial.report(0.9, 1_000)
            study.tell(trial, 0.9)
        trial = study.ask()
        trial.report(0.1, 1_000)
        return trial.should_prune()

    assert not prunes(make_pruner(strong)) and prunes(make_pruner(strong, steps=2_000))
    boss = make_pruner(load_space("boss"), steps=7_000)
    assert isinstance(boss, optuna.pruners.HyperbandPruner)
    assert (boss._min_resource, boss._max_resource, boss._reduction_factor) == (400, 7_000, 3)


def test_yaml_exponents_are_the_numbers_they_spell(tmp_path: Path) -> None:
    """PyYAML (YAML 1.1) reads 1e-4 as text: `low: 1e-4` was refused as "must be a number", and
    `choices: [1e-3, 0.001]` passed the check for a choice listed twice."""
    text = (
        "params:\n  steps: 50\n  lr: {low: 1e-4, high: 1E-2, log: true}\n"
        "  weight_decay: {choices: [1e-3, 1.0e1]}\n"
    )
    space = load_space(write(tmp_path, text))
    lr, wd = (p.distribution for p in space.params)
    assert isinstance(lr, optuna.distributions.FloatDistribution) and (lr.low, lr.high) == (1e-4, 1e-2)
    # Choices and the recorded body stay as written: a study made before records them so, and resumes.
    assert isinstance(wd, optuna.distributions.CategoricalDistribution) and wd.choices == ("1e-3", "1.0e1")
    assert '"low": "1e-4"' in space.body
    assert space.config_for({"weight_decay": "1e-3", "lr": 1e-3}).train.weight_decay == 1e-3
    with pytest.raises(UserError, match="weight_decay.choices: 0.001 is listed twice"):
        load_space(write(tmp_path, text.replace("1.0e1", "0.001")))


def test_exponent_choices_and_fixed_values_are_numbers_to_constraints_conditions_and_enqueue(
    tmp_path: Path,
) -> None:
    """Only a range's bounds were read as numbers: `lr * batch_size <= 0.2` over `lr: {choices: [1e-3,
    3e-3]}` compared text with a number (refused), `lr * 1000000000` built a 4 GB string while loading,
    a condition `weight_decay: [0.01]` never met '1e-2', and an enqueued 1.0e-3 lay "outside"."""
    text = (
        "params:\n  steps: 50\n  lr: {choices: [1e-3, 3e-3]}\n  batch_size: {choices: [32, 64]}\n"
        "  weight_decay: {choices: [1e-2, 1e-1]}\n  label_smoothing: 1e-1\n"
        "  am_m: {low: 0.1, high: 0.3, when: {weight_decay: [0.01]}}\n"
        "constraints: ['lr * batch_size <= 0.1', 'label_smoothing < 0.2', 'lr * 1000000000 < 5000000']\n"
        "enqueue: [{lr: 1.0e-3, batch_size: 64, weight_decay: '1e-2', am_m: 0.2}]\n"
    )
    space = load_space(write(tmp_path, text))
    assert space.fixed["label_smoothing"] == 0.1
    assert space.enqueue == [
        {"lr": "1e-3", "batch_size": 64, "weight_decay": "1e-2", "am_m": 0.2}
    ]  # as written
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial, config = space.ask(study)
        if config is None:  # 3e-3 x 64 breaks the first constraint: the only failing pair
            assert (trial.params["lr"], trial.params["batch_size"]) == ("3e-3", 64)
            continue
        assert config.train.lr in (1e-3, 3e-3) and ("am_m" in trial.params) == (
            config.train.weight_decay == 0.01
        )
        seen.add(trial.params["lr"])
    assert seen == {"1e-3", "3e-3"}  # recorded as the space writes them: a study made before resumes


def test_cmaes_and_gp_say_which_keys_they_draw_at_random(tmp_path: Path) -> None:
    """Optuna says so once a trial, in a worker log that run keeps quiet: cmaes on the boss space was a
    random search of its categorical and conditional keys without a word."""
    cmaes = load_space(write(tmp_path, {**GOOD, "sampler": {"name": "cmaes"}}))
    gp = load_space(write(tmp_path, {**GOOD, "sampler": {"name": "gp"}}, "gp.yaml"))
    tpe = load_space(write(tmp_path, GOOD, "tpe.yaml"))
    assert [n for n in cmaes.notes if "sampler" in n] == [
        f"{tmp_path / 'space.yaml'}: sampler 'cmaes' draws am_m, conv_kernel, encoder, head, heads at random "
        "(CMA-ES models only numeric keys that every trial has); tpe models every key"
    ]
    assert [n for n in gp.notes if "sampler" in n] == [
        f"{tmp_path / 'gp.yaml'}: sampler 'gp' draws am_m, conv_kernel at random (GP models only keys that "
        "every trial has); tpe models every key"
    ]
    assert tpe.notes == ()
    # What the notes claim: Optuna's own warnings name the same keys as they are drawn.
    import logging
    import warnings

    from search.space import make_sampler

    study = optuna.create_study(sampler=make_sampler(cmaes, seed=0), direction="maximize")
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    optuna.logging.get_logger("optuna").addHandler(handler)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(8):
                trial, config = cmaes.ask(study)
                if config is not None:
                    study.tell(trial, float(config.model.d_model))
    finally:
        optuna.logging.set_verbosity(verbosity)
        optuna.logging.get_logger("optuna").removeHandler(handler)
    named = {m.split("`")[1] for m in messages if "independently using `RandomSampler`" in m}
    assert named and named <= {"encoder", "heads", "conv_kernel", "head", "am_m"}


@pytest.mark.parametrize(
    ("pruner", "steps", "noted"),
    [
        ({"name": "hyperband", "min_resource": 4000, "max_resource": 70000}, 60, True),
        ({"name": "median", "n_warmup_steps": 5000}, 60, True),
        ({"name": "patient", "n_warmup_steps": 60}, 60, True),
        ({"name": "successive_halving", "min_resource": 20}, 60, False),
        ({"name": "median", "n_warmup_steps": 10}, 60, False),
        ({"name": "hyperband", "min_resource": 4000}, {"low": 1000, "high": 5000, "step": 1000}, False),
        ({"name": "hyperband", "min_resource": 6000}, {"low": 1000, "high": 5000, "step": 1000}, True),
        ({"name": "median", "n_warmup_steps": 100}, {"choices": [1000, 2000]}, False),  # said "0 steps"
        ({"name": "median", "n_warmup_steps": 2000}, {"choices": [1000, 2000]}, True),
        ({"name": "median", "n_warmup_steps": 1500}, {"choices": ["1e3", 2000]}, False),  # YAML 1.1's text
    ],
)
def test_a_pruner_that_could_never_prune_is_a_note(
    tmp_path: Path, pruner: dict[str, object], steps: object, noted: bool
) -> None:
    """The boss space's pruner copied into a short space: no trial was ever pruned, without a word."""
    space = load_space(write(tmp_path, {**with_params(steps=steps), "pruner": pruner}))
    notes = [n for n in space.notes if "is ever pruned" in n or "no trial is ever pruned" in n]
    assert bool(notes) == noted, space.notes
    if noted:
        assert f"pruner '{pruner['name']}'" in notes[0] and "lower it" in notes[0]


def test_longest_steps_reads_steps_however_the_space_gives_them(tmp_path: Path) -> None:
    """run sizes its CPU note and budget check from it: `steps: {choices: [1e3, 500]}` (YAML 1.1's text
    '1e3') crashed run with int('1e3')."""
    assert load_space(write(tmp_path, GOOD)).longest_steps == 50
    ranged = with_params(steps={"low": 100, "high": 300, "step": 100})
    assert load_space(write(tmp_path, ranged, "r.yaml")).longest_steps == 300
    text = "params:\n  steps: {choices: [1e3, 500]}\n  lr: {low: 1.0e-4, high: 1.0e-2}\n"
    assert load_space(write(tmp_path, text, "c.yaml")).longest_steps == 1000
