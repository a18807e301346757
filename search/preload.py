"""Imported last by the worker fork server (``study.WORKER_PRELOAD``): freezes the objects that the
preloaded modules (torch, the trainer) made.

Why: forked workers' garbage collections then skip them, so they do not copy the server's memory pages
by touching them (Python's advice for servers that fork), and the server's own exit, when the run ends,
does not collect them (1+ s with torch imported, while it still holds the run's stdout and stderr).
"""

import gc

gc.freeze()
