"""Rich views of a study: the live run display (plain lines without a terminal) and the ``status`` table."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from search import progress
from search.trials import (
    FINISHED,
    Counts,
    current_best,
    is_skipped,
    real_failures,
    summary_rows,
    trial_accuracy,
)


def _fmt(value: Any, pattern: str = "{:.4f}") -> str:
    return "-" if value is None else pattern.format(value)


WIDE = 120  # below this many columns the searched values go under the table, one line per trial


def best_table(study: optuna.Study, top: int = 10, width: int | None = None) -> RenderableType:
    """The best finished trials, best first.

    On a wide terminal the searched values are the table's last column; on a narrow one (or a pipe,
    which rich renders 80 wide) a values column would be squeezed to a few letters per line, so they
    are listed under the table instead.
    """
    wide = (width or progress.console.width) >= WIDE
    table = Table(title=f"study '{study.study_name}': best trials", header_style="bold")
    for col in ("trial", "state", "valid acc", "best step", "params", "steps/s", "device"):
        table.add_column(col, justify="left" if col in ("state", "device") else "right", no_wrap=True)
    if wide:
        table.add_column("searched values", justify="left", min_width=30, ratio=1)
    below: list[Text] = []
    rows = summary_rows(study.get_trials(deepcopy=False), study.user_attrs, top)
    if not rows:
        table.caption = "no finished trial yet"
    elif any(row["other_data"] for row in rows):
        table.caption = (
            "* trained on an earlier data set or split of this study (run --allow-changed): "
            "export-top leaves it out"
        )
    for row in rows:
        values = _values(row["params"])
        cells = [
            str(row["number"]),
            row["state"] + ("*" if row["other_data"] else ""),
            _fmt(row["valid_acc"]),
            _fmt(row["best_step"], "{}"),
            _fmt(row["parameters"], "{:,}"),
            _fmt(row["steps_per_s"], "{:.1f}"),
            str(row["device"] or "-"),
        ]
        if wide:
            table.add_row(*cells, values)
        else:
            table.add_row(*cells)
            below.append(Text.assemble((f"trial {row['number']}: ", "bold"), values))
    return Group(table, *below) if below else table


def failures_table(trials: list[FrozenTrial], latest: int = 5) -> RenderableType | None:
    """The latest failed ``trials`` with their reasons (None when there are none): what to fix before a
    study that stopped at ``--max-failures`` is run again."""
    failed = real_failures(trials)
    if not failed:
        return None
    table, shown = _latest(failed, "failed trials", "bold red", latest)
    table.add_column("device", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=2)
    table.add_column("searched values", overflow="fold", ratio=1)  # what the reason may depend on
    for t in shown:
        table.add_row(str(t.number), str(t.user_attrs.get("device") or "-"), _reason(t), _values(t.params))
    return table


def retries_table(trials: list[FrozenTrial], latest: int = 5) -> RenderableType | None:
    """The latest trials that failed and were queued again, with their reasons (None when there are none).

    They are not failures (each resumed from its checkpoint in a retry), but why they happened matters
    on a long study: a worker the OOM killer keeps taking, a storage that keeps dropping out.
    """
    retried_as = {n: t.number for t in trials for n in (t.system_attrs.get("retry_history") or [])[-1:]}
    retried = [t for t in trials if t.state == TrialState.FAIL and t.number in retried_as]
    if not retried:
        return None
    table, shown = _latest(retried, "retried trials", "bold yellow", latest)
    table.add_column("retried as", justify="right", no_wrap=True)
    table.add_column("reason", overflow="fold")
    for t in shown:
        table.add_row(str(t.number), str(retried_as[t.number]), _reason(t))
    return table


def _latest(
    trials: list[FrozenTrial], title: str, style: str, latest: int
) -> tuple[Table, list[FrozenTrial]]:
    """A table for the last ``latest`` of ``trials`` (its title says how many there are), trial first."""
    shown = trials[-latest:]
    more = f" (latest {len(shown)} of {len(trials)})" if len(trials) > len(shown) else ""
    table = Table(title=f"{title}{more}", header_style="bold", title_style=style)
    table.add_column("trial", justify="right", no_wrap=True)
    return table, shown


def _reason(t: FrozenTrial) -> str:
    # Every other way to FAIL records a reason: this one is the heartbeat check's (Optuna records none).
    return str(
        t.user_attrs.get("fail_reason")
        or "its heartbeat stopped (its worker or machine died, or lost the storage)"
    )


def _values(params: dict[str, Any]) -> str:
    if not params:  # a space of fixed values (its trials differ by seed): "trial 0: " read as cut off
        return "(nothing searched)"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def size_text(n: float) -> str:
    """Bytes as people read them: 950 B, 31.2 MB, 6.2 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def disk_line(folder: Path) -> Text | None:
    """The checkpoints in ``folder`` (the artifact store) and the space left on its disk.

    Why: every trial keeps its best checkpoint (a boss-space model is 30 MB on average and up to 200 MB),
    so a search left for days can fill a disk; a full disk stops the run. None when the folder cannot
    be read here (a study run on another machine).
    """
    try:
        with os.scandir(folder) as entries:
            sizes = [e.stat().st_size for e in entries if e.is_file() and not e.name.startswith(".")]
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return Text.assemble(
        ("checkpoints ", "bold"),
        f"{len(sizes)} files, {size_text(sum(sizes))} in {folder}  ",
        ("free ", "bold"),
        f"{size_text(free)}",
    )


