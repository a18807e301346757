"""Search spaces: a YAML file -> validated distributions, sampler/pruner settings and enqueued configs.

Schema (every key optional except ``params``)::

    name: boss                      # study name default; the file's stem when absent
    description: free text
    params:                         # flat config keys (see search/config.py)
      steps: 3000                   # a plain value is fixed
      d_model: {low: 64, high: 256, step: 32}          # int range (ints in, ints out)
      lr: {low: 1.0e-4, high: 3.0e-3, log: true}       # float range
      pooling: {choices: [mean, attention]}            # categorical
      encoder: {choices: [transformer, conformer]}
      conv_kernel: {choices: [15, 31], when: {encoder: conformer}}   # conditional (on a searched key)
    constraints: ["d_model % heads == 0"]   # must hold for a trial to train
    sampler: {name: tpe, seed: 0, n_startup_trials: 10}   # tpe | random | cmaes | gp
    pruner: {name: median, n_startup_trials: 3, n_warmup_steps: 0}  # median | successive_halving |
                                                                   # hyperband | patient | none
    enqueue: [{baseline: strong}, {d_model: 128, ...}]   # tried first, in order
    study: {heartbeat_interval: 20, grace_period: 60}

A conditional parameter is sampled only when its ``when`` holds; otherwise the config default is used.
An enqueued baseline gives the values of the searched keys; the others are the space's own.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

import optuna

from search.config import ALL_FIELDS, EXPONENT, PROJECT_DIR, Config, find_yaml, read_yaml
from search.errors import UserError, first_line, shown
from search.samplers import PRUNERS, SAMPLERS, build_pruner, build_sampler

SPACES_DIR = PROJECT_DIR / "spaces"
TOP_KEYS = {"name", "description", "params", "constraints", "sampler", "pruner", "enqueue", "study"}
PARAM_KEYS = {"type", "low", "high", "step", "log", "choices", "when"}
STUDY_KEYS = {"heartbeat_interval", "grace_period"}  # seconds, as run --heartbeat


@dataclass(frozen=True)
class Param:
    """One searched key: an Optuna distribution plus an optional condition on other keys."""

    name: str
    distribution: optuna.distributions.BaseDistribution
    when: dict[str, list[Any]] = field(default_factory=dict)
    values: tuple[Any, ...] = ()  # a categorical's choices as configs get them ('1e-3' is 0.001)

    def typed(self, choice: Any) -> Any:
        """The config value of one of its choices as written (Optuna records them as written, so that a
        study resumes; constraints, conditions and configs see the value)."""
        return next(
            (v for c, v in zip(self.written, self.values, strict=True) if _same_choice(c, choice)), choice
        )

    @property
    def written(self) -> tuple[Any, ...]:
        """A categorical's choices as the space writes them (and Optuna records them); () for a range."""
        return tuple(getattr(self.distribution, "choices", ())) if self.values else ()

    def active(self, values: dict[str, Any]) -> bool:
        """Whether its condition holds for ``values``; a key they leave out has its default, as in the
        trial's config (validation reads the conditions so, and sampling once did not: a condition on
        a default was accepted and then never true)."""
        defaults = _config_defaults()
        return all(values.get(key, defaults.get(key)) in allowed for key, allowed in self.when.items())


@lru_cache(maxsize=1)
def _config_defaults() -> dict[str, Any]:
    return Config().to_dict()


