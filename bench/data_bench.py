"""Crop-batch throughput of the packed memmap sampler vs the course sample code's Dataset + DataLoader.

The sample code reads one ``uttr-*.pt`` per item with ``torch.load`` in 2 DataLoader workers, crops 128
frames and pads with -20. Here the same batches come from one memory-mapped array with vectorised
indexing. Also measures training steps/s of the strong config fed by each pipeline.

    python bench/data_bench.py [--data DIR] [--batches 300] [--train-steps 30] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from search.config import load_config
from search.data import CropSampler, FeatureStore, make_split, pack
from search.model import build_model

OUT = Path(__file__).resolve().parent / "out"


class SampleCodeDataset(Dataset[tuple[torch.Tensor, int]]):
    """The course sample's myDataset: one torch.load per item, random 128-frame segment."""

    def __init__(self, root: Path, segment_len: int = 128) -> None:
        self.root = root
        self.segment_len = segment_len
        mapping = json.loads((root / "mapping.json").read_text())["speaker2id"]
        meta = json.loads((root / "metadata.json").read_text())["speakers"]
        self.items = [(u["feature_path"], mapping[spk]) for spk, utts in meta.items() for u in utts]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, speaker = self.items[index]
        mel = torch.load(self.root / path, weights_only=True)
        if len(mel) > self.segment_len:
            start = random.randint(0, len(mel) - self.segment_len)
            mel = mel[start : start + self.segment_len]
        return mel.float(), speaker


def collate(batch: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mels, speakers = zip(*batch, strict=True)
    lengths = torch.tensor([len(m) for m in mels])
    return pad_sequence(list(mels), batch_first=True, padding_value=-20), lengths, torch.tensor(speakers)


def loader_batches(root: Path, batch_size: int):  # type: ignore[no-untyped-def]
    loader = DataLoader(
        SampleCodeDataset(root),
        batch_size=batch_size,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        collate_fn=collate,
        persistent_workers=True,
    )
    while True:
        yield from loader


def time_batches(source, n: int) -> float:  # type: ignore[no-untyped-def]
    next(source)  # warm-up: worker start, first page-ins
    start = time.perf_counter()
    for _ in range(n):
        next(source)
    return n / (time.perf_counter() - start)


def time_training(source, config_path: Path, n_mels: int, n_speakers: int, steps: int, device: str) -> float:  # type: ignore[no-untyped-def]
    config = load_config(config_path)
    torch.manual_seed(0)
    model = build_model(config.model, n_mels, n_speakers).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> None:
        x, lengths, labels = next(source)
        x, lengths, labels = x.to(device), lengths.to(device), labels.to(device)
        loss = F.cross_entropy(model(x, lengths, labels), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="HW4 folder (default: generate the small synthetic preset)")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--train-threads", type=int, default=2, help="torch threads for the training comparison"
    )
    args = parser.parse_args()
    # One intra-op thread for batch timing: each DataLoader worker also runs with one, and torch's thread
    # pool costs more than it saves on ops this small (and badly so on a shared 2-core machine).
    torch.set_num_threads(1)
    root = args.data
    if root is None:
        from search.synth import generate

        root = OUT / "data-small"
        if not (root / "testdata.json").exists():
            generate(root, preset="small", seed=0, progress=False)
    data = pack(root, OUT / "cache", progress=False)
    split = make_split(data)
    store = FeatureStore(data, args.device)
    sampler = CropSampler(store, split.train, args.batch_size, 128, seed=0)

    def packed():  # type: ignore[no-untyped-def]
        while True:
            yield sampler.next()

    packed_bps = time_batches(packed(), args.batches)
    loader_bps = time_batches(loader_batches(root, args.batch_size), args.batches)
    strong = Path(__file__).resolve().parent.parent / "spaces" / "baselines" / "strong.yaml"
    torch.set_num_threads(args.train_threads)
    packed_sps = time_training(packed(), strong, data.n_mels, data.n_speakers, args.train_steps, args.device)
    loader_sps = time_training(
        loader_batches(root, args.batch_size),
        strong,
        data.n_mels,
        data.n_speakers,
        args.train_steps,
        args.device,
    )
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "train_threads": args.train_threads,
        "date": time.strftime("%Y-%m-%d"),
        "data": str(root),
        "utterances": int(len(data.lengths)),
        "device": args.device,
        "batch_size": args.batch_size,
        "packed_batches_per_s": round(packed_bps, 1),
        "dataloader_batches_per_s": round(loader_bps, 1),
        "sampler_speedup": round(packed_bps / loader_bps, 1),
        "strong_steps_per_s_packed": round(packed_sps, 2),
        "strong_steps_per_s_dataloader": round(loader_sps, 2),
        "training_ratio": round(packed_sps / loader_sps, 2),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "data_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
