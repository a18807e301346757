"""A rich progress bar driven by the trainer's ``report`` callback (step, loss, lr, accuracy, speed)."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from search import progress


class TrainView:
    """Context manager whose :meth:`report` can be passed straight to :func:`search.train.train`.

    Without a terminal a progress bar is only drawn when it stops (cut to 80 columns), so each report
    is printed as a whole plain line instead.
    """

    def __init__(self, total_steps: int, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.total = total_steps
        self.console = console if console is not None else progress.console
        self.plain = not self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  lr {task.fields[lr]}  valid {task.fields[valid]}"
                "  best {task.fields[best]}  {task.fields[speed]} steps/s"
            ),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled or self.plain,
        )
        self.task = self.progress.add_task(
            "train", total=total_steps, loss="-", lr="-", valid="-", best="-", speed="-"
        )

    def __enter__(self) -> TrainView:
        self.progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.progress.stop()

    def report(self, step: int, metrics: dict[str, float]) -> None:
        fields: dict[str, Any] = {
            "loss": f"{metrics['loss']:.3f}",
            "lr": f"{metrics['lr']:.2e}",
            "speed": f"{metrics['steps_per_s']:.1f}",
        }
        if "valid_acc" in metrics:
            fields["valid"] = f"{metrics['valid_acc']:.4f}"
            fields["best"] = f"{metrics['best_acc']:.4f}"
        if self.enabled and self.plain:
            valid = f"  valid {fields['valid']} (best {fields['best']})" if "valid" in fields else ""
            line = f"train step {step}/{self.total}  loss {fields['loss']}  lr {fields['lr']}{valid}"
            self.console.print(
                f"{line}  {fields['speed']} steps/s", markup=False, highlight=False, soft_wrap=True
            )
            return
        self.progress.update(self.task, completed=step, **fields)
