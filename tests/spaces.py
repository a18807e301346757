"""The small search space that the study and reliability tests run (tests import it from here)."""

from __future__ import annotations

from typing import Any

# Trials of a second or two on one CPU core with the tiny synthetic set.
UNIT_SPACE: dict[str, Any] = {
    "name": "unit",
    "params": {
        "steps": 60,
        "valid_steps": 20,
        "batch_size": 16,
        "segment_len": 48,
        "warmup_steps": 5,
        "eval_frame_budget": 8192,
        "encoder": "transformer",
        "ffn_dim": 32,
        "d_model": {"low": 16, "high": 32, "step": 16},
        "heads": 2,
        "lr": {"low": 1.0e-4, "high": 3.0e-2, "log": True},
        "pooling": {"choices": ["mean", "attention"]},
    },
    "sampler": {"name": "random", "seed": 0},
    "pruner": {"name": "successive_halving", "min_resource": 1, "reduction_factor": 2},
}
