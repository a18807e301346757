"""Whole-utterance inference: length-bucketed batches (predict_logits) vs the sample code's batch-1 loop.

The course's sample code scores the test set one utterance at a time (``model(x[None])``, batch 1).
This benchmark runs both on the same model and the same utterances, checks they predict the same
speakers, and reports utterances/s and the speed-up; the JSON lands in ``bench/out/``.

    python bench/infer_bench.py                      # strong-like conformer, synthetic HW4-length set
    python bench/infer_bench.py --data Dataset --utterances 2000 --device cuda
    python bench/infer_bench.py --checkpoint studies/runs/strong/best.pt --data Dataset

Features come from the packed cache for both paths, so file I/O is not timed; the batched path's
one-time FeatureStore set-up (a copy to the GPU on CUDA) is timed and reported separately.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from search.checkpoint import load_model
from search.config import Config, load_config
from search.data import CropSampler, FeatureStore, PackedData, make_split, pack
from search.devices import resolve_device
from search.errors import UserError
from search.infer import CPU_FRAME_BUDGET, frame_budget, predict_logits
from search.model import SpeakerNet, build_model, count_parameters

OUT_DIR = Path(__file__).resolve().parent / "out"
# The "strong" baseline (spaces/baselines/strong.yaml): Conformer, d_model 224, mean pooling, BN + Linear.
STRONG = {
    "encoder": "conformer", "d_model": 224, "heads": 2, "ffn_dim": 256, "layers": 3, "conv_kernel": 31,
    "dropout": 0.2, "pooling": "mean", "head": "linear", "head_bn": True,
}  # fmt: skip


def synthetic_data(utterances: int, speakers: int, cache: Path) -> PackedData:
    """A synthetic set with HW4's test-length distribution (median 540 frames), generated once."""
    from search.synth import generate

    root = OUT_DIR / "data" / f"hw4len-s{speakers}-t{utterances}"
    if not (root / "testdata.json").exists():
        print(f"generating {utterances} synthetic test utterances in {root} ...", file=sys.stderr)
        generate(root, preset="hw4", speakers=speakers, utterances=3 * speakers, test=utterances, seed=0)
    return pack(root, cache, progress=False)


def make_model(args: argparse.Namespace, data: PackedData, device: torch.device) -> tuple[SpeakerNet, str]:
    """The checkpoint's model, or a strong-like conformer trained for a few steps (not random logits).

    A freshly initialised model gives near-equal logits for many classes, where float noise alone can
    flip an argmax; a few training steps make the prediction comparison meaningful.
    """
    if args.checkpoint is not None:
        model, _, _ = load_model(args.checkpoint, device)
        return model, str(args.checkpoint)
    config = load_config(args.config) if args.config else Config.from_dict({**STRONG, "lr": 2e-3})
    torch.manual_seed(0)
    model = build_model(config.model, data.n_mels, data.n_speakers).to(device)
    if args.train_steps:
        started = time.perf_counter()
        _train_steps(model, data, device, args.train_steps, 2e-3)
        print(f"trained {args.train_steps} steps in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    model.eval()
    name = str(args.config) if args.config else "strong-like conformer (d_model 224)"
    return model, f"{name}, {args.train_steps} training steps"


def _train_steps(model: SpeakerNet, data: PackedData, device: torch.device, steps: int, lr: float) -> None:
    """A few plain AdamW steps on 128-frame crops: enough to pull the logits apart."""
    store = FeatureStore(data, device)
    sampler = CropSampler(store, make_split(data, 0.1, 0).train, 16, 128, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        x, lengths, labels = sampler.next()
        loss = torch.nn.functional.cross_entropy(model(x, lengths, labels), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], np.ndarray], device: torch.device) -> tuple[np.ndarray, float]:
    """(result, wall seconds) of ``fn``, with the GPU's queue drained on both sides."""
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - started


