"""Typed run configuration: what one training run (and one trial) needs, nothing Optuna-specific.

A config file and a sampled trial use the same flat keys (``d_model: 224``, ``lr: 1e-3``); they are
routed to :class:`ModelConfig` or :class:`TrainConfig` by name. Checkpoints store ``Config.to_dict()``
so any checkpoint rebuilds its model alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from search.errors import UserError, shown

ENCODERS = ("transformer", "conformer")
POOLINGS = ("mean", "attention", "attentive_stats")
HEADS = ("linear", "mlp", "amsoftmax", "aamsoftmax")
MARGIN_HEADS = ("amsoftmax", "aamsoftmax")  # cosine logits scaled by am_s, with margin am_m


@dataclass(frozen=True)
class ModelConfig:
    """Architecture: prenet -> encoder -> pooling -> head."""

    encoder: str = "transformer"
    d_model: int = 80
    heads: int = 2
    layers: int = 1
    ffn_dim: int = 256
    dropout: float = 0.1
    conv_kernel: int = 31
    pooling: str = "mean"
    head: str = "linear"
    head_bn: bool = False
    am_s: float = 30.0
    am_m: float = 0.2
    margin_warmup_steps: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, augmentation, validation and data-split settings."""

    steps: int = 70000
    batch_size: int = 32
    segment_len: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    grad_clip: float = 5.0
    label_smoothing: float = 0.0
    spec_time_masks: int = 0
    spec_time_width: int = 10
    spec_freq_masks: int = 0
    spec_freq_width: int = 5
    valid_steps: int = 2000
    checkpoint_steps: int = 0
    eval_frame_budget: int = 65536
    valid_ratio: float = 0.1
    split_seed: int = 0
    seed: int = 87
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode on CUDA; "reduce-overhead" adds CUDA graphs
    # CUDA only: record the whole training step once as a CUDA graph and replay it (the crops have a
    # static shape). Ignored on CPU and when ``compile`` is on (torch.compile then owns the step).
    cuda_graph: bool = True