@dataclass(frozen=True)
class Space:
    """A validated search space."""

    name: str
    path: Path
    fixed: dict[str, Any]
    params: list[Param]
    constraints: list[str]
    sampler: dict[str, Any]
    pruner: dict[str, Any]
    enqueue: list[dict[str, Any]]
    study: dict[str, Any]
    raw: dict[str, Any]
    notes: tuple[str, ...] = ()  # what looks wrong but may not be (run prints them before it starts)

    @property
    def body(self) -> str:
        """What the space searches (its params and constraints, not its comments), as canonical JSON."""
        body = {k: self.raw.get(k) for k in ("params", "constraints")}
        return json.dumps(body, sort_keys=True, default=str)

    @property
    def digest(self) -> str:
        """Identity of what the space searches, recorded in the study."""
        return hashlib.sha256(self.body.encode()).hexdigest()[:16]

    @property
    def longest_steps(self) -> int:
        """The most steps a trial of this space trains: its fixed steps, or a searched top."""
        for p in self.params:
            if p.name == "steps":
                top = max(p.values) if p.values else getattr(p.distribution, "high", 0)
                return int(top)
        return self.config_for({}).train.steps

    @property
    def searched(self) -> frozenset[str]:
        """The config keys the space samples; the rest are fixed by it or take their defaults."""
        return frozenset(p.name for p in self.params)

    def sample(self, trial: optuna.Trial) -> Config:
        """Suggest every active parameter and return the resolved config; a broken constraint raises
        :class:`ConstraintViolation`, a bad combination :class:`UserError`."""
        values: dict[str, Any] = dict(self.fixed)
        for param in self.params:
            if param.active(values):
                values[param.name] = param.typed(_suggest(trial, param))
        for expr in self.constraints:
            if not _eval_constraint(expr, {**_config_defaults(), **values}):
                raise ConstraintViolation(f"constraint '{expr}' does not hold")
        return Config.from_dict(values, source=f"{self.name} trial")

    def ask(self, study: optuna.Study) -> tuple[optuna.Trial, Config | None]:
        """A new trial of ``study`` and its config; None, with the trial told FAIL, when its values break
        a constraint (as a worker's trial is). For studies driven outside ``run``: a benchmark, a
        notebook, the tests."""
        trial = study.ask()
        try:
            return trial, self.sample(trial)
        except ConstraintViolation:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return trial, None

    def config_for(self, params: dict[str, Any]) -> Config:
        """The config a given parameter assignment produces (fixed values + params)."""
        return Config.from_dict({**self.fixed, **params}, source=f"{self.name} enqueue")


def space_changes(old_body: str, new_body: str, limit: int = 3) -> str:
    """What differs between two :attr:`Space.body` texts, as 'params.steps 30 -> 31; ...' (at most
    ``limit`` changes named); '' if either cannot be read."""
    try:
        old, new = json.loads(old_body), json.loads(new_body)
        old_params, new_params = old.get("params") or {}, new.get("params") or {}
    except (ValueError, TypeError, AttributeError):
        return ""
    said: list[str] = []
    for key in sorted(set(old_params) | set(new_params)):
        if key not in new_params:
            said.append(f"params.{key} removed")
        elif key not in old_params:
            said.append(f"params.{key} added")
        elif old_params[key] != new_params[key]:
            said.append(f"params.{key} {shown(old_params[key])} -> {shown(new_params[key])}")
    if (old.get("constraints") or []) != (new.get("constraints") or []):
        said.append(
            f"constraints {shown(old.get('constraints') or [])} -> {shown(new.get('constraints') or [])}"
        )
    more = f"; {len(said) - limit} more" if len(said) > limit else ""
    return "; ".join(said[:limit]) + more


class ConstraintViolation(UserError):
    """A sampled combination breaks one of the space's constraints; the trial ends FAIL, the study goes on."""


def _suggest(trial: optuna.Trial, param: Param) -> Any:
    d = param.distribution
    if isinstance(d, optuna.distributions.IntDistribution):
        return trial.suggest_int(param.name, d.low, d.high, step=d.step, log=d.log)
    if isinstance(d, optuna.distributions.FloatDistribution):
        return trial.suggest_float(param.name, d.low, d.high, step=d.step, log=d.log)
    assert isinstance(d, optuna.distributions.CategoricalDistribution)
    return trial.suggest_categorical(param.name, list(d.choices))


def find_space(name_or_path: str | Path) -> Path:
    """``boss`` or ``boss.yaml`` finds ``spaces/boss.yaml`` (cwd first, then the package's), or a path."""
    text = str(name_or_path)
    found = find_yaml(text, "spaces")
    if found is not None:
        return found
    if Path(text).is_dir():
        raise UserError(
            f"--space {text}: is a folder; give a search-space YAML file or a shipped space's name"
        )
    shipped = ", ".join(sorted(p.stem for p in SPACES_DIR.glob("*.yaml")))
    raise UserError(f"--space {text}: no such file (looked in ./, spaces/; shipped spaces: {shipped})")


