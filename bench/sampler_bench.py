"""Best value TPE reaches on the boss space's keys, with and without ``group`` (conditional keys modelled
jointly), on a synthetic response surface: no training, seconds per study.

The surface is made up, not measured: it rewards a learning rate near 1e-3, a moderate dropout, 6
layers, and, only where the keys exist, an AM-Softmax scale and margin whose product is near 6 (an
interaction between two conditional keys) and a Conformer kernel of 31. It shows whether the sampler
finds good values of keys that only some trials have; it says nothing about real accuracies.

    python bench/sampler_bench.py [--trials 60] [--seeds 10]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
import warnings

import optuna

from search.config import Config
from search.space import load_space, make_sampler


def score(config: Config) -> float:
    m, t = config.model, config.train
    value = 1.0 - 0.3 * abs(math.log10(t.lr / 1e-3)) - abs(m.dropout - 0.1) - 0.03 * abs(m.layers - 6)
    if m.head in ("amsoftmax", "aamsoftmax"):
        value += 0.3 - 0.05 * abs(m.am_s * m.am_m - 6.0)
    if m.encoder == "conformer":
        value += 0.1 - 0.003 * abs(m.conv_kernel - 31)
    return value


def best_of(group: bool, trials: int, seed: int) -> float:
    space = load_space("boss")
    space = dataclasses.replace(space, sampler={**space.sampler, "group": group, "seed": seed})
    study = optuna.create_study(direction="maximize", sampler=make_sampler(space))
    for _ in range(trials):
        trial, config = space.ask(study)
        if config is not None:
            study.tell(trial, score(config))
    return study.best_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=10)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.simplefilter("ignore")
    result: dict[str, object] = {"trials": args.trials, "seeds": args.seeds}
    for group in (False, True):
        start = time.perf_counter()
        bests = [best_of(group, args.trials, seed) for seed in range(args.seeds)]
        result[f"group={group}"] = {
            "mean_best": round(statistics.mean(bests), 4),
            "median_best": round(statistics.median(bests), 4),
            "min_best": round(min(bests), 4),
            "seconds": round(time.perf_counter() - start, 1),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
