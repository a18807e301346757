"""search.display: the status tables stay readable on narrow and wide terminals and say why trials failed;
without a terminal the run view prints whole plain lines instead of a live view."""

from __future__ import annotations

import io

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console

from search.display import WIDE, RunView, best_table, failures_table, retries_table
from search.trials import count_trials

PARAMS = {"encoder": "conformer", "dropout": 0.123456, "pooling": "attentive_stats"}
DISTS = {
    "encoder": CategoricalDistribution(["transformer", "conformer"]),
    "dropout": FloatDistribution(0.0, 0.5),
    "pooling": CategoricalDistribution(["mean", "attention", "attentive_stats"]),
}


def _study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="unit", direction="maximize")
    for number, acc in enumerate((0.5, 0.9, 0.7)):
        study.add_trial(
            create_trial(
                value=acc,
                params=PARAMS,
                distributions=DISTS,
                user_attrs={"valid_acc": acc, "best_step": 100 * (number + 1), "parameters": 12345},
            )
        )
    return study


def _render(width: int) -> str:
    console = Console(width=width, record=True, color_system=None)
    console.print(best_table(_study(), 2, width))
    return console.export_text()


@pytest.mark.parametrize("width", [80, WIDE + 40])
def test_best_first_and_every_value_whole(width: int) -> None:
    text = _render(width)
    assert text.index("0.9000") < text.index("0.7000") and "0.5000" not in text  # top 2, best first
    for value in ("encoder=conformer", "dropout=0.123", "pooling=attentive_stats"):
        assert value in text, (width, text)  # never cut into a few letters per line
    assert max(len(line) for line in text.splitlines()) <= width


def test_narrow_terminals_list_the_values_under_the_table() -> None:
    narrow, wide = _render(80), _render(WIDE + 40)
    assert "trial 1: encoder=conformer" in narrow and "searched values" not in narrow
    assert "searched values" in wide and "trial 1:" not in wide


