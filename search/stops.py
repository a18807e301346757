"""Stops (Ctrl-C, SIGTERM) held back across a step that must not be cut in half."""

from __future__ import annotations

import _thread
import contextlib
import importlib.abc
import importlib.machinery
import os
import signal
import sys
import threading
import types
from collections.abc import Callable, Iterator, Sequence


@contextlib.contextmanager
def stops_deferred() -> Iterator[None]:
    """Ctrl-C or SIGTERM that comes inside is delivered as it ends, not where it lands.

    Why: ``Process.start()`` waits for the fork server to send the new worker's pid (seconds while the
    server is still importing torch); a stop there interrupted it after the worker had been forked, so
    the driver neither knew nor stopped that worker and ended in an AssertionError traceback. Starting
    a spawned process, cut between its launch and the data the parent writes to it, made the child
    print an EOFError traceback (prepare's pool; blocking SIGINT in the main thread alone does not
    stop it landing there: any other thread, torch's included, can take the signal for Python). Only
    the main thread can set signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, frame: came.append(signum)) for sig in stops}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        for signum in dict.fromkeys(came):
            signal.raise_signal(signum)  # handled as if it came now: KeyboardInterrupt, or whatever was set


@contextlib.contextmanager
def lost_stops_redelivered(signum: Callable[[], int]) -> Iterator[None]:
    """A Ctrl-C or SIGTERM that Python drops is delivered again, a moment later.

    Why: the KeyboardInterrupt of a stop that lands inside a weakref or garbage-collection callback
    (SQLAlchemy registers such callbacks) cannot leave it: Python prints "Exception ignored in ..."
    with a traceback and goes on, and the command ran to its end as if no stop had come (one
    ``export-top`` in 14, stopped at a busy moment, in an audit). Here the drop is silent, and the
    signal ``signum()`` names is raised again from another thread after 50 ms, by when the main thread
    has left the callback (raised at once, it would land in this hook, where it is dropped too).
    """
    pid, previous = os.getpid(), sys.unraisablehook

    def hook(unraisable: sys.UnraisableHookArgs) -> None:
        mine = os.getpid() == pid and threading.current_thread() is threading.main_thread()
        if not (mine and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            previous(unraisable)
            return
        again = threading.Timer(0.05, _thread.interrupt_main, (signum(),))
        again.daemon = True
        again.start()

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


class _ImportsWithStopsDeferred(importlib.abc.MetaPathFinder):
    """Finds top-level modules as the other finders do, and runs their code (with every import it
    makes) inside :func:`stops_deferred`."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if "." in fullname:
            return None  # a submodule loads inside its top-level module's import, deferred already
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if finder is not self and find is not None else None
            if spec is None:
                continue
            loader = spec.loader
            # A built-in or frozen module's loader is a class shared by all of them: left as it is.
            if loader is not None and not isinstance(loader, type) and hasattr(loader, "exec_module"):
                loader.exec_module = _deferring(loader.exec_module)  # this spec's loader only
            return spec
        return None


def _deferring(exec_module: Callable[[types.ModuleType], None]) -> Callable[[types.ModuleType], None]:
    def deferred(module: types.ModuleType) -> None:
        with stops_deferred():
            exec_module(module)

    return deferred


@contextlib.contextmanager
def imports_with_stops_deferred() -> Iterator[None]:
    """A Ctrl-C or SIGTERM while a top-level module is first imported is delivered when its import has
    finished.

    Why: a KeyboardInterrupt inside an import that runs C code could not always unwind: ``export-top``
    stopped in its first second died of ``terminate called after throwing an instance of
    'pybind11::error_already_set'`` (torch's, SIGABRT) once in 16 stops, after printing "interrupted";
    inside numpy's it became a "bad install" ImportError, inside ssl's (asyncio's) a TypeError, each
    with a traceback. An import takes a few seconds at most, so the stop waits that long.
    """
    finder = _ImportsWithStopsDeferred()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(finder)
