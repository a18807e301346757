"""The search service: an Optuna study on SQL storage driven by worker processes, one per (GPU, slot).

Each worker loops: fail stale trials (a SIGKILLed worker's trial is retried through Optuna's
heartbeat callback), check the study-wide budget, run one trial through :func:`search.train.train`.
A trial's folder is keyed by its *original* number, so a retried trial resumes from the ``last.pt``
its killed predecessor wrote. The best checkpoint goes to the study's artifact store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing as mp
import os
import signal
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.storages import RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import FrozenTrial, TrialState

from search.errors import UserError

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
DEFAULT_HEARTBEAT = 20


class SkipTrial(Exception):
    """The study reached its budget between the budget check and this trial's start (a rare race)."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, as plain values (it is pickled into a spawned process)."""

    worker: str
    index: int
    device: str
    storage_url: str
    study_name: str
    space_path: str
    cache_dir: str
    data_root: str
    trials: int
    steps: int | None
    seed: int
    heartbeat: int
    grace: int
    status_dir: str
    threads: int
    max_failures: int
    poll: float = 1.0


# --------------------------------------------------------------------------------------------------
# Counting and study metadata
# --------------------------------------------------------------------------------------------------


@dataclass
class Counts:
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    running: int = 0
    waiting: int = 0
    skipped: int = 0

    @property
    def finished(self) -> int:
        return self.complete + self.pruned

    @property
    def holding(self) -> int:
        """Trials that will end finished unless they fail: the budget they already claim."""
        return self.finished + self.running + self.waiting


def is_skipped(t: FrozenTrial) -> bool:
    return bool(t.user_attrs.get("skipped"))


def count_trials(trials: list[FrozenTrial]) -> Counts:
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
            else:
                c.failed += 1
    return c


def record_identity(study: optuna.Study, attrs: dict[str, Any], allow_changed: bool) -> None:
    """First run records the data set, split and space; later runs must match (or say --allow-changed)."""
    current = study.user_attrs
    if not current.get("fingerprint"):
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return
    labels = {"fingerprint": "data set", "split_id": "train/valid split", "space_digest": "search space"}
    for key, label in labels.items():
        if current.get(key) != attrs.get(key) and not allow_changed:
            raise UserError(
                f"study '{study.study_name}' was created with another {label} ({key} {current.get(key)}, "
                f"now {attrs.get(key)}); use a new --study name, or --allow-changed to continue anyway"
            )
    for key in ("space_digest", "space_path", "data_root"):
        if current.get(key) != attrs.get(key):
            study.set_user_attr(key, attrs[key])


# --------------------------------------------------------------------------------------------------
# The worker
# --------------------------------------------------------------------------------------------------


class _StopRequested(KeyboardInterrupt):
    """Raised in a worker by SIGTERM (sent by the parent on Ctrl-C)."""


def _install_worker_signals() -> None:
    def on_term(signum: int, frame: Any) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean stop; ignore repeats during clean-up
        raise _StopRequested()

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is handled by the parent
    signal.signal(signal.SIGTERM, on_term)


