"""The ``spkid-search`` command's first code: a stop while the command line loads ends quietly.

Why: Python imports the command line and what it needs (~25 ms, longer on a busy machine) before any of
its code can catch a stop; a Ctrl-C in that window printed a KeyboardInterrupt traceback from inside
an import. This module imports nothing heavy, so the window left is the interpreter's own start-up.
"""

from __future__ import annotations

import sys


def entry() -> None:
    """Load the command line, then run it (:func:`search.cli.entry`); a stop while loading exits 130."""
    try:
        from search.cli import entry as run_command
    except KeyboardInterrupt:
        sys.exit(130)
    run_command()