def counts_line(counts: Counts, target: int | None = None) -> Text:
    goal = f"/{target}" if target else ""
    return Text.assemble(
        ("finished ", "bold"),
        f"{counts.finished}{goal} ",
        (f"(complete {counts.complete}, pruned {counts.pruned})  ", "dim"),
        ("running ", "bold"),
        f"{counts.running}  ",
        ("waiting ", "bold"),
        f"{counts.waiting}  ",
        ("failed ", "bold red" if counts.failed else "bold"),
        f"{counts.failed}",
        (f"  (retried {counts.retried})" if counts.retried else "", "dim"),
    )


SUMMARY_EVERY = 60.0  # seconds between plain summary lines: a multi-day log stays readable
# A trial is failed, then its retry queued: a look in between would call a retried trial a failure.
REQUEUE_WAIT = 5.0


class RunView:
    """Live display for ``spkid-search run``: running trials per worker, counts, best so far, throughput.

    Without a terminal (a pipe, a file, ``docker compose logs``) a live view is only drawn when it stops,
    so it prints plain lines instead: one per ended trial and a summary at most every ``summary_every`` s.
    """

    def __init__(
        self,
        target: int,
        enabled: bool = True,
        console: Console | None = None,
        summary_every: float = SUMMARY_EVERY,
        requeue_wait: float = REQUEUE_WAIT,
    ) -> None:
        self.target = target
        self.requeue_wait = requeue_wait
        self.held = False  # a FAIL line waits for its retry (see _print_lines): look again next update
        self.enabled = enabled
        self.console = console if console is not None else progress.console
        self.plain = not self.console.is_terminal
        self.summary_every = summary_every
        self.started = time.time()
        self.start_finished: int | None = None
        self.last_summary = -float("inf")
        self.ended: tuple[int, ...] | None = None  # the counts of ended trials at the last look
        self.seen: set[int] = set()  # ended trials already printed (or ended before this run)
        self.last: tuple[optuna.Study, Counts] | None = None  # the latest update's, for the closing lines
        self.live = Live(
            Text("starting workers..."), console=self.console, refresh_per_second=2, transient=False
        )

    def __enter__(self) -> RunView:
        return self  # the live view starts on the first update, after run() has validated everything

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.live.is_started:
            self.live.stop()
            if not self.live.console.is_terminal:
                self.live.console.line()  # piped output: end the last view's line before what follows
        if self.plain and self.held and self.last is not None:
            # The run is over, its workers gone: a held FAIL line has had its retry queued or never will.
            # Without this, trials that failed in the run's last seconds ended it without a line.
            with contextlib.suppress(Exception):  # the storage may be what stopped the run
                self._print_lines(*self.last, final=True)

    def update(self, study: optuna.Study, counts: Counts, workers: list[dict[str, Any]]) -> None:
        if not self.enabled:
            return
        if self.start_finished is None:
            self.start_finished = counts.finished
        self.last = (study, counts)
        if self.plain:
            self._print_lines(study, counts)
            return
        if not self.live.is_started:
            self.live.start()
        table = Table(header_style="bold", expand=False)
        for col in ("worker", "device", "trial", "step", "loss", "valid acc", "steps/s"):
            table.add_column(col, justify="left" if col in ("worker", "device") else "right")
        for w in workers:
            if w.get("done") or w.get("idle") or w.get("error"):
                state = "done" if w.get("done") else ("idle" if w.get("idle") else "error")
                table.add_row(w["worker"], w["device"], state, "", "", "", "")
                continue
            step = f"{w.get('step', 0)}/{w.get('total', '?')}"
            table.add_row(
                w["worker"],
                w["device"],
                str(w.get("trial", "-")),
                step,
                _fmt(w.get("loss"), "{:.3f}"),
                _fmt(w.get("valid_acc")),
                _fmt(w.get("steps_per_s"), "{:.1f}"),
            )
        footer = Text.assemble(
            counts_line(counts, self.target), f"   {self._best(study)}   ", (self._rate(counts), "dim")
        )
        self.live.update(Group(table, footer))

    def _best(self, study: optuna.Study) -> str:
        best = current_best(study.get_trials(deepcopy=False), study.user_attrs)
        return "best -" if best is None else f"best {trial_accuracy(best):.4f} (trial {best.number})"

    def _rate(self, counts: Counts) -> str:
        hours = max(time.time() - self.started, 1e-6) / 3600
        done_here = counts.finished - (self.start_finished or 0)
        # A resumed study shows no rate until this run has finished a trial (not a misleading 0.0).
        return f"{done_here / hours:.1f} trials/h" if done_here > 0 else "- trials/h"

    def _print_lines(self, study: optuna.Study, counts: Counts, final: bool = False) -> None:
        """A line per trial ended since the last look (read only when the counts moved), then the summary
        (``final``: the run is over; no line is held and no summary printed)."""
        ended = (counts.complete, counts.pruned, counts.failed, counts.retried, counts.skipped)
        if ended != self.ended or self.held:
            first, self.ended, self.held = self.ended is None, ended, False
            trials = study.get_trials(deepcopy=False)
            failed = {t.number for t in real_failures(trials)}
            for t in trials:
                if t.number in self.seen or not (t.state in FINISHED or t.state == TrialState.FAIL):
                    continue
                if not first and not final and t.number in failed and self._just_ended(t):
                    self.held = True  # its retry may be queued a moment later: decide next time
                    continue
                self.seen.add(t.number)
                if not first and not is_skipped(t):  # those that ended before this run were shown before
                    self._print(trial_line(t, t.number in failed))
        if not final and time.monotonic() - self.last_summary >= self.summary_every:
            self.last_summary = time.monotonic()
            self._print(
                f"{counts_line(counts, self.target).plain}  {self._best(study)}  {self._rate(counts)}"
            )

    def _just_ended(self, t: FrozenTrial) -> bool:
        ended = t.datetime_complete
        return ended is not None and (datetime.now() - ended).total_seconds() < self.requeue_wait

    def _print(self, line: str) -> None:
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)  # whole, never cut at 80


def trial_line(t: FrozenTrial, failed: bool = True) -> str:
    """One plain line for an ended trial: what a log reader needs without opening ``status``."""
    attrs = t.user_attrs
    head = f"trial {t.number} {t.state.name}"
    if t.state == TrialState.FAIL:
        again = "" if failed else "  (queued again: not a failure)"
        return f"{head}: {_reason(t)}{again}"
    acc = attrs.get("valid_acc", t.value)
    root = t.system_attrs.get("failed_trial")
    retry = ""
    if root is not None and root != t.number:  # which killed or stopped trial this one finished
        resumed = attrs.get("resumed_from_step")
        retry = f"  (retry of trial {root}" + (f", resumed at step {resumed})" if resumed else ")")
    return (
        f"{head}  valid acc {_fmt(acc)}  {_fmt(attrs.get('steps_per_s'), '{:.1f}')} steps/s"
        f"  on {attrs.get('device') or '-'}{retry}"
    )
