"""search.display: the status table stays readable on narrow and wide terminals."""

from __future__ import annotations

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import create_trial
from rich.console import Console

from search.display import WIDE, best_table

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
