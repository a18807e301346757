from __future__ import annotations

import importlib.machinery
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from search.stops import _ImportsWithStopsDeferred, imports_with_stops_deferred, stops_deferred

# A module that stops its own import halfway, as a Ctrl-C landing inside torch's import would.
STOPS_ITSELF = """
import signal, sys
steps = sys.modules["tests.test_stops"].STEPS
steps.append("started")
signal.raise_signal(signal.SIGINT)
steps.append("finished")
"""
STEPS: list[str] = []


@pytest.fixture
def modules(tmp_path: Path) -> Iterator[Path]:
    """A folder on sys.path for made-up modules, and a clean record of their steps."""
    STEPS.clear()
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in ("stopsitself", "alsostops"):
        sys.modules.pop(name, None)


def test_a_stop_inside_is_delivered_as_the_block_ends() -> None:
    done = []
    with pytest.raises(KeyboardInterrupt), stops_deferred():
        signal.raise_signal(signal.SIGINT)
        done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_modules_first_import_runs_to_its_end_before_the_stop(modules: Path) -> None:
    """As the CLI runs its commands: a stop inside torch's import aborted the process, inside ssl's
    (asyncio's) it became a TypeError."""
    (modules / "stopsitself.py").write_text(STOPS_ITSELF)
    (modules / "alsostops.py").write_text(STOPS_ITSELF)
    with imports_with_stops_deferred():
        with pytest.raises(KeyboardInterrupt):
            import stopsitself  # noqa: F401
        assert STEPS == ["started", "finished"]
    assert not any(type(f).__name__ == "_ImportsWithStopsDeferred" for f in sys.meta_path)
    STEPS.clear()
    with pytest.raises(KeyboardInterrupt):
        import alsostops  # noqa: F401 - outside it: stopped where the stop landed
    assert STEPS == ["started"]
    spec = _ImportsWithStopsDeferred().find_spec("_imp", None)  # built in: one loader for them all
    assert spec is not None and spec.loader is importlib.machinery.BuiltinImporter
    assert isinstance(vars(importlib.machinery.BuiltinImporter)["exec_module"], staticmethod)  # untouched
