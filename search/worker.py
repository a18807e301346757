"""A worker process: trials one after another, in one or more lanes, until the study's budget is met.

Each worker runs one or more lanes (threads; on a GPU ``--per-gpu`` of them, so trials overlap their
kernels), and each lane loops: fail stale trials (a SIGKILLed worker's trials are retried through
Optuna's heartbeat callback), check the study-wide budget, run one trial through
:func:`search.train.train`. A trial's folder is keyed by its *original* number, so a retried trial
resumes from the ``last.pt`` its killed predecessor wrote. The best checkpoint goes to the study's
artifact store. A worker says what it is doing in a small JSON status file the driver displays.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing as mp
import os
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts import upload_artifact
from optuna.trial import FrozenTrial, TrialState

from search.errors import UserError, first_line
from search.files import disk_full, sha256_file
from search.states import (
    BudgetHeld,
    fail_silent_trials,
    locked_fail_stale_trials,
    open_worker_storage,
    queue_retry,
    state_lock,
)
from search.storage import STORAGE_PATIENCE, StorageWait, trials_dir
from search.trials import count_trials, held_before, retry_is_redundant

if TYPE_CHECKING:
    from search.config import Config
    from search.data import FeatureStore, PackedData, Split
    from search.space import Space
    from search.train import TrainResult


# A worker's exit code when a full disk stopped it (its trials were queued to resume).
DISK_FULL_EXIT = 3


class SkipTrial(Exception):
    """This trial must not run: its study's budget is held (a safety net behind :func:`limit_new_trials`,
    and the only check on storages without a state lock), or it retries a trial already done."""


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker process needs, as plain values (it is pickled into a spawned process)."""

    worker: str
    device: str
    storage_url: str
    study_name: str
    space_path: str
    cache_dir: str
    data_root: str
    trials: int
    steps: int | None
    seed: int | None  # run --seed (None: the space's sampler seed, if any)
    heartbeat: int
    grace: int
    status_dir: str
    threads: int
    max_failures: int
    lanes: int = 1  # trials at once in this process, as threads (see worker_main)
    poll: float = 1.0
    storage_patience: float = STORAGE_PATIENCE


class _StopRequested(KeyboardInterrupt):
    """Raised in a worker by SIGTERM (sent by the parent on Ctrl-C), or by a lane that finds its driver
    gone; ``reason`` says which, for the stopped trial's fail reason."""

    def __init__(self, reason: str = "interrupted (Ctrl-C or SIGTERM)") -> None:
        super().__init__(reason)
        self.reason = reason


DRIVER_GONE = "stopped: the run that started its worker died (killed outright, the OOM killer?)"


# "requested": also remembered, in case the exception itself gets lost on the way. "deferred": a
# trial has trained and its result is being recorded (attributes, checkpoint upload, Optuna's tell):
# a stop then only sets the flag, and the lane stops once the trial is recorded. Raised mid-way, it
# failed a trained trial without a reason and could leave a reference to a checkpoint never written.
_STOP = {"requested": False, "deferred": False}


