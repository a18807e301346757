"""Rich progress bars shared by every long step (packing, synthesis, training, inference)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)  # progress, notices and errors
output = Console()  # results (tables a user may pipe or save: status, export, vote): stdout
for _stream in (console, output):
    # In a pipe or a log file (docker compose logs) rich would break every line at 80 columns: a
    # notice then spans lines and grep misses it. Tables still fit their width.
    _stream.soft_wrap = not _stream.is_terminal


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` function; a no-op when disabled so callers need no branches."""
    if not enabled:
        yield lambda n: None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def note(message: str) -> None:
    """One line for the user on stderr, in yellow (above the live display when there is one)."""
    console.print(message, style="yellow", markup=False, highlight=False, soft_wrap=True)
