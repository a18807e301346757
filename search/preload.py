"""Imported by the worker fork server (``supervise.WORKER_PRELOAD``): imports ``supervise.WORKER_MODULES``,
what a worker needs before its first trial, then freezes the objects they made.

Why freeze: forked workers' garbage collections then skip them, so they do not copy the server's memory
pages by touching them (Python's advice for servers that fork), and the server's own exit, when the run
ends, does not collect them (1+ s with torch imported, while it still holds the run's stdout and stderr).

A module that fails to import (a broken torch install) is skipped quietly, as multiprocessing's own
preload skips an ImportError: the driver imports the same modules and reports that in one line. The
server's own traceback, and the driver's EOFError when the dead server could not fork a worker, had
buried that line under three tracebacks.
"""

import gc
import importlib

from search.supervise import WORKER_MODULES  # imports no torch: the list below does

for _name in WORKER_MODULES:
    try:
        importlib.import_module(_name)
    except Exception:  # noqa: BLE001 - whatever it is, the driver meets it too and says it in one line
        continue

gc.freeze()