def test_a_trial_of_a_space_that_searches_nothing_says_so() -> None:
    """A space of fixed values (its trials differ by seed only) listed "trial 0: " and nothing after."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.add_trial(create_trial(value=0.5, user_attrs={"valid_acc": 0.5}))
    console = Console(width=80, record=True, file=io.StringIO())
    console.print(best_table(study, 5, width=80))
    assert "trial 0: (nothing searched)" in console.export_text()


def test_failures_table_gives_the_reasons_of_real_failures_only() -> None:
    study = _study()
    assert failures_table(study.get_trials()) is None  # no failure: no table
    fail = TrialState.FAIL
    reasons = [f"bad config: d_model {n} not divisible by heads" for n in range(7)]
    for reason in reasons:
        attrs = {"fail_reason": reason, "device": "cpu"}
        study.add_trial(create_trial(state=fail, params=PARAMS, distributions=DISTS, user_attrs=attrs))
    killed = study.trials[-1].number
    study.add_trial(create_trial(state=fail, user_attrs={"fail_reason": "interrupted", "skipped": False}))
    study.add_trial(
        create_trial(state=fail, user_attrs={"fail_reason": "study already holds", "skipped": True})
    )
    retry = create_trial(state=TrialState.COMPLETE, value=0.1)
    retry._system_attrs = {"failed_trial": killed, "retry_history": [killed]}
    study.add_trial(retry)
    console = Console(width=160, record=True, color_system=None)
    table = failures_table(study.get_trials(), latest=3)
    assert table is not None
    console.print(table)
    text = console.export_text()
    # Seven real failures: trials 3-8 and the interrupted 10; 9 was retried and 11 skipped.
    assert "failed trials (latest 3 of 7)" in text, text
    assert reasons[4] in text and reasons[5] in text and "interrupted" in text
    assert "dropout=0.123" in text  # the values a failure may depend on
    assert reasons[6] not in text and "study already holds" not in text and reasons[3] not in text


def _update(view: RunView, study: optuna.Study) -> None:
    view.update(study, count_trials(study.get_trials()), [])


def test_without_a_terminal_the_run_view_prints_whole_lines_per_trial_and_a_timed_summary() -> None:
    """A pipe or ``docker compose logs`` got nothing until the run ended: a live view draws only on stop."""
    study = _study()  # three trials that ended before this run: not printed again
    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=80)
    with RunView(8, console=console, summary_every=3600, requeue_wait=0) as view:
        _update(view, study)
        attrs = {"valid_acc": 0.95, "steps_per_s": 123.456, "device": "cuda:1", "parameters": 1}
        study.add_trial(create_trial(value=0.95, params=PARAMS, distributions=DISTS, user_attrs=attrs))
        reason = "bad config: d_model 90 not divisible by heads 4; " + "x" * 80  # a line wider than 80
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": reason}))
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "interrupted"}))
        attrs = {"valid_acc": 0.5, "resumed_from_step": 100}
        retry = create_trial(state=TrialState.PRUNED, value=0.5, user_attrs=attrs)
        retry._system_attrs = {"failed_trial": 5, "retry_history": [5]}
        study.add_trial(retry)
        _update(view, study)
        _update(view, study)  # nothing new, and the summary is not due: no line
        view.summary_every = 0
        _update(view, study)
    assert not view.live.is_started
    lines = out.getvalue().splitlines()
    assert lines == [
        "finished 3/8 (complete 3, pruned 0)  running 0  waiting 0  failed 0"
        "  best 0.9000 (trial 1)  - trials/h",
        "trial 3 COMPLETE  valid acc 0.9500  123.5 steps/s  on cuda:1",
        f"trial 4 FAIL: {reason}",
        "trial 5 FAIL: interrupted  (queued again: not a failure)",
        "trial 6 PRUNED  valid acc 0.5000  - steps/s  on -  (retry of trial 5, resumed at step 100)",
        lines[5],
    ], out.getvalue()
    assert lines[5].startswith(
        "finished 5/8 (complete 4, pruned 1)  running 0  waiting 0  failed 1  (retried 1)"
        "  best 0.9500 (trial 3)  "
    )
    assert lines[5].endswith(" trials/h") and "\x1b" not in out.getvalue()


def test_a_fail_line_waits_a_moment_for_its_retry() -> None:
    """A trial is failed, then its retry queued: a look in between printed a killed (retried) trial as
    a failure, without "(queued again)". A just-failed trial's line waits for the next look; one that
    is never retried is printed as a failure once the wait is over."""
    study = _study()
    out = io.StringIO()
    # A wait no slow machine outlasts between the looks below; then it is over (no sleep to race).
    with RunView(8, console=Console(file=out, force_terminal=False), requeue_wait=60) as view:
        _update(view, study)
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "killed"}))
        _update(view, study)
        assert "trial 3" not in out.getvalue()  # not yet: its retry may be queued a moment later
        retry = create_trial(state=TrialState.COMPLETE, value=0.6, user_attrs={"valid_acc": 0.6})
        retry._system_attrs = {"failed_trial": 3, "retry_history": [3]}
        study.add_trial(retry)
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "bad config"}))
        _update(view, study)
        assert "trial 3 FAIL: killed  (queued again: not a failure)" in out.getvalue()
        assert "trial 5" not in out.getvalue()
        view.requeue_wait = 0
        _update(view, study)  # no count moved, but a line was held: looked at again
    assert "trial 5 FAIL: bad config\n" in out.getvalue()


def test_a_held_fail_line_is_printed_as_the_run_ends() -> None:
    """Trials that failed in a run's last seconds (a space whose every other config is invalid) were
    held for their retry by the last look and the run ended without their lines."""
    study = _study()
    out = io.StringIO()
    with pytest.raises(RuntimeError), RunView(8, console=Console(file=out, force_terminal=False)) as view:
        _update(view, study)
        study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": "bad config"}))
        _update(view, study)
        assert "trial 3" not in out.getvalue()  # held: the default wait is seconds
        raise RuntimeError("the run stops here (say, --max-failures)")
    assert out.getvalue().endswith("trial 3 FAIL: bad config\n"), out.getvalue()


def test_retries_table_gives_why_retried_trials_failed() -> None:
    """status showed only "retried 2" for trials a worker's kill had failed; their reasons (an OOM kill,
    say) were in the database only."""
    study = _study()
    assert retries_table(study.get_trials()) is None
    # Trial 3 is killed and retried as 4; 4 is interrupted and retried as 5, which is running.
    for number, reason in ((3, "its worker w0 (cpu) was killed by SIGKILL"), (4, "interrupted")):
        failed = create_trial(state=TrialState.FAIL, user_attrs={"fail_reason": reason})
        if number == 4:
            failed._system_attrs = {"failed_trial": 3, "retry_history": [3]}
        study.add_trial(failed)
    running = create_trial(state=TrialState.RUNNING)
    running._system_attrs = {"failed_trial": 3, "retry_history": [3, 4]}
    study.add_trial(running)
    console = Console(width=120, record=True, color_system=None)
    console.print(retries_table(study.get_trials()))
    text = console.export_text()
    rows = [[c.strip() for c in line.split("│")[1:4]] for line in text.splitlines() if "│" in line]
    assert "retried trials" in text
    assert rows == [["3", "4", "its worker w0 (cpu) was killed by SIGKILL"], ["4", "5", "interrupted"]], text
    assert failures_table(study.get_trials()) is None  # retried: none of them is a failure


def test_a_trial_the_heartbeat_check_failed_says_so() -> None:
    """Optuna's stale check records no reason; status said "no reason recorded (the worker died?)"."""
    study = _study()
    study.add_trial(create_trial(state=TrialState.FAIL))
    console = Console(width=160, record=True, color_system=None)
    console.print(failures_table(study.get_trials()))
    assert "its heartbeat stopped (its worker or machine died, or lost the storage)" in console.export_text()


def test_on_a_terminal_the_run_view_stays_live_and_quiet_prints_nothing() -> None:
    study = _study()
    out = io.StringIO()
    terminal = Console(file=out, force_terminal=True, color_system=None, width=100)
    with RunView(8, console=terminal) as view:
        _update(view, study)
        assert view.live.is_started and not view.plain
    assert "┃ worker ┃" in out.getvalue() and "finished 3/8" in out.getvalue()  # the live table's frame
    piped = io.StringIO()
    with RunView(8, enabled=False, console=Console(file=piped, force_terminal=False)) as view:
        _update(view, study)
    assert piped.getvalue() == ""
