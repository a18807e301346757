"""search.trainview: a bar on a terminal; whole plain lines without one (a bar draws only when it stops)."""

from __future__ import annotations

import io

from rich.console import Console

from search.trainview import TrainView

LOG = {"loss": 2.16234, "lr": 0.001, "steps_per_s": 1.54}


def test_without_a_terminal_each_report_is_one_whole_line() -> None:
    out = io.StringIO()
    with TrainView(70_000, console=Console(file=out, force_terminal=False, width=80)) as view:
        view.report(50, LOG)
        view.report(70_000, {**LOG, "valid_acc": 0.81234, "best_acc": 0.82})
    assert not view.progress.live.is_started
    assert out.getvalue().splitlines() == [
        "train step 50/70000  loss 2.162  lr 1.00e-03  1.5 steps/s",
        "train step 70000/70000  loss 2.162  lr 1.00e-03  valid 0.8123 (best 0.8200)  1.5 steps/s",
    ]


def test_on_a_terminal_the_bar_stays_and_disabled_prints_nothing() -> None:
    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, color_system=None, width=200)
    with TrainView(100, console=terminal) as view:
        view.report(50, LOG)
        assert view.progress.live.is_started and not view.plain
    assert "50/100" in out.getvalue() and "train step" not in out.getvalue()
    piped = io.StringIO()
    with TrainView(100, enabled=False, console=Console(file=piped, force_terminal=False)) as view:
        view.report(50, LOG)
    assert piped.getvalue() == ""
