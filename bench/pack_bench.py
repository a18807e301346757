"""Time packing an HW4 folder into the float16 memmap cache (what the first run on a new set waits for).

Each repeat packs into a fresh cache folder with the feature files in the page cache (the first repeat
warms it and is reported apart), so the figure is the packing's own cost: decoding every ``.pt``,
converting to float16, writing the memmap and hashing the set's content for its fingerprint.

    python bench/pack_bench.py --data DIR [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

from search.data import pack


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="an HW4-layout folder (spkid-search synth)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times = []
    for _ in range(args.repeats + 1):
        scratch = Path(tempfile.mkdtemp(prefix="pack-bench-"))
        try:
            start = time.perf_counter()
            data = pack(args.data, scratch, progress=False)
            times.append(time.perf_counter() - start)
            frames, n = int(data.lengths.sum()), len(data.ids)
        finally:
            shutil.rmtree(scratch)
    source_mb = sum(p.stat().st_size for p in args.data.glob("*.pt")) / 1e6
    best = min(times[1:])
    print(
        json.dumps(
            {
                "machine": platform.node(),
                "utterances": n,
                "frames": frames,
                "source_mb": round(source_mb, 1),
                "warm_up_s": round(times[0], 2),
                "pack_s": [round(t, 2) for t in times[1:]],
                "best_mb_per_s": round(source_mb / best, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
