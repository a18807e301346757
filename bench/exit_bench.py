"""Time a whole `spkid-search run` of one short trial, as a script or a test waiting on its output sees
it: from the start until the command's stdout and stderr close (the fork server holds them too).

Two ways of running the same command, alternated on one study so the machine's drift hits both:

- ``quick exit``: ``python -m search.cli`` as installed (``cli.entry``: gc.freeze before the exit; the
  fork server freezes what it preloaded, ``search.preload``);
- ``plain exit``: ``main()`` with the interpreter's usual teardown and the fork server without
  ``search.preload``, as before that change.

    python bench/exit_bench.py [--repeats 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.spaces import UNIT_SPACE  # noqa: E402 - the repo's root must be on the path first

PLAIN = (
    "import sys, search.supervise as s; s.WORKER_PRELOAD[:] = s.WORKER_MODULES; "
    "from search.cli import main; sys.exit(main(sys.argv[1:]))"
)


def timed(command: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)  # waits for the pipes to close
    if done.returncode != 0:
        raise SystemExit(f"{command}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="exit-bench-"))
    py = sys.executable
    subprocess.run(
        [py, "-m", "search.cli", "synth", "--out", "data", "--preset", "tiny", "--quiet"],
        cwd=work,
        check=True,
    )
    params = {**UNIT_SPACE["params"], "steps": args.steps, "valid_steps": args.steps}
    space = {**UNIT_SPACE, "name": "exit", "params": params, "pruner": {"name": "none"}}
    (work / "exit.yaml").write_text(yaml.safe_dump(space))
    results: dict[str, list[float]] = {"quick exit": [], "plain exit": []}
    trials = 0
    for _ in range(args.repeats):
        for name, head in (("quick exit", [py, "-m", "search.cli"]), ("plain exit", [py, "-c", PLAIN])):
            trials += 1  # one more trial each time: every command trains exactly one
            command = [
                *head,
                "run",
                "--space",
                "exit.yaml",
                "--trials",
                str(trials),
                "--data",
                "data",
                "--quiet",
            ]
            results[name].append(round(timed(command, work), 2))
    report = {
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d"),
        "steps": args.steps,
        "seconds": results,
        "median_s": {name: statistics.median(v) for name, v in results.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
