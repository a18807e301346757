"""Stops (Ctrl-C, SIGTERM) held back across a step that must not be cut in half."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


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
