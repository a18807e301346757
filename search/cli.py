"""The ``spkid-search`` command line: parse arguments, call one module function, print results.

Every user-fixable problem arrives here as a :class:`UserError` and leaves as one line on stderr with a
non-zero exit code; Ctrl-C exits with 130 after the command's own clean-up has run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from search.errors import UserError

Handler = Callable[[argparse.Namespace], int]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from search.progress import console
    from search.synth import generate

    out = generate(
        args.out, preset=args.preset, speakers=args.speakers, utterances=args.utterances, test=args.test,
        seed=args.seed, progress=not args.quiet,
    )
    console.print(f"[green]Wrote synthetic HW4 set to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from search.config import load_config
    from search.data import open_data
    from search.devices import resolve_device
    from search.progress import console
    from search.train import train
    from search.trainview import TrainView

    config = load_config(args.config)
    if args.steps is not None:
        config = config.replace(steps=args.steps, valid_steps=min(config.train.valid_steps, args.steps))
    device = resolve_device(args.device)
    data = open_data(args.data, progress=not args.quiet)
    out = args.out if args.out is not None else Path("studies") / "runs" / Path(args.config).stem
    console.print(f"Training {args.config} on {device} for {config.train.steps} steps -> {out}/best.pt")
    with TrainView(config.train.steps, enabled=not args.quiet) as view:
        result = train(config, data, device, report=view.report, out_dir=out, log_every=args.log_every)
    console.print(
        f"[green]best valid accuracy {result.best_accuracy:.4f} at step {result.best_step}; "
        f"{result.parameters:,} parameters; {result.steps_per_s:.1f} steps/s; checkpoint {result.checkpoint}"
    )
    return 0


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spkid-search",
        description="Find, train and ensemble speaker-identification models on the HW4 feature set "
        "(or your own audio). Studies live in an Optuna SQL database (SQLite by default).",
    )
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "synth", help="generate a synthetic data set in the exact HW4 layout",
        description="Write a synthetic speaker set in the HW4 layout (mapping.json, metadata.json, "
        "testdata.json, uttr-*.pt) plus answers.csv so test accuracy can be scored.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to create (must be new or empty)")
    p.add_argument("--preset", choices=("tiny", "small", "hw4"), default="small",
                   help="size: tiny (tests), small (minutes on CPU), hw4 (real set's size); default small")
    p.add_argument("--speakers", type=_positive, help="override the preset's number of speakers")
    p.add_argument("--utterances", type=_positive, help="override the preset's labelled utterances (total)")
    p.add_argument("--test", type=_positive, help="override the preset's test utterances")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "train", help="train one configuration (a YAML of fixed values)",
        description="Train one configuration with a live progress bar; writes best.pt (best validation "
        "accuracy, with its config) under --out. See spaces/baselines/ for ready configs.",
    )
    p.add_argument("--config", type=Path, required=True, help="YAML config, e.g. spaces/baselines/strong.yaml")
    p.add_argument("--data", type=Path, help="HW4 data folder (default: a generated synthetic set)")
    p.add_argument("--out", type=Path, help="output folder (default studies/runs/<config name>)")
    p.add_argument("--steps", type=_positive, help="override the config's number of training steps")
    p.add_argument("--device", default="auto", help="auto (default: cuda if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--log-every", type=_positive, default=50, help="progress update interval in steps")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler = args.func
    try:
        return handler(args)
    except UserError as exc:
        print(f"spkid-search {args.command}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"spkid-search {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