@torch.no_grad()
def batch_one(model: SpeakerNet, data: PackedData, indices: np.ndarray, device: torch.device) -> np.ndarray:
    """The sample code's loop: one utterance at a time, ``model(x[None])``, result copied back each time."""
    model.eval()
    rows = []
    for i in indices:
        x = torch.from_numpy(data.utterance(int(i))).to(device)
        lengths = torch.tensor([x.shape[0]], device=device)
        rows.append(model(x[None], lengths).float().cpu().numpy()[0])
    return np.stack(rows)


def attention_flops(model: SpeakerNet, frames: int) -> int:
    """FLOPs of the encoder's attention scores and weighted sums for one utterance: 4 * T^2 * d per layer.

    torch's flop counter does not see the fused CPU attention kernel, so these are added by hand.
    """
    layers = sum(1 for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention))
    d_model = next(m.embed_dim for m in model.modules() if isinstance(m, torch.nn.MultiheadAttention))
    return 4 * frames * frames * d_model * layers


@torch.no_grad()
def roofline(model: SpeakerNet, data: PackedData, indices: np.ndarray, seconds: float) -> dict[str, float]:
    """How close the batch-1 loop already runs to this CPU's matrix-multiply rate.

    Counts the model's FLOPs over the scored utterances (linear and convolution layers by torch's
    counter, attention by :func:`attention_flops`), divides by the batch-1 time, and compares with a
    large float32 matmul on the same threads. No batching can beat batch-1 by more than
    ``peak / achieved``: it only removes per-call overhead, never arithmetic.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    flops = 0
    for i in indices:
        x = torch.from_numpy(data.utterance(int(i)))
        with FlopCounterMode(display=False) as counter:
            model(x[None], torch.tensor([x.shape[0]]))
        flops += counter.get_total_flops() + attention_flops(model, x.shape[0])
    a, b = torch.randn(4096, 224), torch.randn(224, 896)
    for _ in range(3):
        a @ b
    started, n = time.perf_counter(), 30
    for _ in range(n):
        a @ b
    peak = 2 * 4096 * 224 * 896 * n / (time.perf_counter() - started)
    achieved = flops / seconds
    return {
        "gflop_per_utterance": flops / len(indices) / 1e9,
        "batch1_gflop_per_s": achieved / 1e9,
        "matmul_gflop_per_s": peak / 1e9,
        "batch1_fraction_of_matmul": achieved / peak,
        "max_speedup_any_batching": peak / achieved,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = OUT_DIR / "cache"
    data = pack(args.data, cache, progress=False) if args.data else synthetic_data(args.utterances, 40, cache)
    test = data.test if len(data.test) else data.labelled
    indices = test[: args.utterances]
    if len(indices) == 0:
        raise UserError(f"{data.root}: no utterances to score")
    model, label = make_model(args, data, device)
    if args.frame_budget is None:
        args.frame_budget = frame_budget(65536, device)
    frames = data.lengths[indices]

    started = time.perf_counter()
    store = FeatureStore(data, device)
    sync(device)
    setup_s = time.perf_counter() - started
    warm = indices[: min(8, len(indices))]
    predict_logits(model, store, warm, args.frame_budget)  # warm-up both paths (allocator, kernels)
    batch_one(model, data, warm, device)

    batched, batched_s = timed(lambda: predict_logits(model, store, indices, args.frame_budget), device)
    # Then alternate the two paths `repeats` times and keep each one's best time, so a busy machine's
    # load drifting between the runs does not decide the ratio. From here on the batched path's
    # (batch, frames) shapes have been seen once; on CUDA a shape's first use costs far more than a repeat.
    repeat_times, single_times = [], []
    for _ in range(max(1, args.repeats)):
        repeat_times.append(
            timed(lambda: predict_logits(model, store, indices, args.frame_budget), device)[1]
        )
        single, single_s = timed(lambda: batch_one(model, data, indices, device), device)
        single_times.append(single_s)
    repeat_s, single_s = min(repeat_times), min(single_times)

    same = batched.argmax(axis=1) == single.argmax(axis=1)
    result = {
        "model": label,
        "parameters": count_parameters(model),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "data": str(data.root),
        "utterances": int(len(indices)),
        "frames": {"total": int(frames.sum()), "median": float(np.median(frames)), "max": int(frames.max())},
        "frame_budget": args.frame_budget,
        "repeats": max(1, args.repeats),
        "batched": {"seconds": batched_s, "utt_per_s": len(indices) / batched_s, "setup_seconds": setup_s},
        "batched_repeat": {"seconds": repeat_s, "utt_per_s": len(indices) / repeat_s, "all": repeat_times},
        "batch1": {"seconds": single_s, "utt_per_s": len(indices) / single_s, "all": single_times},
        "speedup": single_s / batched_s,
        "speedup_repeat": single_s / repeat_s,
        "predictions_identical": bool(same.all()),
        "mismatches": int((~same).sum()),
        "max_abs_logit_diff": float(np.abs(batched - single).max()),
        "bf16_batched": device.type == "cuda",
    }
    if device.type == "cpu":
        result["roofline"] = roofline(model, data, indices, single_s)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="HW4 data folder (default: a synthetic HW4-length set)")
    parser.add_argument("--utterances", type=int, default=200, help="test utterances to score (default 200)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument(
        "--checkpoint", type=Path, help="score this checkpoint instead of a strong-like model"
    )
    parser.add_argument(
        "--config", type=Path, help="a config YAML (e.g. spaces/baselines/simple.yaml) instead of strong-like"
    )
    parser.add_argument("--train-steps", type=int, default=30, help="steps to train the stand-in model")
    parser.add_argument(
        "--frame-budget", type=int, help=f"batch * longest frames per batch (default: 65536 on CUDA, "
        f"{CPU_FRAME_BUDGET} on CPU, as vote uses)"
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating timed runs of each path (best kept)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/out/infer-<device>-<time>.json)")
    args = parser.parse_args(argv)
    try:
        result = run(args)
    except UserError as exc:
        print(f"infer_bench: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    out = (
        args.out
        or OUT_DIR / f"infer-{result['device'].replace(':', '')}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    b, r, s = result["batched"], result["batched_repeat"], result["batch1"]
    print(
        f"{result['utterances']} utterances (median {result['frames']['median']:.0f} frames) "
        f"on {result['device']}, {result['torch_threads']} threads\n"
        f"  batched (predict_logits), first pass: {b['utt_per_s']:8.1f} utt/s  ({b['seconds']:.2f}s)\n"
        f"  batched, best repeat:                 {r['utt_per_s']:8.1f} utt/s  ({r['seconds']:.2f}s)\n"
        f"  batch-1 loop (sample), best repeat:   {s['utt_per_s']:8.1f} utt/s  ({s['seconds']:.2f}s)\n"
        f"  speed-up {result['speedup_repeat']:.2f}x (first batched pass: {result['speedup']:.2f}x)\n"
        f"  predictions identical: {result['predictions_identical']} ({result['mismatches']} differ, "
        f"max |logit diff| {result['max_abs_logit_diff']:.2e})\n"
        f"  -> {out}"
    )
    if "roofline" in result:
        roof = result["roofline"]
        print(
            f"  roofline: batch-1 runs {roof['batch1_gflop_per_s']:.1f} GFLOP/s, "
            f"{100 * roof['batch1_fraction_of_matmul']:.0f}% of a large matmul's "
            f"{roof['matmul_gflop_per_s']:.1f} GFLOP/s on these threads: no batching can be more than "
            f"{roof['max_speedup_any_batching']:.1f}x faster here"
        )
    strict = result["device"] == "cpu"  # CUDA batches run in bf16, the batch-1 loop in fp32
    return 1 if strict and not result["predictions_identical"] else 0


if __name__ == "__main__":
    sys.exit(main())