def _on_term(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean stop; ignore repeats during clean-up
    _STOP["requested"] = True
    if not _STOP["deferred"]:
        raise _StopRequested()


def _install_worker_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C is handled by the parent
    signal.signal(signal.SIGTERM, _on_term)


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


@dataclass
class _Shared:
    """What a worker process sets up once and all its lanes share."""

    space: Space
    storage: Any  # the RDB storage, with the state lock and the new-trial budget installed
    data: PackedData
    split: Split
    features: FeatureStore  # one copy of the features (on the GPU when it fits)
    trials_dir: Path


def worker_main(spec: WorkerSpec) -> int:
    """Run trials until the study holds ``spec.trials`` finished ones (or the stop signal arrives).

    ``spec.lanes`` trials run at once, as threads of this process ("lanes"): on one GPU their kernels
    overlap (separate processes take turns on it instead), and they share one copy of the features.
    """
    _install_worker_signals()
    shared = _set_up(spec)
    if spec.lanes == 1:
        return Lane(shared, spec).run()
    return _run_lanes(spec, lambda lane_spec: Lane(shared, lane_spec).run())


def _set_up(spec: WorkerSpec) -> _Shared:
    """Open the storage (state lock, budget, locked retries installed), the space and the data."""
    import torch

    from search.data import FeatureStore, make_split, open_cache
    from search.space import load_space

    torch.set_num_threads(max(1, spec.threads))
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are shown by the display, not logged
    space = load_space(spec.space_path)
    storage = open_worker_storage(spec.storage_url, spec.heartbeat, spec.grace, spec.trials)
    study = optuna.load_study(study_name=spec.study_name, storage=storage)
    attrs = study.user_attrs
    data = open_cache(Path(spec.cache_dir), Path(spec.data_root))
    split = make_split(data, float(attrs["valid_ratio"]), int(attrs["split_seed"]))
    return _Shared(
        space=space,
        storage=storage,
        data=data,
        split=split,
        features=FeatureStore(data, spec.device),
        trials_dir=trials_dir(study),
    )


class Lane:
    """Trials one after another until the budget is met or a stop is asked for.

    Each round fails stale trials, checks the budget and runs one trial through :func:`search.train.train`
    inside ``study.optimize``. Every storage call waits out an outage (:class:`StorageWait`); a trial
    that a stop or a storage error ends is failed and queued again as one step under the state lock.
    """

    def __init__(self, shared: _Shared, spec: WorkerSpec) -> None:
        from search.space import make_pruner, make_sampler
        from search.storage import artifact_store

        self.shared, self.spec = shared, spec
        # Its own sampler (a seeded one draws each trial's values from that trial's own seed) and study.
        sampler = make_sampler(shared.space, seed=spec.seed)
        self.study = optuna.load_study(
            study_name=spec.study_name,
            storage=shared.storage,
            sampler=sampler,
            pruner=make_pruner(shared.space, steps=spec.steps),  # scaled to a --steps budget
        )
        self.store = artifact_store(self.study)
        self.trial: optuna.Trial | None = None  # the trial in hand this round
        self.out_dir: Path | None = None  # its checkpoint folder, once it has one
        self.requeue = False  # it was cut off by the storage: queue it again once it is FAIL
        self.disk_full = ""  # why, once a full disk cut a trial off: the lane then stops
        # The state lock, held while a trial Optuna is about to FAIL (stopped, or cut off by the
        # storage) waits for its retry to be queued: no budget count elsewhere sees its place free.
        self.held = contextlib.ExitStack()
        self.wait = StorageWait(spec.storage_url, spec.storage_patience, on_wait=self._waiting)
        self.brief = StorageWait(spec.storage_url, min(5.0, spec.storage_patience))  # while stopping

    def _waiting(self, reason: str, waited: float) -> None:
        _write_status(self.spec, {"waiting": f"storage unreachable for {waited:.0f} s ({reason}); retrying"})

    def run(self) -> int:
        """Rounds until the budget is met: 0; a stop: 130 (the trial in hand is queued to resume); a full
        disk: ``DISK_FULL_EXIT`` (3)."""
        from search.storage import is_transient_db_error

        try:
            while True:
                if _STOP["requested"]:
                    raise _StopRequested()
                try:
                    go_on = self._one_round()
                except Exception as exc:
                    self.held.close()  # a requeue left unfinished: its trial goes stale and is retried so
                    if is_transient_db_error(exc):
                        # The result of the trial in hand may not be recorded: it goes stale and is retried.
                        self.wait.pause(exc)
                        continue
                    if disk_full(exc):  # the database's own disk: the trial in hand goes stale, is retried
                        self.disk_full = first_line(exc, 300)
                        return DISK_FULL_EXIT
                    if self._finished_elsewhere():
                        continue  # its retry resumes from the checkpoint; this lane takes the next trial
                    raise
                self.wait.reset()
                if not go_on:
                    break
                if self.disk_full:
                    return DISK_FULL_EXIT
        except KeyboardInterrupt:
            if self.trial is not None:
                # Best effort: a storage that stays down leaves the trial to go stale instead, and a
                # FAIL whose retry is not queued here is queued by the run (states.requeue_stopped).
                with contextlib.suppress(Exception):
                    frozen = self.brief.call(self.study._storage.get_trial, self.trial._trial_id)
                    if frozen.state == TrialState.FAIL:
                        self.brief.call(queue_retry, self.study, frozen, None)  # resume it from last.pt
            return 130
        finally:
            self.held.close()  # the state lock taken when the stop reached the trial (see _objective)
            full = {"disk_full": self.disk_full} if self.disk_full else {}
            _write_status(self.spec, {"done": True, **full})  # the driver names the full disk from it
        return 0

    def _one_round(self) -> bool:
        """Fail stale trials, check the budget, run one trial; False once this lane should stop."""
        spec, study = self.spec, self.study
        locked_fail_stale_trials(study)
        counts = count_trials(study.get_trials(deepcopy=False))
        if counts.finished >= spec.trials:
            return False
        if counts.failed >= spec.max_failures:
            _write_status(spec, {"stopped": f"{counts.failed} failed trials (max {spec.max_failures})"})
            return False
        if counts.holding >= spec.trials and counts.waiting == 0:
            # Others are running the last trials; stay to retry stale ones, and end any trial that
            # never sent a heartbeat (else the study would wait for it forever).
            fail_silent_trials(study, self.shared.storage.engine, older_than=max(30.0, 2.0 * spec.grace))
            _write_status(spec, {"idle": True})
            time.sleep(spec.poll)
            return True
        self.trial, self.requeue = None, False
        # A stop passes through to run's stop handler, which releases ``held`` once it has queued the
        # retry; a storage error, to run's loop, which releases it.
        try:
            study.optimize(self._objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        except BudgetHeld:
            return True  # another worker took the last place meanwhile: the next round sees it
        finally:
            _STOP["deferred"] = False  # recorded: a stop that came meanwhile is acted on next round
        if self.requeue and self.trial is not None:
            self._requeue(self.trial)
        self.held.close()  # the state lock taken for the requeue, if it was
        return True

    def _objective(self, trial: optuna.Trial) -> float:
        from search.storage import is_transient_db_error

        try:
            return self._run_trial(trial)
        except _StopRequested as stop:
            # Wherever the stop came (training, or claiming or configuring the trial: it ended without a
            # reason there). Best effort and brief: a failing write (a busy SQLite file) must not
            # swallow the stop.
            with contextlib.suppress(Exception):
                self.brief.call(
                    trial.set_user_attr,
                    "fail_reason",
                    f"{stop.reason}; retried by the next run of the study (here or on another machine)",
                )
                self.brief.call(trial.set_user_attr, "interrupted", True)
            # Held until the retry is queued (run's stop handler); Optuna writes the FAIL between.
            with contextlib.suppress(Exception):
                self.held.enter_context(state_lock())
            raise
        except (optuna.TrialPruned, SkipTrial, KeyboardInterrupt):
            raise
        except Exception as exc:
            full = disk_full(exc)
            if is_transient_db_error(exc) or full:
                # Cut off by the storage or a full disk, not by its configuration: it resumes later.
                self.requeue = True
                with contextlib.suppress(Exception):  # its FAIL and its retry as one step (_one_round)
                    self.held.enter_context(state_lock())
                if full:
                    # No trial can keep a checkpoint until space is freed: this lane stops, rather than
                    # fail every trial after it (an audit saw a filled disk fail 101 in a row).
                    self.disk_full = first_line(exc, 300)
                    with contextlib.suppress(Exception):
                        trial.set_user_attr(
                            "fail_reason",
                            f"no space left on device ({self.disk_full}); the run stopped: free space and "
                            "run it again, this trial resumes from its last checkpoint",
                        )
            elif self.out_dir is not None and self._still_ours(trial):
                # It fails for good (diverged, out of memory, a bug): nothing resumes a FAIL trial,
                # so its last.pt and best.pt would stay on disk for the life of the study.
                _discard_trial_folder(self.out_dir)
            with contextlib.suppress(Exception):  # best effort: the storage may be what failed
                if not trial.user_attrs.get("fail_reason"):
                    trial.set_user_attr("fail_reason", f"{exc.__class__.__name__}: {exc}"[:500])
            raise

    def _still_ours(self, trial: optuna.Trial) -> bool:
        """True when the trial is still RUNNING in the storage: no one failed it as stale and queued a
        retry meanwhile (which starts from its checkpoints, in a folder of its own)."""
        try:
            return self.brief.call(self.study._storage.get_trial, trial._trial_id).state == TrialState.RUNNING
        except Exception:  # noqa: BLE001 - unsure: keep the folder
            return False

    def _run_trial(self, trial: optuna.Trial) -> float:
        self.trial, self.out_dir = trial, None
        root = self._claim(trial)
        config = self._config(trial, root)
        out_dir = self.out_dir = attempt_folder(self.shared.trials_dir, root, trial.number)
        started = time.time()
        result, pruned = self._train(trial, config, out_dir)
        _STOP["deferred"] = True  # trained: a stop now waits until the result is recorded
        finished = {
            "valid_acc": result.best_accuracy,
            "best_step": result.best_step,
            "parameters": result.parameters,
            # None when it trained no step (a retry of a trial trained to its end): 0.0 skewed rates.
            "steps_per_s": round(result.steps_per_s, 3) if result.last_step > result.resumed_from else None,
            "step_mode": result.step_mode,
            "resumed_from_step": result.resumed_from,
            "wall_s": round(time.time() - started, 1),
            "time_s": result.seconds,  # where train()'s wall time went: set-up, steps, validation...
        }
        for key, value in finished.items():  # the training is done: wait out an outage, do not lose it
            self.wait.call(trial.set_user_attr, key, value)
        if result.checkpoint is not None:
            self._store_checkpoint(trial, result.checkpoint, out_dir)
        # Recorded: nothing resumes it now, so its resume point goes (and its folder, now empty). Removed
        # before the record, a stop in between retried the trial from step 0 (seen once in the
        # SIGTERM-then-Ctrl-C reliability test); kept until then, a storage outage can still resume it.
        _discard_trial_folder(out_dir)
        if pruned:
            raise optuna.TrialPruned(f"pruned at step {result.last_step}")
        return result.best_accuracy

    def _claim(self, trial: optuna.Trial) -> int:
        """The trial's original number (a retry keeps its original's folder); SkipTrial if it must not run."""
        wait, budget = self.wait, self.spec.trials
        system = wait.call(self.study._storage.get_trial_system_attrs, trial._trial_id)
        root = int(system.get("failed_trial", trial.number))
        for key in ("fail_reason", "skipped", "interrupted"):  # a retry inherits its original's attrs
            if key in trial.user_attrs:
                wait.call(trial.set_user_attr, key, None)
        trials = wait.call(self._locked_trials)  # no trial changes state (or gets its retry queued) meanwhile
        if root == trial.number:
            if held_before(trials, trial.number) >= budget:
                trial.set_user_attr("skipped", True)
                raise SkipTrial(f"study already holds {budget} trials")
        elif retry_is_redundant(trials, trial.number, root):
            trial.set_user_attr("skipped", True)
            raise SkipTrial(f"trial {root} already finished or is retried by another trial")
        return root

    def _locked_trials(self) -> list[FrozenTrial]:
        with state_lock():
            return self.study.get_trials(deepcopy=False)

    def _config(self, trial: optuna.Trial, root: int) -> Config:
        """The sampled config with the study's split, the run's ``--steps`` and a seed per original trial."""
        split = self.shared.split  # the study's, whatever the space says
        try:
            config = self.shared.space.sample(trial)
            overrides: dict[str, Any] = {
                "seed": config.train.seed + root,
                "split_seed": split.seed,
                "valid_ratio": split.ratio,
            }
            config = config.replace(**overrides)
            if self.spec.steps is not None:
                config = config.with_steps(self.spec.steps)
            config = config.resumable()  # the space's checkpoint_steps if it sets one
        except UserError as exc:
            trial.set_user_attr("fail_reason", f"bad config: {exc}")
            raise
        settings = {
            "config": config.to_dict(),
            "device": self.spec.device,
            "worker": self.spec.worker,
            "fingerprint": self.shared.data.fingerprint,  # export-top leaves out trials of another set
            "split_id": self.shared.split.split_id,  # or of another split of it
        }
        for name, setting in settings.items():
            self.wait.call(trial.set_user_attr, name, setting)
        return config

    def _train(self, trial: optuna.Trial, config: Config, out_dir: Path) -> tuple[TrainResult, bool]:
        """Train with pruning on each validation; the result, and whether the pruner stopped it."""
        import torch

        from search.train import train

        spec, wait = self.spec, self.wait
        pruned = False

        def report(step: int, metrics: dict[str, float]) -> str | None:
            nonlocal pruned
            if _STOP["requested"]:
                raise _StopRequested()  # a stop whose exception got lost on the way
            if not _driver_alive():
                raise _StopRequested(DRIVER_GONE)  # no one will stop this lane or show its trial
            _write_status(spec, {"trial": trial.number, "step": step, "total": config.train.steps, **metrics})
            if "valid_acc" in metrics:
                # Through a storage outage the trial waits here and trains on once the database is back.
                wait.call(trial.report, metrics["valid_acc"], step)
                # The last validation ends a whole training run: its result is COMPLETE, never pruned.
                if step < config.train.steps and wait.call(trial.should_prune):
                    pruned = True
                    return "stop"
            return None

        _write_status(spec, {"trial": trial.number, "step": 0, "total": config.train.steps})
        try:
            result = train(
                config,
                self.shared.data,
                spec.device,
                report=report,
                out_dir=out_dir,
                split=self.shared.split,
                store=self.shared.features,
                keep_last=True,  # removed once the result is recorded (_run_trial)
            )
        except torch.OutOfMemoryError:
            trial.set_user_attr("fail_reason", f"CUDA out of memory on {spec.device}")
            raise
        return result, pruned

    def _store_checkpoint(self, trial: optuna.Trial, checkpoint: Path, out_dir: Path) -> None:
        """Upload the best checkpoint (and record its sha256) to the artifact store; free the folder."""
        wait = self.wait
        try:
            digest = sha256_file(checkpoint)
            artifact_id = wait.call(
                lambda: upload_artifact(
                    artifact_store=self.store,
                    file_path=str(checkpoint),
                    study_or_trial=trial,
                    mimetype=CHECKPOINT_MIMETYPE,
                )
            )
        except OSError as exc:
            if disk_full(exc):
                raise  # the run stops and the trial resumes, from its last.pt (see _objective)
            # A read-only or vanished folder: this trial fails with the reason, nothing partial is left
            # in the store, and its folder is freed (a FAIL trial is never resumed).
            wait.call(
                trial.set_user_attr,
                "fail_reason",
                f"checkpoint could not be stored in {self.store.root}: {exc.strerror or exc}; "
                "free space or repair the folder, the study goes on",
            )
            _discard_trial_folder(out_dir)  # the checkpoint (best.pt) and the rest
            raise
        wait.call(trial.set_user_attr, "checkpoint_artifact", artifact_id)
        wait.call(trial.set_user_attr, "checkpoint_sha256", digest)
        checkpoint.unlink()  # the store holds it; the folder goes once the result is recorded (_run_trial)

    def _requeue(self, trial: optuna.Trial) -> None:
        """Queue a trial that a storage outage or a full disk cut off to resume from last.pt (not a kill:
        no limit)."""
        frozen = self.wait.call(self.study._storage.get_trial, trial._trial_id)
        if frozen.state == TrialState.FAIL:
            self.wait.call(queue_retry, self.study, frozen, None)

    def _finished_elsewhere(self) -> bool:
        """True when the trial in hand was ended by someone else (failed as stale during an outage)."""
        if self.trial is None:
            return False
        return self.wait.call(self.study._storage.get_trial, self.trial._trial_id).state != TrialState.RUNNING


# A PyTorch checkpoint (a zip archive); guessed from ".pt", the dashboard showed a SNES page table.
CHECKPOINT_MIMETYPE = "application/octet-stream"


def attempt_folder(trials_dir: Path, root: int, number: int) -> Path:
    """The folder trial ``number`` (an attempt at original trial ``root``) trains in, holding the newest
    earlier attempt's ``last.pt`` and ``best.pt`` (hard links) to resume from.

    Why a folder per attempt: an attempt failed as stale while its worker lived on (a machine cut off
    from the database, a paused process) went on writing its checkpoints, into the folder its retry was
    training in: the retry could upload the other's ``best.pt`` under its own accuracy. Each attempt
    now writes only its own folder. A file written anew replaces its link, so the earlier attempt's
    copy is never changed. ``trials/<root>/last.pt`` itself is the layout of earlier versions.
    """
    root_dir = trials_dir / f"{root:05d}"
    out_dir = root_dir / f"{number:05d}"
    if (out_dir / "last.pt").is_file():
        return out_dir
    earlier = sorted(
        (
            p
            for p in root_dir.glob("[0-9]*")
            if p.name.isdigit() and p != out_dir and (p / "last.pt").is_file()
        ),
        key=lambda p: int(p.name),
    )
    source = earlier[-1] if earlier else root_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if (source / "last.pt").is_file():
        for name in ("best.pt", "last.pt"):  # last.pt last: it is what marks an attempt's folder as one
            with contextlib.suppress(FileNotFoundError):
                _link_or_copy(source / name, out_dir / name)
    return out_dir


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source``, else a copy put in place whole (never half a file)."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        tmp = target.with_name(f".{target.name}.copy.tmp")
        shutil.copyfile(source, tmp)  # a fresh mtime: an hour-old temp file is swept as abandoned
        os.replace(tmp, target)


def _discard_trial_folder(out_dir: Path) -> None:
    """Remove the folder of every attempt at a trial finished for good (failed or pruned), with their
    checkpoints and the temp files of attempts killed while writing one (best effort)."""
    shutil.rmtree(out_dir.parent, ignore_errors=True)


def _run_lanes(spec: WorkerSpec, lane: Callable[[WorkerSpec], int]) -> int:
    """Run ``spec.lanes`` lanes as threads; the main thread waits, taking the stop signal for them all.

    A stop (SIGTERM) reaches the main thread only: it sets the flag that each lane checks between
    trials and at every progress report, then waits for the lanes to mark their trials and end. The
    wait polls flags rather than ``Thread.join``, which a signal can cut short for good.
    """
    codes: list[int] = []
    errors: list[BaseException] = []
    ended = [threading.Event() for _ in range(spec.lanes)]

    def run(j: int) -> None:
        try:
            codes.append(lane(replace(spec, worker=f"{spec.worker}.{j}")))
        except BaseException as exc:  # noqa: BLE001 - raised again by the main thread
            errors.append(exc)
        finally:
            ended[j].set()

    def wait_for_lanes() -> None:
        while not all(e.is_set() for e in ended):
            time.sleep(0.2)

    # A stop arriving while the lanes start waits until all have started (then it stops them all), and
    # the lanes keep SIGTERM blocked, so the kernel hands it to the main thread, whose handler runs.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        try:
            for j in range(spec.lanes):
                threading.Thread(target=run, args=(j,), name=f"{spec.worker}.{j}", daemon=True).start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # a pending stop is handled from here on
        wait_for_lanes()
    except KeyboardInterrupt:
        _STOP["requested"] = True
        wait_for_lanes()
        return 130
    if errors:
        raise errors[0]
    return max(codes)


def _driver_alive() -> bool:
    """False once the process that started this one is gone (a lane then stops as if told to).

    Multiprocessing's parent sentinel, a pipe the driver holds open, is read rather than the parent pid:
    a worker forked by the fork server is the server's child, and the server outlives a killed driver
    while any worker runs. True where this is not a worker process (``worker_main`` called directly).
    """
    parent = mp.parent_process()
    return parent is None or parent.is_alive()


def worker_process(spec: WorkerSpec) -> None:
    """A worker's entry point: exit 0 (budget met), 2 (a user error, left in its status file for the
    driver to show), 3 (``DISK_FULL_EXIT``: a full disk cut a trial off) or 130 (stopped)."""
    try:
        code = worker_main(spec)
    except UserError as exc:
        _write_status(spec, {"error": str(exc)})
        code = 2
    except KeyboardInterrupt:  # told to stop while still starting (importing torch, opening the data)
        _write_status(spec, {"done": True})
        code = 130
    os._exit(code)  # skip interpreter teardown of torch threads in a worker


def read_status(status_dir: Path) -> list[dict[str, Any]]:
    """The latest status of every worker (lane) writing to ``status_dir`` or a folder under it (a run's
    own, ``workers/<host>/<pid>``); an unreadable file is skipped."""
    out = []
    for path in sorted(status_dir.rglob("*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue
    return out
