"""One-shot GPU benchmark: trainer throughput with and without each optimisation, trials per GPU, memory,
whole-utterance validation time, a projected 70k-step strong trial, and CUDA correctness checks.

    bash bench/gpu.sh                 # on a single-GPU machine; writes bench/out/gpu.json (or $OUT/gpu.json)
    python bench/gpu_bench.py --dry-run   # CPU, tiny set: checks the script itself (tested in CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from search.checkpoint import load_model
from search.config import Config, load_config
from search.data import CropSampler, FeatureStore, PackedData, make_split
from search.errors import first_line
from search.infer import accuracy, predict_logits
from search.model import build_model
from search.supervise import worker_context
from search.train import CudaGraphStep, EagerStep, lr_in_tensor, make_optimizer, train

ROOT = Path(__file__).resolve().parent.parent
STRONG = ROOT / "spaces" / "baselines" / "strong.yaml"


def synthetic_packed(folder: Path, speakers: int, utterances: int, test: int, seed: int = 0) -> PackedData:
    """A packed set of HW4 size built straight into the memmap (no .pt files): speaker templates + noise.

    Lengths follow the real mel_len distribution (search.synth.utterance_lengths); every utterance is a
    per-speaker spectral template with per-frame noise, so the loss falls and accuracy means something.
    """
    from search.synth import PRESETS, utterance_lengths

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lengths = utterance_lengths(PRESETS["hw4"], rng, utterances + test).astype(np.int64)
    labels = np.concatenate([rng.integers(0, speakers, utterances), -np.ones(test, dtype=np.int64)])
    offsets = np.zeros_like(lengths)
    np.cumsum(lengths[:-1], out=offsets[1:])
    feats = np.lib.format.open_memmap(
        folder / "features.npy", mode="w+", dtype=np.float16, shape=(int(lengths.sum()), 40)
    )
    templates = rng.normal(-6.0, 2.0, size=(speakers, 40)).astype(np.float32)
    test_speaker = rng.integers(0, speakers, test)
    chunk = 4096
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(lengths), chunk):
        idx = np.arange(start, min(start + chunk, len(lengths)))
        spk = np.where(labels[idx] >= 0, labels[idx], test_speaker[np.clip(idx - utterances, 0, test - 1)])
        rows = np.repeat(spk, lengths[idx])
        noise = torch.randn(len(rows), 40, generator=gen).numpy() * 2.5
        lo, hi = offsets[idx[0]], offsets[idx[-1]] + lengths[idx[-1]]
        feats[lo:hi] = (templates[rows] + noise).astype(np.float16)
    feats.flush()
    return PackedData(
        root=folder,
        cache_dir=folder,
        fingerprint=f"bench{seed}",
        n_mels=40,
        speakers=[f"id{10000 + i:05d}" for i in range(speakers)],
        ids=[f"u{i}" for i in range(len(lengths))],
        features=np.load(folder / "features.npy", mmap_mode="c"),
        offsets=offsets,
        lengths=lengths,
        labels=labels,
    )


def ablation(config: Config, data: PackedData, device: str, steps: int, **opt: Any) -> float:
    """Steps/s of the training step with each fast-path piece switched on or off."""
    t = config.train
    dev = torch.device(device)
    torch.manual_seed(0)
    model = build_model(config.model, data.n_mels, data.n_speakers).to(dev)
    split = make_split(data)
    store = FeatureStore(data, dev if opt["data_on_gpu"] else "cpu")
    sampler = CropSampler(store, split.train, t.batch_size, t.segment_len, seed=0)
    optim = make_optimizer(model, 1e-3, t.weight_decay, fused=opt["fused"] and dev.type == "cuda")
    step_fn = torch.compile(model, mode=opt["compile"]) if opt.get("compile") else model
    graphed = bool(opt.get("graph")) and dev.type == "cuda"
    lr_in_tensor(optim, dev, graphed)

    def core(x: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        bf16 = opt["bf16"] and dev.type == "cuda"
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16, cache_enabled=not graphed):
            loss = F.cross_entropy(step_fn(x, lengths, labels).float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optim.step()
        return loss.detach()

    run = CudaGraphStep(core, optim) if graphed else EagerStep(core, optim)

    def one() -> None:
        x, lengths, labels = sampler.next()
        x, lengths, labels = x.to(dev, non_blocking=True), lengths.to(dev), labels.to(dev)
        loss = run(x, lengths, labels)
        if opt["sync_each_step"]:
            loss.item()

    for _ in range(max(5, steps // 10)):
        one()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


FAST = "+ no host sync per step (fast path without the graph)"
GRAPH = "+ whole step replayed as one CUDA graph (cuda_graph: true, the trainer's default)"
DRY_MODEL = {"d_model": 32, "heads": 2, "layers": 1, "ffn_dim": 64, "conv_kernel": 7, "batch_size": 8}


def bench_config(dry: bool) -> Config:
    """The strong baseline (batch 32, 128-frame crops); a tiny stand-in for the CPU dry run."""
    strong = load_config(STRONG)
    return strong.replace(**DRY_MODEL) if dry else strong


def _k_trial(data: PackedData, device: str, steps: int, dry: bool, ready: Any) -> str:
    """One of K trials sharing a GPU: warm up (CUDA context, kernels, graph; not timed), call ``ready``
    (which returns at the common start), then train ``steps`` steps; returns the step mode it ran in."""
    config = bench_config(dry).replace(steps=steps, valid_steps=10 * steps)  # validates once, at the end
    train(config.replace(steps=5), data, device, log_every=5)
    ready()
    return train(config, data, device, log_every=steps).step_mode


def _trial_proc(args: tuple[str, str, int, bool, Any, Any]) -> None:
    folder, device, steps, dry, queue, go = args
    torch.set_num_threads(2)

    def ready() -> None:
        queue.put(("ready", os.getpid()))
        go.wait()

    _k_trial(_open(Path(folder)), device, steps, dry, ready)
    queue.put(("done", os.getpid()))


def _open(folder: Path) -> PackedData:
    meta = json.loads((folder / "meta.json").read_text())
    index = np.load(folder / "index.npz")
    return PackedData(
        root=folder,
        cache_dir=folder,
        fingerprint=meta["fingerprint"],
        n_mels=40,
        speakers=meta["speakers"],
        ids=[f"u{i}" for i in range(len(index["lengths"]))],
        features=np.load(folder / "features.npy", mmap_mode="c"),
        offsets=index["offsets"],
        lengths=index["lengths"],
        labels=index["labels"],
    )


def trials_per_gpu(folder: Path, device: str, k: int, steps: int, dry: bool) -> float:
    """Aggregate trial-steps/s with k trainer processes sharing one GPU (what --per-gpu k was before lanes).

    Each process warms up, then all start together on one signal; the figure is k * steps over the
    time from that signal to the last one's end (final validation included), so processes that did
    not overlap cannot inflate it.
    """
    ctx = worker_context()  # as run starts its workers (forked from a server that has imported torch)
    queue, go = ctx.Queue(), ctx.Event()
    procs = [
        ctx.Process(target=_trial_proc, args=((str(folder), device, steps, dry, queue, go),))
        for _ in range(k)
    ]
    for p in procs:
        p.start()
    for _ in range(k):
        assert queue.get(timeout=600)[0] == "ready"
    start = time.perf_counter()
    go.set()
    for _ in range(k):
        assert queue.get(timeout=600)[0] == "done"
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    return k * steps / elapsed


def trials_as_threads(data: PackedData, device: str, k: int, steps: int, dry: bool) -> dict[str, Any]:
    """Aggregate trial-steps/s with k trainers as threads of one process (as ``run --per-gpu k`` does).

    Separate processes time-slice the GPU; kernels of one process on several streams (``train`` runs
    each call on a stream of its own) can overlap. Same accounting as :func:`trials_per_gpu`: k * steps
    over the time from a common start; each timed trainer's ``step_mode`` is returned too, so a graph
    that fell back to eager is not hidden.
    """
    go = threading.Barrier(k + 1)
    errors: list[BaseException] = []
    modes: list[str] = []

    def one() -> None:
        try:
            modes.append(_k_trial(data, device, steps, dry, go.wait))
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            errors.append(exc)
            go.abort()

    threads = [threading.Thread(target=one) for _ in range(k)]
    for th in threads:
        th.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a trainer failed: raised below
        go.wait()
    start = time.perf_counter()
    for th in threads:
        th.join()
    if errors:
        traceback.print_exception(errors[0])
        raise errors[0]
    if device == "cuda":
        torch.cuda.synchronize()
    rate = k * steps / (time.perf_counter() - start)
    return {"steps_per_s": round(rate, 1), "step_modes": sorted(set(modes))}


def threads_section(
    result: dict[str, Any],
    data: PackedData,
    device: str,
    steps: int,
    dry: bool,
    save: Any,
    ks: tuple[int, ...] = (1, 2, 4),
) -> None:
    """K trials per GPU as ``run --per-gpu K`` runs them (threads of one process), and each K's
    aggregate over K = 1's (the issue's ">= 2x at the chosen K" compares these)."""
    rates = result["aggregate_trial_steps_per_s"] = {}
    for k in (1, 2) if dry else ks:
        try:
            outcome: dict[str, Any] | str = trials_as_threads(data, device, k, steps, dry)
        except Exception as exc:  # noqa: BLE001 - one K failing must not cost the other figures
            outcome = f"failed: {type(exc).__name__}: {first_line(exc, 200)}"
        rates[str(k)] = outcome
        one = rates.get("1")
        if isinstance(outcome, dict) and isinstance(one, dict):
            result.setdefault("aggregate_over_one_trial", {})[str(k)] = round(
                outcome["steps_per_s"] / one["steps_per_s"], 2
            )
        save()


def parse_ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise SystemExit(f"gpu_bench: --threads-k {text!r}: give positive integers, e.g. 1,2,4")
    return ks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny set on CPU: checks the script, not the GPU"
    )
    parser.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "bench" / "out")))
    parser.add_argument("--skip-k", action="store_true", help="skip the trials-per-GPU measurement")
    parser.add_argument(
        "--processes",
        action="store_true",
        help="also measure K trials as separate processes (what --per-gpu did before lanes)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run for a second GPU model: of the step variants only the fast path with and "
        "without the graph",
    )
    parser.add_argument(
        "--threads-only",
        action="store_true",
        help="only the trials-per-GPU measurement (K trials as threads, as run --per-gpu K runs them)",
    )
    parser.add_argument("--threads-k", default="1,2,4", help="the K values measured (comma-separated)")
    parser.add_argument(
        "--compile", action="store_true", help="also measure torch.compile, last (slow to warm up)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_bench: no CUDA GPU visible; use --dry-run to check the script on CPU")
    speakers, utts, test = (8, 200, 20) if dry else (600, 56666, 8000)
    steps = 3 if dry else args.steps
    folder = Path("/dev/shm" if Path("/dev/shm").is_dir() and not dry else args.out) / "spkid-gpu-bench"
    data = synthetic_packed(folder, speakers, utts, test)
    (folder / "meta.json").write_text(
        json.dumps({"fingerprint": data.fingerprint, "speakers": data.speakers})
    )
    np.savez(folder / "index.npz", offsets=data.offsets, lengths=data.lengths, labels=data.labels)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "frames": int(data.lengths.sum()),
        "utterances": int(len(data.lengths)),
        "data_build_s": round(time.perf_counter() - started, 1),
    }
    strong = bench_config(dry)
    out_file = args.out / "gpu.json"
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section, so a run cut short still leaves what it measured
        result["wall_s"] = round(time.perf_counter() - started, 1)
        out_file.write_text(json.dumps(result, indent=2))

    if args.threads_only:
        threads_section(result, data, device, 5 if dry else 1000, dry, save, parse_ks(args.threads_k))
        print(json.dumps(result, indent=2))
        return

    base = {"data_on_gpu": False, "bf16": False, "fused": False, "sync_each_step": True}
    fast_path = {"data_on_gpu": True, "bf16": True, "fused": True, "sync_each_step": False}
    ladder = [
        ("naive (host batches, fp32, foreach AdamW, sync every step)", {}),
        ("+ features on GPU, crops gathered on device", {"data_on_gpu": True}),
        ("+ bf16 autocast", {"data_on_gpu": True, "bf16": True}),
        ("+ fused AdamW", {"data_on_gpu": True, "bf16": True, "fused": True}),
        (FAST, fast_path),
        (GRAPH, {**fast_path, "graph": True}),
    ]
    compile_rows = [
        ("+ torch.compile (compile: true, cuda_graph ignored)", {**fast_path, "compile": "default"}),
        (
            "+ torch.compile reduce-overhead: its own CUDA graphs (compile_mode: reduce-overhead)",
            {**fast_path, "compile": "reduce-overhead"},
        ),
    ]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result["steps_per_s"] = {}

    def measure(rows: list[tuple[str, dict[str, Any]]]) -> None:
        for name, o in rows:
            try:
                result["steps_per_s"][name] = round(ablation(strong, data, device, steps, **{**base, **o}), 1)
            except Exception as exc:  # noqa: BLE001 - one variant failing must not cost the other figures
                result["steps_per_s"][name] = f"failed: {type(exc).__name__}: {first_line(exc, 200)}"
                print(f"gpu_bench: {name}: {result['steps_per_s'][name]}", file=sys.stderr)
            save()

    measure(ladder[-2:] if args.quick else ladder)

    # The trainer as users run it (cuda_graph: true, the default) and with the graph off; correctness
    # on the device: loss falls, padding invariance, bf16 vs fp32 validation agree.
    torch.manual_seed(0)
    check_steps = 30 if dry else 600
    config = strong.replace(
        steps=check_steps, valid_steps=check_steps, warmup_steps=min(100, check_steps // 4)
    )
    run_dir = folder / "check-run"
    plain = timed_train(config, data, device, run_dir)
    result["trainer"] = plain
    result["trainer_steps_per_s"] = plain["steady_steps_per_s"]
    result["peak_gpu_memory_gib"] = (
        round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None
    )
    result["trainer_without_graph"] = timed_train(
        config.replace(cuda_graph=False), data, device, folder / "check-eager"
    )
    save()
    # The bf16-vs-fp32 check scores the weights just trained (an untrained model's near-equal logits
    # would make both accuracies chance and the comparison meaningless).
    model = load_model(run_dir / "best.pt", device)[0]
    split = make_split(data)
    store = FeatureStore(data, device)
    valid = split.valid
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    logits_bf16 = predict_logits(model, store, valid)
    if device == "cuda":
        torch.cuda.synchronize()
    result["validation_s"] = round(time.perf_counter() - t0, 2)
    result["validation_utterances"] = int(len(valid))
    with torch.autocast(device, enabled=False):
        logits_fp32 = _predict_fp32(model, store, valid)
    labels = data.labels[valid]
    result["checks"] = {
        "loss_first": plain["loss_first"],
        "loss_last": plain["loss_last"],
        "loss_falls": plain["loss_last"] < plain["loss_first"],
        "padding_invariance_max_abs_diff": _padding_diff(model, store, valid[:8]),
        "valid_acc_bf16": round(accuracy(logits_bf16, labels), 4),
        "valid_acc_fp32": round(accuracy(logits_fp32, labels), 4),
        # Accuracies saturate on an easy set; whether each utterance gets the same answer does not.
        "bf16_fp32_same_prediction": round(float((logits_bf16.argmax(1) == logits_fp32.argmax(1)).mean()), 4),
        "graph_vs_eager_max_loss_diff": _graph_vs_eager(strong, data, device, folder, 10 if dry else 40),
    }
    checks = result["checks"]
    checks["bf16_fp32_agree"] = (
        abs(checks["valid_acc_bf16"] - checks["valid_acc_fp32"]) <= 0.01
        and checks["bf16_fp32_same_prediction"] >= 0.99
    )
    checks["padding_invariant"] = checks["padding_invariance_max_abs_diff"] < 1e-3
    checks["graph_matches_eager"] = checks["graph_vs_eager_max_loss_diff"] < 0.05
    rate = result["trainer_steps_per_s"]
    result["projected_70k_strong_trial_min"] = round((70000 / rate + 35 * result["validation_s"]) / 60, 1)
    save()
    if not args.skip_k:
        k_steps = 5 if dry else 1000
        ks = parse_ks(args.threads_k)
        threads_section(result, data, device, k_steps, dry, save, ks)
        if args.processes:
            processes = result["aggregate_trial_steps_per_s_processes"] = {}
            for k in (1, 2) if dry or args.quick else ks:
                processes[str(k)] = round(trials_per_gpu(folder, device, k, k_steps, dry), 1)
                save()
    if args.compile:
        measure(compile_rows)
    measured = {name: v for name, v in result["steps_per_s"].items() if isinstance(v, float)}
    best = max(measured, key=lambda name: measured[name])
    result["projected_70k_strong_trial_min_best"] = {
        "with": best,
        "minutes": round((70000 / measured[best] + 35 * result["validation_s"]) / 60, 1),
    }
    save()
    print(json.dumps(result, indent=2))
    if not dry:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def _graph_vs_eager(strong: Config, data: PackedData, device: str, folder: Path, steps: int) -> float:
    """Largest per-step loss difference between the trainer with and without the CUDA graph.

    Same initial weights and batches; dropout off, since a graph draws its dropout masks from a
    different random stream than eager kernels. Agreement up to bf16 noise means the recorded step
    trains exactly as the eager one (gradients, clipping, AdamW and the lr schedule all replayed).
    """
    config = strong.replace(steps=steps, valid_steps=steps, warmup_steps=steps // 2, dropout=0.0)
    losses: list[list[float]] = []
    for graph in (False, True):
        losses.append([])
        train(
            config.replace(cuda_graph=graph),
            data,
            device,
            report=lambda s, m: losses[-1].append(m["loss"]),
            out_dir=folder / f"agree-{graph}",
            log_every=1,
        )
    return round(max(abs(a - b) for a, b in zip(*losses, strict=True)), 5)


def timed_train(config: Config, data: PackedData, device: str, out_dir: Path) -> dict[str, Any]:
    """Run ``train`` and time it from its own reports.

    ``steady_steps_per_s`` spans the reports after the first and before the last, so it leaves out
    compilation and CUDA-graph recording (first window) and the final validation (last report).
    """
    marks: list[tuple[float, int, float]] = []
    trained = train(
        config,
        data,
        device,
        report=lambda s, m: marks.append((time.perf_counter(), s, m["loss"])),
        out_dir=out_dir,
        log_every=max(1, config.train.steps // 6),
    )
    (t0, s0, _), (t1, s1, _) = marks[1], marks[-2]
    return {
        "steps_per_s": round(trained.steps_per_s, 1),
        "steady_steps_per_s": round((s1 - s0) / max(t1 - t0, 1e-9), 1),
        "loss_first": round(marks[0][2], 3),
        "loss_last": round(marks[-1][2], 3),
        "valid_acc": round(trained.best_accuracy, 4),
    }


@torch.no_grad()
def _predict_fp32(model: torch.nn.Module, store: FeatureStore, indices: np.ndarray) -> np.ndarray:
    from search.data import eval_batches

    out = np.zeros((len(indices), 0), dtype=np.float32)
    pos = {int(i): k for k, i in enumerate(indices)}
    for batch, x, lengths in eval_batches(store, indices):
        logits = model(x, lengths).float().cpu().numpy()
        if out.shape[1] == 0:
            out = np.zeros((len(indices), logits.shape[1]), dtype=np.float32)
        out[[pos[int(i)] for i in batch]] = logits
    return out


@torch.no_grad()
def _padding_diff(model: torch.nn.Module, store: FeatureStore, indices: np.ndarray) -> float:
    """Max |logit difference| between each utterance alone and inside one padded batch (fp32)."""
    lens = torch.as_tensor(store.data.lengths[indices], device=store.home)
    idx = torch.as_tensor(indices, device=store.home)
    batch = store.gather(idx, torch.zeros_like(lens), lens, int(store.data.lengths[indices].max()))
    lens = store.to_device(lens)
    together = model(batch, lens)
    worst = 0.0
    for row in range(len(indices)):
        n = int(lens[row])
        alone = model(batch[row : row + 1, :n], lens[row : row + 1])
        worst = max(worst, float((alone - together[row : row + 1]).abs().max()))
    return worst


if __name__ == "__main__":
    main()
