"""search.config: flat keys <-> typed dataclasses, and one clear line for every bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from search.config import COMPILE_MODES, Config, load_config
from search.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def test_flat_keys_round_trip_through_the_dataclasses() -> None:
    config = Config.from_dict({"encoder": "conformer", "d_model": 64, "heads": 4, "lr": "2e-3", "dropout": 0})
    assert config.model.encoder == "conformer" and config.model.d_model == 64
    assert config.train.lr == 0.002 and isinstance(config.model.dropout, float)
    assert Config.from_dict(config.to_dict()) == config
    assert config.replace(layers=5).model.layers == 5 and config.model.layers != 5


def test_every_shipped_baseline_config_loads() -> None:
    names = sorted(p.stem for p in (REPO / "spaces" / "baselines").glob("*.yaml"))
    assert {"simple", "medium", "strong", "boss"} <= set(names)
    for name in names:
        load_config(REPO / "spaces" / "baselines" / f"{name}.yaml")


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"d_modle": 64}, "unknown key 'd_modle'"),
        ({"layers": "three"}, "key 'layers' must be int, got 'three'"),
        ({"layers": 2.5}, "key 'layers' must be int"),
        ({"compile": "yes"}, "key 'compile' must be bool"),
        ({"d_model": 66, "heads": 4}, "key 'd_model' (66) must be divisible by heads (4)"),
        ({"conv_kernel": 8}, "key 'conv_kernel' must be odd"),
        ({"encoder": "lstm"}, "key 'encoder' must be one of"),
        ({"compile_mode": "fastest"}, "key 'compile_mode' must be one of default, reduce-overhead"),
        ({"valid_ratio": 1.0}, "key 'valid_ratio' must be in (0, 1)"),
        ({"segment_len": 100_000}, "key 'segment_len' is absurdly large (100000)"),
        ({"split_seed": -1}, "key 'split_seed' must be >= 0, got -1"),
        ({"seed": -2}, "key 'seed' must be >= 0, got -2"),
        # NaN passed every range check: an AdamW traceback, or clipping silently off.
        ({"lr": float("nan")}, "key 'lr' must be a finite number, got nan"),
        ({"lr": "nan"}, "key 'lr' must be a finite number, got nan"),
        ({"grad_clip": float("nan")}, "key 'grad_clip' must be a finite number"),
        ({"weight_decay": float("inf")}, "key 'weight_decay' must be a finite number"),
        # Values that loaded and then could not train: a traceback at step 1, or a loss of inf.
        ({"batch_size": 1, "head_bn": True}, "key 'batch_size' must be at least 2 with head_bn"),
        (
            {"batch_size": 1, "segment_len": 1, "encoder": "conformer"},
            "key 'batch_size' must be at least 2 with a conformer and segment_len 1",
        ),
        ({"am_s": 1e38}, "key 'am_s' is absurdly large (1e+38); use at most 1000"),
        ({"weight_decay": 1e6}, "key 'weight_decay' (1e+06) times lr (0.001) must be below 1"),
        ({"d_model": 1 << 20, "heads": 1}, "key 'd_model' is absurdly large (1048576); use at most 8,192"),
        ({"conv_kernel": 4001}, "key 'conv_kernel' is absurdly large (4001)"),
    ],
)
def test_bad_values_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(UserError) as err:
        Config.from_dict(values, source="my.yaml")
    assert str(err.value).startswith("my.yaml: ") and message in str(err.value)


def test_a_trained_models_config_loads_without_the_training_only_checks() -> None:
    """A checkpoint trained before a check was added must still predict, vote and export: the checks
    that guard training (batch_size with head_bn, am_s's top, lr x weight_decay, NaN) are not its."""
    trained = {"batch_size": 1, "head_bn": False, "am_s": 128.0, "weight_decay": 20.0, "lr": 1e-3}
    assert Config.from_dict(trained).model.am_s == 128.0  # all plausible: still accepted for training
    odd = {"batch_size": 1, "head_bn": True, "am_s": 2000.0, "weight_decay": 2000.0}
    with pytest.raises(UserError):
        Config.from_dict(odd)
    assert Config.from_dict(odd, stored=True).train.weight_decay == 2000.0
    with pytest.raises(UserError, match="key 'encoder' must be one of"):  # what rebuilds the model: checked
        Config.from_dict({**odd, "encoder": "lstm"}, stored=True)


def test_a_whole_number_in_exponent_form_is_an_int() -> None:
    """YAML 1.1 reads `steps: 1e3` as text; it is the whole number it spells, and 1.5e0 is not one."""
    assert Config.from_dict({"steps": "1e3"}).train.steps == 1000
    with pytest.raises(UserError, match="key 'steps' must be int, got '1.5e0'"):
        Config.from_dict({"steps": "1.5e0"})


def test_a_huge_value_is_not_echoed_whole() -> None:
    with pytest.raises(UserError) as err:
        Config.from_dict({"layers": ["x"] * 100_000})
    assert len(str(err.value)) < 200 and str(err.value).endswith("...")


def test_compile_modes_and_checkpoints_written_before_compile_mode_existed() -> None:
    for mode in COMPILE_MODES:
        assert Config.from_dict({"compile": True, "compile_mode": mode}).train.compile_mode == mode
    old = Config().to_dict()
    del old["compile_mode"]  # a checkpoint's config from an earlier version
    assert Config.from_dict(old).train.compile_mode == "default"


def test_a_search_space_given_as_a_config_says_which_command_takes_it() -> None:
    space = REPO / "spaces" / "smoke.yaml"
    with pytest.raises(UserError, match=r"this is a search space .* 'spkid-search run --space "):
        load_config(space)


def test_a_key_given_twice_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("d_model: 64\nheads: 2\nd_model: 128\n")
    with pytest.raises(UserError, match=r"line 3, column 1: key 'd_model' is given twice"):
        load_config(path)


def test_shipped_configs_are_found_by_name_or_by_the_readme_path_from_any_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # not a checkout: no spaces/ here
    strong = load_config(REPO / "spaces" / "baselines" / "strong.yaml")
    for given in ("strong", "strong.yaml", "spaces/baselines/strong.yaml"):
        assert load_config(Path(given)) == strong, given
    with pytest.raises(
        UserError, match=r"^nope: file not found .*shipped configs: boss, medium, simple, strong"
    ):
        load_config(Path("nope"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(UserError, match="folder: is a folder; give a YAML config file"):
        load_config(Path("folder"))
    mine = tmp_path / "strong.yaml"  # a file of the user's own wins over the shipped one of that name
    mine.write_text("encoder: transformer\nd_model: 64\nheads: 2\nlayers: 1\n")
    assert load_config(Path("strong.yaml")).model.d_model == 64


def test_a_step_budget_scales_the_warm_ups_with_it() -> None:
    """--steps 2000 on a trial with 5,000 warm-up steps never reached the peak learning rate, never
    decayed, and trained with 0.4 of its margin."""
    config = Config.from_dict({"steps": 70_000, "warmup_steps": 5_000, "margin_warmup_steps": 10_000})
    short = config.with_steps(2_000)
    assert (short.train.steps, short.train.warmup_steps, short.model.margin_warmup_steps) == (2_000, 143, 286)
    assert config.train.valid_steps >= 2_000 and short.train.valid_steps == 1_000  # validated twice
    assert config.with_steps(8_000).train.valid_steps == min(config.train.valid_steps, 4_000)
    assert config.with_steps(140_000).train.warmup_steps == 10_000  # a longer budget stretches them too


def test_resumable_writes_last_pt_at_every_validation_unless_told_more_often() -> None:
    """train and the worker each defaulted checkpoint_steps, differently: the worker overrode a space's
    own value with valid_steps."""
    base = Config.from_dict({"steps": 100, "valid_steps": 20})
    assert base.train.checkpoint_steps == 0 and base.resumable().train.checkpoint_steps == 20
    often = base.replace(checkpoint_steps=5)
    assert often.resumable() is often
