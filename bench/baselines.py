"""What the seed's baseline ladder reaches on a synthetic preset, at a CPU-sized step budget.

Trains spaces/baselines/{simple,medium,strong,boss}.yaml with the same shortened budget (the real
configs train 70k-150k steps on a GPU), then scores whole-utterance validation and, through the
answers.csv the synthetic set carries, test accuracy.

    python bench/baselines.py [--preset small] [--steps 600] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from search.checkpoint import load_model
from search.config import load_config
from search.data import FeatureStore, pack
from search.infer import accuracy, predict_logits
from search.train import train

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--names", default="simple,medium,strong,boss")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from search.synth import generate

    root = OUT / f"data-{args.preset}"
    if not (root / "testdata.json").exists():
        generate(root, preset=args.preset, seed=0, progress=False)
    data = pack(root, OUT / "cache", progress=False)
    answers = {row["Id"]: row["Category"] for row in csv.DictReader((root / "answers.csv").open())}
    test = data.test
    test_labels = np.array([data.speakers.index(answers[data.ids[i]]) for i in test])
    results = []
    for name in args.names.split(","):
        config = load_config(ROOT / "spaces" / "baselines" / f"{name}.yaml")
        valid_steps = max(1, args.steps // 3)
        config = config.replace(
            steps=args.steps,
            valid_steps=valid_steps,
            warmup_steps=min(config.train.warmup_steps, args.steps // 10),
            margin_warmup_steps=min(config.model.margin_warmup_steps, args.steps // 3),
        )
        start = time.perf_counter()
        out = OUT / "baselines" / name
        result = train(config, data, "cpu", out_dir=out)
        model, _, _ = load_model(out / "best.pt")
        test_acc = accuracy(predict_logits(model, FeatureStore(data), test, 8192), test_labels)
        row = {
            "config": name,
            "steps": args.steps,
            "parameters": result.parameters,
            "valid_acc": round(result.best_accuracy, 4),
            "test_acc": round(test_acc, 4),
            "steps_per_s": round(result.steps_per_s, 2),
            "wall_s": round(time.perf_counter() - start, 1),
        }
        print(json.dumps(row), flush=True)
        results.append(row)
    summary = {
        "preset": args.preset,
        "date": time.strftime("%Y-%m-%d"),
        "chance": 1 / data.n_speakers,
        "results": results,
    }
    (OUT / f"baselines-{args.preset}.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