def load_space(name_or_path: str | Path) -> Space:
    """Read and strictly validate a space file; every problem is one line naming the file and key."""
    path = find_space(name_or_path)
    raw = read_yaml(path)
    src = str(path)
    if not isinstance(raw, dict):
        raise UserError(f"{src}: expected a mapping at the top level (name, params, sampler, ...)")
    for key in raw:
        if key not in TOP_KEYS:
            if "params" not in raw and key in ALL_FIELDS:
                raise UserError(
                    f"{src}: a training config, not a search space (its key '{key}' is a setting); "
                    f"train it with 'spkid-search train --config {src}', or search with a space file"
                )
            raise UserError(f"{src}: unknown top-level key '{key}' (known: {', '.join(sorted(TOP_KEYS))})")
    name = raw.get("name", path.stem)
    if not isinstance(name, str):
        raise UserError(f"{src}: key 'name' must be a string")
    params_raw = raw.get("params")
    if not isinstance(params_raw, dict) or not params_raw:
        raise UserError(f"{src}: key 'params' must be a non-empty mapping of config keys")
    fixed: dict[str, Any] = {}
    params: list[Param] = []
    for key, spec in params_raw.items():
        where = f"{src}: params.{key}"
        if key not in ALL_FIELDS:
            raise UserError(f"{where}: unknown config key (known: {', '.join(sorted(ALL_FIELDS))})")
        if isinstance(spec, dict):
            params.append(_param(key, spec, where))
        elif isinstance(spec, list):
            raise UserError(f"{where}: a list is ambiguous; write {{choices: [...]}} for a categorical")
        else:
            try:
                config = Config.from_dict({key: spec}, source=where, cross=False)
            except UserError as exc:
                raise UserError(str(exc).replace(f"{where}: key '{key}'", f"{where}:")) from None
            fixed[key] = config.to_dict()[key]  # as configs get it: `lr: 1e-3` (YAML 1.1's text) is 0.001
    # A condition's values as configs get them, where the key takes them so: `when: {lr: [1e-3]}`.
    params = [
        dataclasses.replace(p, when={k: [_typed_value(k, v) for v in vs] for k, vs in p.when.items()})
        for p in params
    ]
    by_name = {p.name: p for p in params}
    defaults = _config_defaults()
    for p in params:
        for cond_key, allowed in p.when.items():
            if cond_key not in ALL_FIELDS:
                raise UserError(f"{src}: params.{p.name}.when: unknown key '{cond_key}'")
            # The values the condition can meet: a searched categorical's choices, else the one value.
            cond = by_name.get(cond_key)
            if cond is None:
                possible = [fixed.get(cond_key, defaults[cond_key])]
            elif isinstance(cond.distribution, optuna.distributions.CategoricalDistribution):
                possible = list(cond.values)
            else:  # a numeric range: one of the values must be on it
                if not any(_on_range(cond.distribution, value) for value in allowed):
                    raise UserError(
                        f"{src}: params.{p.name}.when: {cond_key} is never {_listed(allowed)} in this space "
                        f"(it ranges {_range_text(cond.distribution)}), so {p.name} would never be searched; "
                        "fix the value or drop the condition"
                    )
                continue
            if not any(_same(value, c) for value in allowed for c in possible):
                mixed = not all(isinstance(v, str) for v in [*allowed, *possible])  # "2" beside 2
                raise UserError(
                    f"{src}: params.{p.name}.when: {cond_key} is never {_listed(allowed, mixed)} in this "
                    f"space (it can be {_listed(possible, mixed)}), so {p.name} would never be searched; fix "
                    "the value or drop the condition"
                )
    params = _condition_order(params, src)
    constraints = raw.get("constraints", []) or []
    if not isinstance(constraints, list) or not all(isinstance(c, str) for c in constraints):
        raise UserError(f"{src}: key 'constraints' must be a list of expressions like 'd_model % heads == 0'")
    for expr in constraints:
        _check_constraint_syntax(expr, f"{src}: constraints '{expr}'")
    sampler = _settings(raw.get("sampler", {"name": "tpe"}), SAMPLERS, f"{src}: sampler")
    pruner = _settings(raw.get("pruner", {"name": "median"}), PRUNERS, f"{src}: pruner")
    study = raw.get("study", {}) or {}
    if not isinstance(study, dict) or not set(study) <= STUDY_KEYS:
        raise UserError(f"{src}: key 'study' may only hold {', '.join(sorted(STUDY_KEYS))}")
    for key, value in study.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{src}: study.{key} must be a whole number of seconds >= 1, got {shown(value)}")
    space = Space(name, path, fixed, params, list(constraints), sampler, pruner, [], study, raw)
    notes = _check_satisfiable(space, src)
    enqueue = [
        _enqueue_entry(space, e, f"{src}: enqueue[{i}]") for i, e in enumerate(raw.get("enqueue", []) or [])
    ]
    make_sampler(space, src)  # build once so bad sampler/pruner arguments fail before anything runs
    make_pruner(space, src)
    notes += _sampler_notes(space, src) + _pruner_notes(space, src)
    return Space(name, path, fixed, params, list(constraints), sampler, pruner, enqueue, study, raw, notes)


