"""Shared pieces of the reliability suite: bounded subprocesses, tiny spaces,
per-test deadlines and the figures (faults injected, inputs tried, trials lost) printed at the end.

Every test here must stop by itself: each carries a ``deadline`` (SIGALRM, default 150 s) on top of the
timeouts of its own waits, and every ``spkid-search`` it starts runs in its own session so the whole
process group (driver and workers) is killed if the test fails half-way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml

from tests.spaces import UNIT_SPACE

DEFAULT_DEADLINE_S = 150

SPACE: dict[str, Any] = {**UNIT_SPACE, "pruner": {"name": "none"}}  # faults are timed: no pruning


def write_space(path: Path, pruner: dict[str, Any] | None = None, **params: Any) -> Path:
    """SPACE with some params replaced (and optionally another pruner), written to ``path``."""
    space = {**SPACE, "params": {**SPACE["params"], **params}}
    if pruner is not None:
        space["pruner"] = pruner
    path.write_text(yaml.safe_dump(space))
    return path


# --------------------------------------------------------------------------------------------------
# Figures: what the suite injected and tried, printed in the terminal summary
# --------------------------------------------------------------------------------------------------


@dataclass
class Figures:
    faults: dict[str, int] = field(default_factory=dict)
    inputs: int = 0
    trials_checked: int = 0
    trials_lost: int = 0

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] = self.faults.get(kind, 0) + n


FIGURES = Figures()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "deadline(seconds): hard wall-clock limit for one test (SIGALRM)")
    config.addinivalue_line("markers", "slow: long fault-injection study (-m 'not slow' skips them)")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not (FIGURES.faults or FIGURES.inputs):
        return
    faults = ", ".join(f"{kind} {n}" for kind, n in sorted(FIGURES.faults.items()))
    terminalreporter.write_sep("-", "reliability figures")
    terminalreporter.write_line(f"faults injected: {sum(FIGURES.faults.values())} ({faults or 'none'})")
    terminalreporter.write_line(f"bad inputs tried: {FIGURES.inputs}")
    terminalreporter.write_line(
        f"trials checked after faults: {FIGURES.trials_checked}; trials lost: {FIGURES.trials_lost}"
    )


@pytest.fixture
def figures() -> Figures:
    return FIGURES


# --------------------------------------------------------------------------------------------------
# Deadlines
# --------------------------------------------------------------------------------------------------


class DeadlineExceeded(Exception):
    pass


@pytest.fixture(autouse=True)
def _deadline(request: pytest.FixtureRequest) -> Iterator[None]:
    marker = request.node.get_closest_marker("deadline")
    seconds = int(marker.args[0]) if marker else DEFAULT_DEADLINE_S

    def expired(signum: int, frame: FrameType | None) -> None:
        raise DeadlineExceeded(f"{request.node.nodeid} ran past its {seconds} s deadline")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------------
# The command line as a user runs it
# --------------------------------------------------------------------------------------------------


class Cli:
    """``python -m search.cli ...`` in its own session, output to a file; ``close()`` kills the group."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.log = cwd / f"cli-{uuid.uuid4().hex[:8]}.log"
        self._fh = open(self.log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "search.cli", *args],
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def output(self) -> str:
        self._fh.flush()
        return self.log.read_text(errors="replace")

    def signal_parent(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)  # as a terminal's Ctrl-C does: the driver and its workers

    def close(self) -> None:
        # Kill the whole group: the driver if it still runs, and any worker that outlived it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._fh.close()


@pytest.fixture
def cli() -> Iterator[Any]:
    """Start CLI processes that are killed (with their workers) when the test ends, pass or fail."""
    started: list[Cli] = []

    def start(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Cli:
        proc = Cli(list(args), cwd or Path.cwd(), env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.close()


def wait_for(predicate: Any, timeout: float, what: str, poll: float = 0.1) -> Any:
    """Poll ``predicate()`` until it returns something truthy; fail the test after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
