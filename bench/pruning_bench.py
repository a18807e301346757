"""Steps spent and best value reached on the smoke space with its default pruner vs no pruning.

Runs two studies of the same number of trials (same sampler seed) in a scratch folder and counts the
training steps each trial really ran (the last reported validation step for pruned trials).

    python bench/pruning_bench.py [--trials 12] [--data DIR] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from search.space import SPACES_DIR
from search.storage import default_storage_url, open_storage
from search.study import RunOptions, run

OUT = Path(__file__).resolve().parent / "out"


def steps_spent(study: optuna.Study) -> int:
    total = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.state == TrialState.PRUNED and t.intermediate_values:
            total += max(t.intermediate_values)
        else:
            total += int(t.user_attrs["config"]["steps"])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--data", type=Path, help="HW4 folder (default: the generated small set)")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    data = args.data.resolve() if args.data else None
    smoke = yaml.safe_load((SPACES_DIR / "smoke.yaml").read_text())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        for label, pruner in (("default pruner", smoke["pruner"]), ("no pruning", {"name": "none"})):
            name = "pruned" if label == "default pruner" else "unpruned"
            space = {**smoke, "name": name, "pruner": pruner}
            Path(f"{name}.yaml").write_text(yaml.safe_dump(space))
            start = time.perf_counter()
            run(
                RunOptions(
                    space=f"{name}.yaml", trials=args.trials, data=data, workers=args.workers, display=False
                )
            )
            study = optuna.load_study(study_name=name, storage=open_storage(default_storage_url(name)))
            results[label] = {
                "pruner": pruner,
                "trials": args.trials,
                "pruned": len(study.get_trials(states=(TrialState.PRUNED,))),
                "steps_spent": steps_spent(study),
                "best_valid_acc": round(study.best_value, 4),
                "wall_s": round(time.perf_counter() - start, 1),
            }
    results["steps_saved"] = (
        1 - results["default pruner"]["steps_spent"] / results["no pruning"]["steps_spent"]
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "pruning_bench.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
