"""The driver's worker processes: started from a fork server, watched, restarted when killed, stopped.

A worker killed by a signal (the OOM killer, say) has its running trials failed with that reason and
queued to retry, and is restarted while the budget is not met, a bounded number of times in a row
without a trial ending (:class:`RestartBudget`). Ctrl-C or SIGTERM stops every worker cleanly: each
marks its trial, which resumes from its last checkpoint in a later run.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import wait as wait_for_exit
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from search.files import pid_alive
from search.progress import note
from search.states import requeue_stopped
from search.stops import stops_deferred
from search.storage import db_error_text
from search.trials import Counts, count_trials
from search.worker import DISK_FULL_EXIT, WorkerSpec, read_status, worker_process


def exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    if code == 130:
        return "was stopped (SIGTERM or Ctrl-C sent to it, not to spkid-search run)"
    if code == DISK_FULL_EXIT:
        return "stopped: no space left on device"
    return f"exited with code {code}"


class WorkersStopped(KeyboardInterrupt):
    """A stop (Ctrl-C, SIGTERM) that came while this run's workers ran: their trials were marked and
    queued to resume. A plain KeyboardInterrupt from :func:`run` came while none ran."""


class OutageLog:
    """One line when the driver loses the storage, one when it is back (not one per failed poll)."""

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self.logged = False

    def lost(self, reason: str, waited: float = 0.0) -> None:
        if not self.logged:
            note(f"storage unreachable ({reason}); workers wait and retry for up to {self.patience:.0f} s")
            self.logged = True

    def back(self) -> None:
        if self.logged:
            note("storage reachable again")
            self.logged = False


# What a worker imports before its first trial: the fork server imports it once (search.preload does,
# skipping any that fails, then freezes what they made), and each worker (and each restart of one) is
# forked from it ready to train.
WORKER_MODULES = (
    "torch",
    "torch._dynamo",  # imported by the first optimizer a process makes (2 s on 2 cores)
    "search.worker",
    "search.train",
    "search.model",
    "search.data",
    "search.storage",
)
WORKER_PRELOAD = ["search.preload"]


def worker_context() -> Any:
    """The multiprocessing context that starts workers: "forkserver" on Linux, else "spawn".

    A spawned worker imports torch anew (seconds: most of a worker's start, and of its restart after a
    kill); forked from a server that has imported it, a worker starts at once. The server never touches
    CUDA, so each worker still initialises its own device. macOS keeps "spawn", Python's default there:
    system libraries a torch import loads are not safe to fork.
    """
    if not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    return ctx


def start_worker_server() -> None:
    """Start the fork server (if it is not running) now rather than at the first worker's start, so that
    its imports overlap the driver's own work (checking the devices, opening or packing the data).

    The server starts with SIGINT ignored: a Ctrl-C reaches the whole process group, and the server would
    otherwise die of it mid-import with a traceback on the terminal. The driver handles Ctrl-C; its
    workers install their own handlers.
    """
    if worker_context().get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited through exec while ignored
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def in_environment(env: dict[str, str], target: Callable[..., None], *args: Any) -> None:
    """Call ``target`` in the environment ``env`` (the driver's, as a worker starts).

    A process forked by the fork server has the server's environment, the driver's when the server
    started, which a driver that has changed its own since (a notebook, a test) no longer has.
    Multiprocessing already gives it the driver's working folder and ``sys.path``.
    """
    os.environ.clear()
    os.environ.update(env)
    target(*args)


class RestartBudget:
    """Restarts of killed workers allowed: ``limit`` in a row while no trial ends.

    Why in a row, not per run: a study left for days on one GPU meets an occasional OOM kill between
    hundreds of good trials, and five of them over a week ended the run. A crash loop, where every
    worker dies before any trial ends, is still stopped after ``limit``. A trial ends when it finishes
    or fails for good: a config killed on each of its retries (too big for the host's memory) spent
    four restarts, and the next such config then ended an unattended run.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0  # restarts in all, for the closing line
        self.in_a_row = 0
        self._ended: int | None = None  # ended trials at the last restart

    def allow(self, ended: int | None) -> bool:
        """Whether to restart a worker now; ``ended``: the study's finished trials and those failed for
        good (None: unknown)."""
        if ended is not None and self._ended is not None and ended > self._ended:
            self.in_a_row = 0  # trials ended since the last restart: not a loop
        if ended is not None:
            self._ended = ended
        if self.in_a_row >= self.limit:
            return False
        self.in_a_row += 1
        self.used += 1
        return True


def supervise(
    specs: list[WorkerSpec],
    study: optuna.Study,
    trials: int,
    max_respawns: int | None,
    status_dir: Path,
    outage: OutageLog,
    on_update: Callable[[optuna.Study, Counts, list[dict[str, Any]]], None] | None,
) -> tuple[dict[str, int | None], int]:
    """Start the workers and wait for all to exit, restarting any killed by a signal while the budget
    is not met (at most ``max_respawns`` in a row without a trial finishing); each worker's exit code
    and the restarts used.

    Ctrl-C (or SIGTERM) here stops every worker cleanly (:func:`stop_workers`) and is raised again.
    """
    from search.storage import is_transient_db_error

    restarts = RestartBudget(max_respawns if max_respawns is not None else 5 * len(specs))
    ctx = worker_context()
    procs: dict[str, Any] = {}
    exits: dict[str, int | None] = {}

    def counts_now() -> Counts | None:
        try:
            return count_trials(study.get_trials(deepcopy=False))
        except Exception as exc:
            if is_transient_db_error(exc):
                return None
            raise

    def start(spec: WorkerSpec) -> None:
        start_worker_server()  # again if it has died since
        proc = ctx.Process(
            target=in_environment, args=(dict(os.environ), worker_process, spec), name=spec.worker
        )
        with stops_deferred():  # a worker that starts is one stop_workers knows of
            proc.start()
            procs[spec.worker] = proc

    try:
        for s in specs:
            start(s)
        while len(exits) < len(specs):
            for s in specs:
                proc = procs[s.worker]
                if s.worker in exits or proc.is_alive():
                    continue
                proc.join()
                code = proc.exitcode
                killed = code is not None and code < 0 and -code not in (signal.SIGINT, signal.SIGTERM)
                if killed:
                    fail_killed(study, status_dir, s, code, proc.pid)
                    now = counts_now()
                    short = now is None or now.finished < trials
                    if short and restarts.allow(None if now is None else now.ended):
                        note(
                            f"worker {s.worker} ({s.device}) {exit_text(code)}; restarting it "
                            f"({restarts.in_a_row} of at most {restarts.limit} restarts in a row without a "
                            "trial ending); its trial is retried from its last checkpoint (from step 0 if "
                            "it had none yet; a trial whose attempts were killed 4 times is not: see status)"
                        )
                        start(s)
                        continue
                    if short:
                        note(
                            f"worker {s.worker} {exit_text(code)}; restart limit spent "
                            f"({restarts.limit} in a row without a trial ending)"
                        )
                exits[s.worker] = code
            if on_update is not None and len(exits) < len(specs):
                try:
                    on_update(study, count_trials(study.get_trials(deepcopy=False)), read_status(status_dir))
                    outage.back()
                except Exception as exc:
                    if not is_transient_db_error(exc):
                        raise
                    outage.lost(db_error_text(exc))
            running = [procs[s.worker].sentinel for s in specs if s.worker not in exits]
            if running:  # wakes as soon as a worker exits, else after a second (for the display)
                wait_for_exit(running, 1.0)
    except KeyboardInterrupt:
        stop_workers(list(procs.values()))
        # Each stopped worker queued its trial's retry; one it could not is queued here (or at the next
        # run's start, when the storage does not answer now, or a second Ctrl-C cuts this short).
        with contextlib.suppress(Exception, KeyboardInterrupt):
            requeue_stopped(study, trials)
        raise WorkersStopped() from None
    return exits, restarts.used


def run_status_dir(home: Path) -> Path:
    """This run's folder for its workers' status files: ``workers/<host>/<pid>``, emptied.

    Why one per run: two runs of a study from one folder on one host (``--gpus 0`` and ``--gpus 1``
    in two terminals) shared ``workers/<host>``, each deleting the other's files, and their workers,
    both named w0, wrote the same file. Folders of runs no longer alive on this host are removed.
    """
    host = home / "workers" / socket.gethostname()
    with contextlib.suppress(OSError):
        for other in host.iterdir():
            if other.is_dir() and other.name.isdigit() and not pid_alive(int(other.name)):
                shutil.rmtree(other, ignore_errors=True)
        for old in host.glob("*.json"):  # status files from before runs had folders of their own
            old.unlink()
    folder = host / str(os.getpid())
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.json"):  # this process's earlier run (a library calling run twice)
        old.unlink()
    return folder


def fail_killed(
    study: optuna.Study, status_dir: Path, spec: WorkerSpec, code: int | None, pid: int
) -> list[int]:
    """FAIL a killed worker's running trials with the reason the driver knows, and queue their retries.

    Why here: the stale check ran only at a lane's next round, so with one worker the dead trial stayed
    RUNNING (and counted as running) until the restarted worker had trained a whole other trial, and it
    then failed with "no reason recorded". Its process is gone, so no one else holds the trial. Best
    effort: a storage that does not answer leaves the trials to the stale check. Returns their numbers.
    """
    from search.states import fail_and_retry
    from search.storage import is_transient_db_error

    numbers = {
        st["trial"]
        for st in read_status(status_dir)
        if st.get("worker") in (spec.worker, *(f"{spec.worker}.{j}" for j in range(spec.lanes)))
        and st.get("pid") == pid  # the killed process's own lanes, not a restarted one's
        and isinstance(st.get("trial"), int)
    }
    if not numbers:
        return []
    # The host too: every run's first worker is w0, and on several machines the reason must say whose
    # dmesg to read.
    reason = f"its worker {spec.worker} ({spec.device}) on {socket.gethostname()} {exit_text(code)}"
    if code == -signal.SIGKILL:
        reason += " (if no one sent it, likely the kernel's out-of-memory killer; see dmesg there)"
    try:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return [t.number for t in running if t.number in numbers and fail_and_retry(study, t, reason)]
    except Exception as exc:
        if not is_transient_db_error(exc):
            raise
        return []


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