def _write_status(spec: WorkerSpec, state: dict[str, Any]) -> None:
    path = Path(spec.status_dir) / f"{spec.worker}.json"
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text(
            json.dumps(
                {
                    "worker": spec.worker,
                    "device": spec.device,
                    "pid": os.getpid(),
                    "updated": time.time(),
                    **state,
                }
            )
        )
        os.replace(tmp, path)
    except OSError:
        pass  # the display is best effort; training must not fail for it


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def worker_main(spec: WorkerSpec) -> int:
    """Run trials until the study holds ``spec.trials`` finished ones (or the stop signal arrives)."""
    _install_worker_signals()
    import torch

    from search.data import make_split, open_cache
    from search.space import load_space, make_pruner, make_sampler
    from search.storage import artifact_store, open_storage

    torch.set_num_threads(max(1, spec.threads))
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are shown by the display, not logged
    space = load_space(spec.space_path)
    storage = open_storage(spec.storage_url, spec.heartbeat, spec.grace)
    existing = len(storage.get_all_trials(storage.get_study_id_from_name(spec.study_name), deepcopy=False))
    sampler = make_sampler(space, seed_offset=spec.seed + 1000 * spec.index + existing)
    study = optuna.load_study(
        study_name=spec.study_name, storage=storage, sampler=sampler, pruner=make_pruner(space)
    )
    data = open_cache(Path(spec.cache_dir), Path(spec.data_root))
    ratio = float(study.user_attrs["valid_ratio"])
    split_seed = int(study.user_attrs["split_seed"])
    split = make_split(data, ratio, split_seed)
    store = artifact_store(study)
    trials_dir = Path(study.user_attrs["trials_dir"])
    parent = os.getppid()
    current: dict[str, Any] = {}

    def objective(trial: optuna.Trial) -> float:
        try:
            return run_trial(trial)
        except (optuna.TrialPruned, SkipTrial, KeyboardInterrupt):
            raise
        except Exception as exc:
            if not trial.user_attrs.get("fail_reason"):
                trial.set_user_attr("fail_reason", f"{exc.__class__.__name__}: {exc}"[:500])
            raise

    def run_trial(trial: optuna.Trial) -> float:
        from search.train import train

        current["trial"] = trial
        system = study._storage.get_trial_system_attrs(trial._trial_id)
        root = int(system.get("failed_trial", trial.number))  # a retry keeps its original's folder
        for key in ("fail_reason", "skipped"):
            if key in trial.user_attrs:
                trial.set_user_attr(key, None)
        if root == trial.number:
            earlier = [t for t in study.get_trials(deepcopy=False) if t.number < trial.number]
            if count_trials(earlier).holding >= spec.trials:
                trial.set_user_attr("skipped", True)
                raise SkipTrial(f"study already holds {spec.trials} trials")
        try:
            config = space.sample(trial)
            overrides: dict[str, Any] = {
                "seed": config.train.seed + root,
                "split_seed": split_seed,
                "valid_ratio": ratio,
            }
            if spec.steps is not None:
                overrides["steps"] = spec.steps
                overrides["valid_steps"] = min(config.train.valid_steps, spec.steps)
            config = config.replace(**overrides)
            config = config.replace(checkpoint_steps=config.train.valid_steps)
        except UserError as exc:
            trial.set_user_attr("fail_reason", f"bad config: {exc}")
            raise
        trial.set_user_attr("config", config.to_dict())
        trial.set_user_attr("device", spec.device)
        trial.set_user_attr("worker", spec.worker)
        out_dir = trials_dir / f"{root:05d}"
        pruned = False
        started = time.time()

        def report(step: int, metrics: dict[str, float]) -> str | None:
            nonlocal pruned
            if os.getppid() != parent:
                raise _StopRequested()  # the parent died: stop as if told to
            state = {"trial": trial.number, "step": step, "total": config.train.steps, **metrics}
            _write_status(spec, state)
            if "valid_acc" in metrics:
                trial.report(metrics["valid_acc"], step)
                if trial.should_prune():
                    pruned = True
                    return "stop"
            return None

        _write_status(spec, {"trial": trial.number, "step": 0, "total": config.train.steps})
        try:
            result = train(config, data, spec.device, report=report, out_dir=out_dir, split=split)
        except _StopRequested:
            trial.set_user_attr(
                "fail_reason", "interrupted (Ctrl-C or SIGTERM); retried when the study resumes"
            )
            trial.set_user_attr("interrupted", True)
            raise
        except torch.OutOfMemoryError:
            trial.set_user_attr("fail_reason", f"CUDA out of memory on {spec.device}")
            raise
        trial.set_user_attr("valid_acc", result.best_accuracy)
        trial.set_user_attr("best_step", result.best_step)
        trial.set_user_attr("parameters", result.parameters)
        trial.set_user_attr("steps_per_s", round(result.steps_per_s, 3))
        trial.set_user_attr("resumed_from_step", result.resumed_from)
        trial.set_user_attr("wall_s", round(time.time() - started, 1))
        if result.checkpoint is not None:
            try:
                digest = sha256_file(result.checkpoint)
                artifact_id = upload_artifact(
                    artifact_store=store, file_path=str(result.checkpoint), study_or_trial=trial
                )
            except OSError as exc:
                trial.set_user_attr("fail_reason", f"checkpoint could not be stored: {exc}")
                raise
            trial.set_user_attr("checkpoint_artifact", artifact_id)
            trial.set_user_attr("checkpoint_sha256", digest)
            result.checkpoint.unlink()
            with contextlib.suppress(OSError):
                out_dir.rmdir()  # nothing left once the artifact store holds the checkpoint
        if pruned:
            raise optuna.TrialPruned(f"pruned at step {result.last_step}")
        return result.best_accuracy

    try:
        while True:
            fail_stale_trials(study)
            counts = count_trials(study.get_trials(deepcopy=False))
            if counts.finished >= spec.trials:
                break
            if counts.failed >= spec.max_failures:
                _write_status(spec, {"stopped": f"{counts.failed} failed trials (max {spec.max_failures})"})
                break
            if counts.holding >= spec.trials and counts.waiting == 0:
                _write_status(spec, {"idle": True})
                time.sleep(spec.poll)  # others are running the last trials; stay to retry stale ones
                continue
            current.clear()
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
    except KeyboardInterrupt:
        trial = current.get("trial")
        if trial is not None:
            frozen = study._storage.get_trial(trial._trial_id)
            if frozen.state == TrialState.FAIL:
                RetryHeartbeatStaleTrialCallback()(study, frozen)  # resume it from last.pt next time
        return 130
    finally:
        _write_status(spec, {"done": True})
    return 0