def _sampler_notes(space: Space, src: str) -> tuple[str, ...]:
    """What CMA-ES and GP leave to random sampling (Optuna's warning says so per trial, in a worker's
    log that ``run`` keeps quiet): keys they cannot model, so a user does not take it for their search."""
    name = space.sampler["name"]
    if name not in ("cmaes", "gp"):
        return ()
    categorical = optuna.distributions.CategoricalDistribution
    left = sorted(
        p.name
        for p in space.params
        if p.when or (name == "cmaes" and isinstance(p.distribution, categorical))
    )
    if not left:
        return ()
    why = (
        "CMA-ES models only numeric keys that every trial has"
        if name == "cmaes"
        else "GP models only keys that every trial has"
    )
    return (f"{src}: sampler '{name}' draws {', '.join(left)} at random ({why}); tpe models every key",)


def _pruner_notes(space: Space, src: str) -> tuple[str, ...]:
    """A pruner whose first decision comes after the trials' last step never prunes: the search then
    costs what one without a pruner does, without a word (the boss space's pruner copied into a short one)."""
    opts, name = space.pruner, space.pruner["name"]
    longest = space.longest_steps
    key = "n_warmup_steps" if name in ("median", "patient") else "min_resource"
    first = opts.get(key)
    if not isinstance(first, int) or isinstance(first, bool) or first < longest:
        return ()
    return (
        f"{src}: pruner '{name}': {key} {first} is not below the trials' {longest} steps, so no trial is "
        "ever pruned; lower it (run --steps scales it with the steps)",
    )


def _yaml11_number(value: Any) -> Any:
    """``1e-4`` as the number it spells: PyYAML (YAML 1.1) reads it as text, and ``low: 1e-4`` was refused
    as "must be a number". Read here rather than by the YAML loader, so that a space's recorded body
    (what a study checks it against) and a categorical's recorded choices stay as they were."""
    return float(value) if isinstance(value, str) and EXPONENT.fullmatch(value.strip()) else value


def _typed_value(key: str, value: Any) -> Any:
    """``value`` as a config gets it for ``key`` ('1e-3' is 0.001 for lr); as it is where it is not one."""
    try:
        return Config.from_dict({key: value}, cross=False).to_dict()[key]
    except UserError:
        return value


def _same_choice(a: Any, b: Any) -> bool:
    """One choice: equal and of one type (True is not 1, '1e-3' is not 0.001)."""
    return type(a) is type(b) and a == b


def _same(a: Any, b: Any) -> bool:
    """Equal as :meth:`Param.active` tests it, and as the message shows it: "2" is not 2."""
    return bool(a == b) and isinstance(a, str) == isinstance(b, str)


def _listed(values: list[Any], quote: bool = True) -> str:
    """Values as the user would write them; ``quote``: text in quotes, to stand out from numbers."""
    return ", ".join(
        shown(v) if quote and isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)
        for v in values
    )