@dataclass(frozen=True)
class Config:
    """One resolved run: model architecture plus training settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Flat ``key: value`` form, the same keys a config file or search space uses."""
        return {**dataclasses.asdict(self.model), **dataclasses.asdict(self.train)}

    def replace(self, **changes: Any) -> Config:
        """A copy with some flat keys changed (validated like a file)."""
        return Config.from_dict({**self.to_dict(), **changes})

    def with_steps(self, steps: int) -> Config:
        """This config on a budget of ``steps`` (``--steps``), its schedules scaled to keep their shape.

        Why: the learning-rate and margin warm-ups are counted in steps; cut the budget alone and a
        warm-up longer than the run never reaches the peak learning rate or the full margin, and the
        cosine decay never comes (7 of the boss space's 10 warm-ups under --steps 2000). Validation
        runs at least twice: once only, at the end, a study's pruner had nothing to prune on (the
        last validation is never pruned).
        """
        t = self.train
        scale = steps / t.steps
        return self.replace(
            steps=steps,
            valid_steps=min(t.valid_steps, max(1, steps // 2)),
            warmup_steps=round(t.warmup_steps * scale),
            margin_warmup_steps=round(self.model.margin_warmup_steps * scale),
        )

    def resumable(self) -> Config:
        """This config with ``last.pt`` written at least at every validation (``checkpoint_steps`` 0, the
        default, means never), so that a stopped or killed run resumes: ``train`` and every trial."""
        if self.train.checkpoint_steps:
            return self
        return self.replace(checkpoint_steps=self.train.valid_steps)

    @staticmethod
    def from_dict(
        values: dict[str, Any], source: str = "config", cross: bool = True, stored: bool = False
    ) -> Config:
        """Build and validate a config from flat keys; unknown keys and bad values raise UserError.

        ``cross=False`` skips checks between keys (d_model vs heads), for checking one value alone.
        ``stored=True``: a checkpoint's config, which trained: the checks that only guard training are
        skipped, so that a model trained before one was added still loads.
        """
        if not isinstance(values, dict):
            raise UserError(f"{source}: expected a mapping of keys to values, got {type(values).__name__}")
        model_kw: dict[str, Any] = {}
        train_kw: dict[str, Any] = {}
        for key, value in values.items():
            if key in MODEL_FIELDS:
                model_kw[key] = _coerce(source, key, value, MODEL_FIELDS[key])
            elif key in TRAIN_FIELDS:
                train_kw[key] = _coerce(source, key, value, TRAIN_FIELDS[key])
            else:
                raise UserError(
                    f"{source}: unknown key '{key}' (known keys: {', '.join(sorted(ALL_FIELDS))})"
                )
        config = Config(ModelConfig(**model_kw), TrainConfig(**train_kw))
        validate(config, source, cross, stored)
        return config


def _field_types(cls: type) -> dict[str, type]:
    return {f.name: type(f.default) for f in dataclasses.fields(cls)}


# torch.compile's modes; "reduce-overhead" replays the training step's kernels from CUDA graphs (the
# crops have a static shape), the cure for a launch-bound small model.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
MODEL_FIELDS = _field_types(ModelConfig)
TRAIN_FIELDS = _field_types(TrainConfig)
ALL_FIELDS = {**MODEL_FIELDS, **TRAIN_FIELDS}


def _coerce(source: str, key: str, value: Any, kind: type) -> Any:
    """Accept YAML's natural spellings (``1e-3`` as a string, ``64`` for a float) and nothing looser."""
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is int and isinstance(value, str) and EXPONENT.fullmatch(value.strip()):  # `steps: 1e3`
        number = float(value)  # (YAML 1.1 reads it as text; a quoted "64" stays text, and is refused)
        if number.is_integer() and abs(number) < 2**63:
            return int(number)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind is str and isinstance(value, bool):  # `pooling: no` or `choices: [on, off]`
        raise UserError(
            f"{source}: key '{key}' must be str, got {value} (YAML reads unquoted yes/no/on/off/true/false "
            "as true or false: put the word in quotes)"
        )
    raise UserError(f"{source}: key '{key}' must be {kind.__name__}, got {shown(value)}")


# A number written with an exponent, which YAML 1.1 (PyYAML) reads as text unless it has a dot and a sign.
EXPONENT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+")

# Sizes past these fail in the allocator (a traceback) or train nothing: typos, not settings.
MODEL_CAPS = {"d_model": 8192, "heads": 256, "layers": 128, "ffn_dim": 65536, "conv_kernel": 1023}


def _check_training_only(config: Config, bad: Callable[[str, str], UserError], cross: bool) -> None:
    """Values that load but cannot train: a traceback in the allocator, at step 1 or inside AdamW, or a
    loss of inf. Not asked of a trained model's stored config."""
    m, t = config.model, config.train
    for part in (m, t):  # NaN passed every range check below (`lr <= 0` is false for it)
        for f in dataclasses.fields(part):
            value = getattr(part, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f.name, f"must be a finite number, got {value}")
    for key, cap in MODEL_CAPS.items():
        if getattr(m, key) > cap:
            raise bad(key, f"is absurdly large ({getattr(m, key)}); use at most {cap:,}")
    if m.am_s > 1000:  # the scale of cosine logits: 15-64 in the literature; 1e38 overflowed
        raise bad("am_s", f"is absurdly large ({m.am_s:g}); use at most 1000 (15-64 is usual)")
    if cross and m.head_bn and t.batch_size < 2:  # its BatchNorm's statistics need two examples
        raise bad("batch_size", "must be at least 2 with head_bn (its BatchNorm needs two examples a batch)")
    if cross and m.encoder == "conformer" and t.batch_size * t.segment_len < 2:  # its convolution's BatchNorm
        raise bad(
            "batch_size", "must be at least 2 with a conformer and segment_len 1 (its BatchNorm needs two)"
        )
    if cross and t.lr * t.weight_decay >= 1:  # AdamW multiplies each weight by 1 - lr * weight_decay
        raise bad(
            "weight_decay",
            f"({t.weight_decay:g}) times lr ({t.lr:g}) must be below 1: each step would zero every weight",
        )


def validate(config: Config, source: str = "config", cross: bool = True, stored: bool = False) -> None:
    """Check value ranges and cross-key constraints; raise one UserError naming the key.

    ``stored``: a trained model's config (see :meth:`Config.from_dict`); the training-only checks
    (:func:`_check_training_only`) are skipped.
    """
    m, t = config.model, config.train

    def bad(key: str, why: str) -> UserError:
        return UserError(f"{source}: key '{key}' {why}")

    if m.encoder not in ENCODERS:
        raise bad("encoder", f"must be one of {', '.join(ENCODERS)}, got '{m.encoder}'")
    if m.pooling not in POOLINGS:
        raise bad("pooling", f"must be one of {', '.join(POOLINGS)}, got '{m.pooling}'")
    if m.head not in HEADS:
        raise bad("head", f"must be one of {', '.join(HEADS)}, got '{m.head}'")
    if not stored:
        _check_training_only(config, bad, cross)
    for key in MODEL_CAPS:
        if getattr(m, key) < 1:
            raise bad(key, "must be at least 1")
    if cross and m.d_model % m.heads:
        raise bad("d_model", f"({m.d_model}) must be divisible by heads ({m.heads})")
    if m.conv_kernel % 2 == 0:
        raise bad("conv_kernel", f"must be odd so the convolution keeps the length, got {m.conv_kernel}")
    if not 0.0 <= m.dropout < 1.0:
        raise bad("dropout", f"must be in [0, 1), got {m.dropout}")
    if m.am_s <= 0:
        raise bad("am_s", f"must be positive, got {m.am_s}")
    if not 0.0 <= m.am_m < 1.0:
        raise bad("am_m", f"must be in [0, 1), got {m.am_m}")
    if m.margin_warmup_steps < 0:
        raise bad("margin_warmup_steps", "must be >= 0")
    for key in ("steps", "batch_size", "segment_len", "valid_steps", "eval_frame_budget"):
        if getattr(t, key) < 1:
            raise bad(key, "must be at least 1")
    if t.steps > 10_000_000:
        raise bad("steps", f"is absurdly large ({t.steps}); use at most 10,000,000")
    if t.batch_size > 65536:
        raise bad("batch_size", f"is absurdly large ({t.batch_size})")
    if t.segment_len > 20_000:  # 200 s crops; HW4's longest utterance is 7,193 frames
        raise bad("segment_len", f"is absurdly large ({t.segment_len}); use at most 20,000 frames")
    for key in ("split_seed", "seed"):
        if getattr(t, key) < 0:
            raise bad(key, f"must be >= 0, got {getattr(t, key)}")
    if t.lr <= 0 or t.lr > 1.0:
        raise bad("lr", f"must be in (0, 1], got {t.lr}")
    if t.weight_decay < 0:
        raise bad("weight_decay", "must be >= 0")
    if t.warmup_steps < 0 or t.checkpoint_steps < 0:
        raise bad("warmup_steps" if t.warmup_steps < 0 else "checkpoint_steps", "must be >= 0")
    if t.grad_clip < 0:
        raise bad("grad_clip", "must be >= 0 (0 turns clipping off)")
    if not 0.0 <= t.label_smoothing < 1.0:
        raise bad("label_smoothing", f"must be in [0, 1), got {t.label_smoothing}")
    for key in ("spec_time_masks", "spec_time_width", "spec_freq_masks", "spec_freq_width"):
        if getattr(t, key) < 0:
            raise bad(key, "must be >= 0")
    if t.compile_mode not in COMPILE_MODES:
        raise bad("compile_mode", f"must be one of {', '.join(COMPILE_MODES)}, got {shown(t.compile_mode)}")
    if not 0.0 < t.valid_ratio < 1.0:
        raise bad("valid_ratio", f"must be in (0, 1), got {t.valid_ratio}")


PROJECT_DIR = Path(__file__).resolve().parent.parent  # where spaces/ and spaces/baselines/ ship


def find_yaml(text: str, folder: str) -> Path | None:
    """The YAML file ``text`` names, or None: a path as given; a bare name (``strong``, ``boss.yaml``)
    in ``./<folder>``, then in the shipped ``<folder>``; a relative path that is not there (as the README
    and the help write them, ``spaces/boss.yaml``) in the project, so it works from any folder."""
    given = Path(text)
    stem = text if text.endswith((".yaml", ".yml")) else f"{text}.yaml"
    candidates = [given]
    if "/" not in text:
        candidates += [Path(folder) / stem, PROJECT_DIR / folder / stem]
    elif not given.is_absolute():
        candidates.append(PROJECT_DIR / given)
    return next((path for path in candidates if path.is_file()), None)


def find_config(name_or_path: str | Path) -> Path:
    """``strong`` or ``strong.yaml`` finds the shipped ``spaces/baselines/strong.yaml`` (./spaces first),
    and ``spaces/baselines/strong.yaml`` (as the help and README write it) works from any folder.

    Why: ``run --space boss`` finds the shipped spaces from anywhere; ``train --config`` said only
    "file not found" outside a checkout of this repository.
    """
    text = str(name_or_path)
    found = find_yaml(os.path.expanduser(text), "spaces/baselines")
    if found is not None:
        return found
    given = Path(text).expanduser()
    if given.is_dir():
        raise UserError(f"{text}: is a folder; give a YAML config file, e.g. {given / 'strong.yaml'}")
    shipped = ", ".join(sorted(p.stem for p in (PROJECT_DIR / "spaces" / "baselines").glob("*.yaml")))
    raise UserError(
        f"{text}: file not found (looked in ./ and spaces/baselines/; shipped configs: {shipped})"
    )


def load_config(path: Path) -> Config:
    """Read a YAML config file of fixed flat values; an empty one is refused, not run on all defaults."""
    path = find_config(path)
    values = read_yaml(path)
    if values == {}:  # read_yaml gives {} for an empty or comment-only file
        raise UserError(
            f"{path}: the config is empty; set at least the model keys "
            "(encoder, d_model, heads, layers, ...) as in spaces/baselines/*.yaml"
        )
    if isinstance(values, dict) and "params" in values:
        raise UserError(
            f"{path}: this is a search space (it has 'params'), not a config; search it with "
            f"'spkid-search run --space {path}', or train a flat config such as spaces/baselines/strong.yaml"
        )
    return Config.from_dict(values, source=str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice in one mapping.

    Why: plain YAML keeps the last value silently, so ``steps: 60`` then ``steps: 70`` further down
    trains for 70 without a word about the 60 the user may be looking at.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """Read YAML with one-line errors for a missing, unreadable or malformed file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass: safe
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        if mark is not None and mark.index >= len(text.rstrip()):  # not "line 5" of a 4-line file
            where = f" at the end of the file (line {text.rstrip().count(chr(10)) + 1})"
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}: malformed YAML{where}: {problem}") from None
    return {} if data is None else data