def _worker_entry(spec: WorkerSpec) -> None:
    try:
        code = worker_main(spec)
    except UserError as exc:
        _write_status(spec, {"error": str(exc)})
        code = 2
    os._exit(code)  # skip interpreter teardown of torch threads in a worker


# --------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------


@dataclass
class RunOptions:
    space: str
    trials: int
    data: Path | None = None
    study: str | None = None
    storage: str | None = None
    gpus: list[int] | None = None
    per_gpu: int = 4
    workers: int = 1
    steps: int | None = None
    seed: int = 0
    allow_changed: bool = False
    heartbeat: int | None = None
    max_failures: int | None = None
    display: bool = True


def plan_devices(opts: RunOptions) -> list[str]:
    """One entry per worker: each GPU ``per_gpu`` times, or ``workers`` CPU slots without GPUs."""
    from search.devices import visible_gpus

    visible = visible_gpus()
    gpus = visible if opts.gpus is None else opts.gpus
    for g in gpus:
        if g not in visible:
            raise UserError(f"--gpus: GPU {g} is not visible here (visible: {visible or 'none'})")
    if gpus:
        return [f"cuda:{g}" for g in gpus for _ in range(opts.per_gpu)]
    return ["cpu"] * opts.workers


def run(
    opts: RunOptions, on_update: Callable[[optuna.Study, Counts, list[dict[str, Any]]], None] | None = None
) -> Counts:
    """Create or resume the study, start the workers, and wait until the budget is met."""
    from search.data import make_split, open_data
    from search.space import load_space
    from search.storage import check_study_name, default_storage_url, open_storage, study_dir

    space = load_space(opts.space)
    name = check_study_name(opts.study or space.name)
    if opts.trials > 100_000:
        raise UserError(f"--trials {opts.trials}: absurdly many; use at most 100000")
    devices = plan_devices(opts)
    if len(devices) > 64:
        raise UserError(f"{len(devices)} workers requested; at most 64 per machine")
    url = opts.storage or default_storage_url(name)
    heartbeat = opts.heartbeat or int(space.study.get("heartbeat_interval", DEFAULT_HEARTBEAT))
    grace = int(space.study.get("grace_period", 3 * heartbeat))
    storage = open_storage(url, heartbeat, grace)
    data = open_data(opts.data, progress=opts.display)
    base = space.config_for({})
    split = make_split(data, base.train.valid_ratio, base.train.split_seed)
    home = study_dir(name)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize", load_if_exists=True)
    fresh = not study.user_attrs.get("fingerprint")
    record_identity(
        study,
        {
            "fingerprint": data.fingerprint,
            "split_id": split.split_id,
            "valid_ratio": split.ratio,
            "split_seed": split.seed,
            "space_digest": space.digest,
            "space_path": str(Path(space.path).resolve()),
            "space_name": space.name,
            "data_root": str(Path(data.root).resolve()),
            "artifact_dir": str((home / "artifacts").resolve()),
            "trials_dir": str((home / "trials").resolve()),
        },
        opts.allow_changed,
    )
    if fresh:
        for params in space.enqueue:
            study.enqueue_trial(params, skip_if_exists=True)
    status_dir = home / "workers" / socket.gethostname()  # one folder per machine sharing the study
    status_dir.mkdir(parents=True, exist_ok=True)
    for old in status_dir.glob("*.json"):
        old.unlink()
    threads = max(1, (os.cpu_count() or 1) // len(devices)) if devices[0] == "cpu" else 2
    specs = [
        WorkerSpec(
            worker=f"w{i}",
            index=i,
            device=dev,
            storage_url=url,
            study_name=name,
            space_path=str(space.path),
            cache_dir=str(data.cache_dir),
            data_root=str(data.root),
            trials=opts.trials,
            steps=opts.steps,
            seed=opts.seed,
            heartbeat=heartbeat,
            grace=grace,
            status_dir=str(status_dir),
            threads=threads,
            max_failures=opts.max_failures or max(opts.trials, 3),
        )
        for i, dev in enumerate(devices)
    ]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker_entry, args=(s,), name=s.worker) for s in specs]
    for p in procs:
        p.start()
    try:
        while any(p.is_alive() for p in procs):
            if on_update is not None:
                trials = study.get_trials(deepcopy=False)
                on_update(study, count_trials(trials), read_status(status_dir))
            time.sleep(1.0)
    except KeyboardInterrupt:
        stop_workers(procs)
        raise
    errors = [s.get("error") for s in read_status(status_dir) if s.get("error")]
    if errors:
        raise UserError(str(errors[0]))
    return count_trials(study.get_trials(deepcopy=False))