def _on_range(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    # "5" is never layers 5 (a bool is: True is 1, as active() sees it)
    return isinstance(value, (int, float)) and _in_distribution(dist, value)


def _in_distribution(dist: optuna.distributions.BaseDistribution, value: Any) -> bool:
    try:  # a categorical's to_internal_repr raises for a value that is not one of its choices
        return bool(dist._contains(dist.to_internal_repr(value)))
    except (ValueError, TypeError):
        return False


def _range_text(dist: optuna.distributions.BaseDistribution) -> str:
    low, high, step = getattr(dist, "low", "?"), getattr(dist, "high", "?"), getattr(dist, "step", None)
    return f"{low}..{high}" + (f" in steps of {step}" if step not in (None, 1) else "")


def _param(key: str, spec: dict[str, Any], where: str) -> Param:
    for k in spec:
        if k not in PARAM_KEYS:
            raise UserError(f"{where}: unknown field '{k}' (known: {', '.join(sorted(PARAM_KEYS))})")
    when_raw = spec.get("when", {}) or {}
    if not isinstance(when_raw, dict):
        raise UserError(f"{where}.when: must be a mapping like {{head: [amsoftmax, aamsoftmax]}}")
    when = {k: (v if isinstance(v, list) else [v]) for k, v in when_raw.items()}
    kind = spec.get("type") or ("categorical" if "choices" in spec else None)
    if "choices" in spec:
        choices = spec["choices"]
        if kind != "categorical" or {"low", "high", "step", "log"} & set(spec):
            raise UserError(f"{where}: 'choices' cannot be combined with type/low/high/step/log")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"{where}.choices: must be a non-empty list")
        values: list[Any] = []  # as configs get them: '1e-3' (YAML 1.1's text) is 0.001
        for choice in choices:
            try:
                value = Config.from_dict({key: choice}, source=where, cross=False).to_dict()[key]
            except UserError as exc:
                raise UserError(f"{where}.choices: {shown(choice)} is not valid ({_tail(exc)})") from None
            if any(type(value) is type(v) and value == v for v in values):
                raise UserError(
                    f"{where}.choices: {shown(choice)} is listed twice (it would be drawn twice as often)"
                )
            values.append(value)
        return Param(key, optuna.distributions.CategoricalDistribution(choices), when, tuple(values))
    if kind == "categorical":
        raise UserError(f"{where}: type categorical needs 'choices: [...]' (low/high are for int and float)")
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where}: needs 'low' and 'high' (or 'choices' for a categorical)")
    low, high, step = (_yaml11_number(spec.get(k)) for k in ("low", "high", "step"))
    log = spec.get("log", False)
    for label, value in (("low", low), ("high", high), ("step", step)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise UserError(f"{where}.{label}: must be a number, got {shown(value)}")
        if value is not None and not math.isfinite(value):
            raise UserError(f"{where}.{label}: must be a finite number, got {shown(value)}")
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: must be true or false")
    field_type = ALL_FIELDS[key]
    if kind is None:
        kind = "int" if field_type is int else "float"
    if kind not in ("int", "float"):
        raise UserError(f"{where}.type: must be int, float or categorical, got {shown(kind)}")
    if field_type is int and kind == "float":
        raise UserError(f"{where}.type: '{key}' is an integer key; use type int")
    if field_type is float and kind == "int":
        raise UserError(f"{where}.type: '{key}' is a float key; use type float")
    if field_type not in (int, float):
        raise UserError(f"{where}: '{key}' is a {field_type.__name__}; use choices: [...]")
    if low > high:
        raise UserError(f"{where}: low ({low}) > high ({high})")
    if log and (low <= 0 or step is not None):
        raise UserError(f"{where}: log scale needs low > 0 and no step")
    if step is not None and step <= 0:
        raise UserError(f"{where}.step: must be positive")
    if step is not None:
        # Optuna would narrow the range to a multiple of step with a UserWarning (twice) and go on; the
        # test is Optuna's own, in decimal arithmetic on the numbers as written (0.3 - 0.0 is 3 x 0.1).
        span, grain = Decimal(str(high)) - Decimal(str(low)), Decimal(str(step))
        try:
            left = span % grain
        except ArithmeticError:  # decimal's DivisionImpossible: more grid points than it can count
            raise UserError(f"{where}.step: {shown(step)} is too fine for the range {low}..{high}") from None
        if left != 0:
            top = Decimal(str(low)) + (span // grain) * grain
            raise UserError(
                f"{where}: step {shown(step)} does not divide high - low ({shown(high)} - {shown(low)}); "
                f"make high {top.normalize():f} or change step"
            )
    try:
        if kind == "int":
            if any(isinstance(v, float) and not v.is_integer() for v in (low, high, step) if v is not None):
                raise UserError(f"{where}: an int range needs whole numbers for low/high/step")
            dist: optuna.distributions.BaseDistribution = optuna.distributions.IntDistribution(
                int(low), int(high), log=log, step=int(step or 1)
            )
        else:
            dist = optuna.distributions.FloatDistribution(float(low), float(high), log=log, step=step)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None
    for value in (low, high):
        try:
            Config.from_dict({key: value}, source=where, cross=False)
        except UserError as exc:
            raise UserError(f"{where}: bound {shown(value)} is not valid ({_tail(exc)})") from None
    return Param(key, dist, when)


def _condition_order(params: list[Param], src: str) -> list[Param]:
    """Order params so each condition's keys are sampled before the params that depend on them."""
    searched = {p.name for p in params}
    ordered: list[Param] = []
    done: set[str] = set()
    pending = list(params)
    while pending:
        ready = [p for p in pending if all(k in done or k not in searched for k in p.when)]
        if not ready:
            raise UserError(f"{src}: params.{pending[0].name}.when: conditions form a cycle")
        ordered += ready
        done |= {p.name for p in ready}
        pending = [p for p in pending if p.name not in done]
    return ordered


def _tail(exc: UserError) -> str:
    return str(exc).split(": key ", 1)[-1]


def _settings(value: Any, names: tuple[str, ...], where: str) -> dict[str, Any]:
    if isinstance(value, str):
        value = {"name": value}
    if not isinstance(value, dict) or value.get("name") not in names:
        raise UserError(f"{where}: 'name' must be one of {', '.join(names)}")
    return dict(value)


_ALLOWED_NODES = (
    ast.Expression,
    ast.BoolOp,
    ast.And,
    ast.Or,
    ast.UnaryOp,
    ast.Not,
    ast.USub,
    ast.BinOp,
    ast.Add,
    ast.Sub,
    ast.Mult,
    ast.Div,
    ast.FloorDiv,
    ast.Mod,
    ast.Compare,
    ast.Eq,
    ast.NotEq,
    ast.Lt,
    ast.LtE,
    ast.Gt,
    ast.GtE,
    ast.Name,
    ast.Load,
    ast.Constant,
)


MAX_INT = 2**63  # a larger whole number overflowed true division (a traceback); floats give inf instead


MAX_CONSTRAINT_NODES = 500  # names, numbers and operations of one constraint


def _check_constraint_syntax(expr: str, where: str) -> ast.Expression:
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: a NUL; the rest: depth
        raise UserError(f"{where}: not a valid expression") from None
    size = sum(isinstance(node, ast.expr) for node in ast.walk(tree))
    if size > MAX_CONSTRAINT_NODES:  # ~1,000 terms parsed but overflowed the compiler (a RecursionError)
        raise UserError(
            f"{where}: too long ({size} parts, at most {MAX_CONSTRAINT_NODES}); split it into several"
        )
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not isinstance(node, _ALLOWED_NODES):
            raise UserError(f"{where}: only arithmetic, comparisons and and/or/not are allowed")
        if isinstance(node, ast.Name) and node.id not in ALL_FIELDS:
            raise UserError(f"{where}: unknown key '{node.id}'")
        if isinstance(node, ast.Constant):
            _check_constant(node, parent.get(node), where)
        # Text is compared, never computed with: 'encoder * 10**12' allocated terabytes inside eval (a
        # MemoryError traceback). True/false keys count as 0 and 1, as in Python: harmless.
        operands = [node.left, node.right] if isinstance(node, ast.BinOp) else []
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            operands = [node.operand]
        for operand in operands:
            if text := _text_key(operand):
                raise UserError(
                    f"{where}: '{text}' is a text key: compare it (== or !=), do not compute with it"
                )
    return tree


def _text_key(node: ast.AST) -> str:
    """The text key an operand can evaluate to ('' if none): ``encoder``, ``(encoder or layers)``..."""
    if isinstance(node, ast.Name):
        return node.id if ALL_FIELDS[node.id] is str else ""
    if isinstance(node, ast.BoolOp):  # 'a or b' is a or b itself
        return next((t for t in map(_text_key, node.values) if t), "")
    return ""


def _check_constant(node: ast.Constant, parent: ast.AST | None, where: str) -> None:
    value = node.value
    if isinstance(value, str):
        if not isinstance(parent, ast.Compare):
            raise UserError(
                f"{where}: {shown(value)} may only be compared with a key (encoder == 'conformer')"
            )
    elif isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if abs(value) > MAX_INT:
            raise UserError(f"{where}: the whole number {shown(value, 40)} is out of range (at most 2**63)")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"{where}: the number {shown(value, 40)} is not finite")
    else:
        raise UserError(f"{where}: only numbers and quoted text may be written, not {shown(value, 40)}")


def _eval_constraint(expr: str, values: dict[str, Any], src: str = "") -> bool:
    """Whether ``expr`` holds for ``values``; a division by zero means it does not."""
    tree = _check_constraint_syntax(expr, "constraint")
    code = compile(tree, "<constraint>", "eval")
    try:
        return bool(eval(code, {"__builtins__": {}}, dict(values)))  # noqa: S307 - AST checked above
    except ZeroDivisionError:
        return False
    except (TypeError, ArithmeticError, ValueError, MemoryError) as exc:  # 'encoder > 3': it never held
        where = f"{src}: " if src else ""
        raise UserError(f"{where}constraints '{expr}': cannot be evaluated ({first_line(exc)})") from None


def _random_values(space: Space, rng: random.Random, forced: tuple[str, Any] | None = None) -> dict[str, Any]:
    """A random point of the space (``forced``: one key's value wherever that key is searched)."""
    values: dict[str, Any] = dict(space.fixed)
    for p in space.params:
        if not p.active(values):
            continue
        d = p.distribution
        if forced is not None and p.name == forced[0]:
            values[p.name] = p.typed(forced[1])
        elif isinstance(d, optuna.distributions.CategoricalDistribution):
            values[p.name] = p.typed(rng.choice(list(d.choices)))
        elif isinstance(d, optuna.distributions.IntDistribution):
            values[p.name] = rng.randrange(d.low, d.high + 1, d.step)
        else:
            assert isinstance(d, optuna.distributions.FloatDistribution)
            if d.step is not None:  # on the grid, as Optuna draws it (a constraint may name grid values)
                k = rng.randrange(round((d.high - d.low) / d.step) + 1)
                values[p.name] = min(max(d.low + d.step * k, d.low), d.high)  # 3 x 0.1 is 0.30000000000000004
            else:
                values[p.name] = rng.uniform(d.low, d.high)
    return values


def _invalid_reason(space: Space, values: dict[str, Any], src: str) -> str:
    """Why a point of the space cannot be trained ('' when it can)."""
    failing = [c for c in space.constraints if not _eval_constraint(c, {**_config_defaults(), **values}, src)]
    if failing:
        return f"constraint '{failing[0]}' does not hold"
    try:
        Config.from_dict(values, source=src)
    except UserError as exc:
        return str(exc).removeprefix(f"{src}: ")  # the file is named once
    return ""


def _check_satisfiable(space: Space, src: str, draws: int = 3000, per_choice: int = 1000) -> tuple[str, ...]:
    """Draw random points: a space whose constraints or checks never pass is refused before it runs.

    A choice that gave no valid config in ``per_choice`` draws where it was searched (``heads: {choices:
    [2, 3]}`` with ``d_model: 32``) comes back as a note, not a refusal: random draws cannot tell a
    choice that is never valid from one that rarely is (heads 256 fits d_model 256, 512, ... only), and
    a space that loaded before must still load. Its trials would fail, counting against --max-failures.
    """
    rng = random.Random(0)
    first_error = ""
    for _ in range(draws):
        reason = _invalid_reason(space, _random_values(space, rng), src)
        if not reason:
            break
        first_error = first_error or reason
    else:
        raise UserError(f"{src}: no valid configuration can be sampled: {_never(first_error, draws)}")
    notes = []
    for p in space.params:
        if not isinstance(p.distribution, optuna.distributions.CategoricalDistribution):
            continue
        for choice in p.distribution.choices:
            reason, searched = "", 0
            for _ in range(per_choice):
                values = _random_values(space, rng, forced=(p.name, choice))
                if values.get(p.name) is not p.typed(choice):
                    continue  # the key was not searched in this draw (its condition did not hold)
                searched += 1
                reason = _invalid_reason(space, values, src)
                if not reason:
                    break
            if searched and reason:
                notes.append(
                    f"{src}: params.{p.name}: the choice {shown(choice)} gave no valid configuration in "
                    f"{searched} random draws ({_never(reason, searched)}); if it can never be valid, drop "
                    "it: its trials fail and count against --max-failures"
                )
    return tuple(notes)


def _never(reason: str, draws: int) -> str:
    return reason.replace("does not hold", f"never held in {draws} random draws")


def _enqueue_entry(space: Space, entry: Any, where: str) -> dict[str, Any]:
    """Resolve ``{baseline: NAME}`` or explicit values to the params Optuna should try first."""
    if not isinstance(entry, dict):
        raise UserError(f"{where}: must be a mapping of params or {{baseline: NAME}}")
    values: dict[str, Any] = {}
    if "baseline" in entry:
        base = SPACES_DIR / "baselines" / f"{entry['baseline']}.yaml"
        if not base.is_file():
            raise UserError(f"{where}: unknown baseline '{entry['baseline']}' (see spaces/baselines/)")
        values.update(Config.from_dict(read_yaml(base), source=str(base)).to_dict())
    values.update({k: v for k, v in entry.items() if k != "baseline"})
    params: dict[str, Any] = {}
    resolved: dict[str, Any] = dict(space.fixed)
    for p in space.params:
        if not p.active(resolved):
            continue
        if p.name not in values:
            raise UserError(f"{where}: gives no value for searched key '{p.name}'")
        value = _typed_value(p.name, values[p.name])
        if p.values:  # Optuna is given the choice as the space writes it, constraints its value
            pairs = zip(p.written, p.values, strict=True)  # (a value given as written is typed as it is)
            written = next((c for c, v in pairs if _same_choice(v, value)), None)
            inside, choice = written is not None, written
        else:
            inside, choice = _in_distribution(p.distribution, value), value
        if not inside:
            raise UserError(
                f"{where}: {p.name}={shown(values[p.name])} lies outside the space's range for it"
            )
        params[p.name] = choice
        resolved[p.name] = value
    unknown = set(entry) - {"baseline"} - space.searched
    if unknown:
        raise UserError(f"{where}: key(s) {', '.join(sorted(unknown))} are not searched by this space")
    for p in space.params:  # searched, but not for these values: the trial would run without it
        if p.name in entry and p.name not in params:
            held = ", ".join(f"{k}: {_listed(v, quote=False)}" for k, v in p.when.items())
            raise UserError(
                f"{where}: {p.name} is given, but this entry does not search it (its condition {held} does "
                f"not hold); drop {p.name}, or give the values its condition needs"
            )
    for expr in space.constraints:
        if not _eval_constraint(expr, {**_config_defaults(), **resolved}, where):
            raise UserError(f"{where}: breaks constraint '{expr}'")
    space.config_for(params)
    return params


def make_sampler(space: Space, src: str = "space", seed: int | None = None) -> optuna.samplers.BaseSampler:
    """The sampler the space names (see :func:`search.samplers.build_sampler`); ``seed``: run --seed."""
    return build_sampler(space.sampler, src, seed)


def make_pruner(space: Space, src: str = "space", steps: int | None = None) -> optuna.pruners.BasePruner:
    """The pruner the space names (see :func:`search.samplers.build_pruner`).

    ``steps`` (``run --steps``): its options counted in steps scale with the trials' budget, as the
    trials' warm-ups do. Why: the shipped spaces' median pruner waits 10,000 steps, so under
    ``--steps 5000`` it never pruned a trial, and their cost was that of a search without a pruner.
    """
    scale = None
    if steps is not None and "steps" not in space.searched:
        scale = steps / space.config_for({}).train.steps
    return build_pruner(space.pruner, src, scale)