def stop_workers(procs: list[Any], timeout: float = 60.0) -> None:
    """SIGTERM every worker (each marks its trial and queues it for resume), then wait; kill stragglers."""
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.time()))
        if p.is_alive():
            p.kill()
            p.join()


def read_status(status_dir: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(status_dir.glob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out


def summary_rows(study: optuna.Study, top: int) -> list[dict[str, Any]]:
    """The best finished trials, best first, as plain dicts (for status tables and tests)."""
    done = [t for t in study.get_trials(deepcopy=False) if t.state in FINISHED]

    def score(t: FrozenTrial) -> float:
        value = t.user_attrs.get("valid_acc")
        return float(value if value is not None else (t.value or 0.0))

    done.sort(key=score, reverse=True)
    rows = []
    for t in done[:top]:
        rows.append(
            {
                "number": t.number,
                "state": t.state.name,
                "valid_acc": t.user_attrs.get("valid_acc", t.value),
                "best_step": t.user_attrs.get("best_step"),
                "parameters": t.user_attrs.get("parameters"),
                "steps_per_s": t.user_attrs.get("steps_per_s"),
                "device": t.user_attrs.get("device"),
                "params": dict(t.params),
            }
        )
    return rows


def spec_dict(spec: WorkerSpec) -> dict[str, Any]:
    return asdict(spec)
