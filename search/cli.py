"""The ``spkid-search`` command line: parse arguments, call the modules' functions, print results.

Each command checks what it can before importing torch (seconds), so a wrong argument is refused at
once, and says in notes what the modules report (a resumed run, a set it cannot validate on).

Every user-fixable problem arrives here as a :class:`UserError` and leaves as one line on stderr with a
non-zero exit code; Ctrl-C exits with 130 after the command's own clean-up has run.
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from search.errors import UserError
from search.stops import imports_with_stops_deferred, lost_stops_redelivered

Handler = Callable[[argparse.Namespace], int]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _device(text: str) -> str:
    """``--device``'s form, checked with the other arguments: it was checked only once torch was
    imported, after a finished run in --out had been refused (fix one, then find the other)."""
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        return text
    raise argparse.ArgumentTypeError(f"unknown device '{text}'; use auto, cpu, cuda or cuda:N")


DEVICE_HELP = "auto (default: cuda if present), cpu, cuda, cuda:1 ..."
STORAGE_HELP = (
    "storage URL (default sqlite:///studies/<study>/study.db), or postgresql://user@host/db; keep a "
    "password out of the command line (ps shows it) with PGPASSWORD or ~/.pgpass"
)


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


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def cmd_prepare(args: argparse.Namespace) -> int:
    from search.prepare import prepare
    from search.progress import console

    report = prepare(
        args.audio,
        args.out,
        test_per_speaker=args.test_per_speaker,
        test_fraction=args.test_fraction,
        workers=args.workers,
        seed=args.seed,
        progress=not args.quiet,
        min_utterances=args.min_utterances,
        force=args.force,
    )
    console.print(report.render())
    if report.index_changed:
        console.print(
            f"[yellow]note: {report.out} held a set with other speakers, files or test split; studies made "
            "on it will refuse this one (run them with a new --study)"
        )
    if report.validatable == 0:
        # A valid layout (vote and predict can use it), but train and run need a speaker with 2 or more
        # training utterances to hold one out for validation.
        fewer_tests = (
            ", or prepare again with --force and fewer test utterances (--test-per-speaker 0 keeps all "
            "of them for training)"
            if report.test
            else ""
        )
        console.print(
            f"[yellow]Wrote the HW4 layout to {report.out}, but no speaker keeps 2 or more training "
            f"utterances, so train and run cannot hold any out to validate on: give speakers more files"
            f"{fewer_tests}"
        )
        return 0
    console.print(f"[green]Wrote the HW4 layout to {report.out}; train with --data {report.out}")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from search.progress import console
    from search.synth import generate

    out = generate(
        args.out,
        preset=args.preset,
        speakers=args.speakers,
        utterances=args.utterances,
        test=args.test,
        seed=args.seed,
        progress=not args.quiet,
        force=args.force,
    )
    console.print(f"[green]Wrote synthetic HW4 set to {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from search.config import load_config
    from search.files import check_can_create, studies_root

    config = load_config(args.config)
    if args.steps is not None:
        config = config.with_steps(args.steps)
    config = config.resumable()  # an interrupted run resumes, as a study's trials do
    out = args.out if args.out is not None else studies_root() / "runs" / Path(args.config).stem
    best, last = out / "best.pt", out / "last.pt"
    check_can_create(best)
    # A finished run's best.pt is refused before any data is packed; last.pt is an interrupted run.
    if not args.force and best.exists() and not last.exists():
        raise UserError(
            f"{best}: a finished run's checkpoint (or a file in its place) is already there; pass --force "
            "to replace it or --out elsewhere"
        )
    # torch from here on: a bad config or --out above is refused without importing it (seconds)
    from rich.markup import escape

    from search.data import open_data, unvalidated_note
    from search.devices import resolve_device
    from search.progress import console
    from search.synth import default_set
    from search.train import start_step, train
    from search.trainview import TrainView

    device = resolve_device(args.device)
    data = open_data(
        args.data if args.data is not None else default_set(not args.quiet), progress=not args.quiet
    )
    step = start_step(out, config, data, args.force)
    start = f"resuming from step {step} ({last})" if step else "from step 0"
    console.print(f"Training {args.config} on {device} for {config.train.steps} steps, {start} -> {best}")
    if config.train.warmup_steps >= config.train.steps:
        console.print(
            f"[yellow]note: {config.train.steps} steps is within warmup_steps ({config.train.warmup_steps}): "
            "the learning rate never reaches its peak"
        )
    if note := unvalidated_note(data):
        console.print(f"[yellow]note: {escape(note)}")
    longest = int(data.lengths[data.labelled].max())
    if config.train.segment_len > longest:  # 242 s for 20 steps at 5000 frames, 0.2 s at 64
        console.print(
            f"[yellow]note: segment_len {config.train.segment_len} is longer than every labelled utterance "
            f"(the longest has {longest} frames): each crop is padded to it, and the padding costs time"
        )
    try:
        with TrainView(config.train.steps, enabled=not args.quiet) as view:
            result = train(config, data, device, report=view.report, out_dir=out, log_every=args.log_every)
    except KeyboardInterrupt:  # say what a re-run will do: resume, or start over
        every = config.train.checkpoint_steps
        console.print(
            f"{last} holds the last checkpoint: run the same command to resume from it"
            if last.exists()
            else f"stopped before the first checkpoint (every {every} steps): nothing was saved; "
            "the same command starts from step 0"
        )
        raise
    console.print(
        f"[green]best valid accuracy {result.best_accuracy:.4f} at step {result.best_step}; "
        f"{result.parameters:,} parameters; {result.steps_per_s:.1f} steps/s ({result.step_mode}); "
        f"checkpoint {result.checkpoint}"
    )
    console.print("time: " + ", ".join(f"{phase} {sec:.1f} s" for phase, sec in result.seconds.items()))
    return 0


def _gpu_list(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1 - got '{text}'") from None
    if not gpus:  # "" or ",": ran on the CPU without a word
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1 - got '{text}' (none)")
    if any(g < 0 for g in gpus):
        raise argparse.ArgumentTypeError(f"GPU indices must be >= 0, got '{text}'")
    return gpus


def _trial_list(text: str) -> set[int]:
    try:
        numbers = {int(part) for part in text.split(",") if part.strip()}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected trial numbers like 3,7 - got '{text}'") from None
    if not numbers or any(n < 0 for n in numbers):
        raise argparse.ArgumentTypeError(f"expected trial numbers (0 or more) like 3,7 - got '{text}'")
    return numbers


def cmd_run(args: argparse.Namespace) -> int:
    from search.display import RunView, best_table
    from search.progress import console
    from search.study import RunOptions, run
    from search.supervise import WorkersStopped

    opts = RunOptions(
        space=args.space,
        trials=args.trials,
        data=args.data,
        study=args.study,
        storage=args.storage,
        gpus=args.gpus,
        per_gpu=args.per_gpu,
        workers=args.workers,
        steps=args.steps,
        seed=args.seed,
        allow_changed=args.allow_changed,
        heartbeat=args.heartbeat,
        max_failures=args.max_failures,
        display=not args.quiet,
    )
    idle: list[str] = []
    try:
        with RunView(args.trials, enabled=not args.quiet) as view:
            counts = run(opts, on_update=view.update, on_nothing=idle.append)
    except WorkersStopped:
        console.print(
            "[yellow]Stopped: running trials were marked and will resume when you run the same command "
            "again (or at once, in another machine's run of the study), from their last checkpoint (or "
            "from the start if they had not written one yet)."
        )
        raise
    except KeyboardInterrupt:
        console.print(
            "[yellow]Stopped while no trial of this run was running; run the same command to go on."
        )
        raise
    if idle:  # the study already holds --trials finished trials: no worker was started
        console.print(idle[0], markup=False, highlight=False, soft_wrap=True)
        return 0
    if view.last is not None:  # the study as the run's last update showed it (none with --quiet)
        console.print(best_table(view.last[0], 5))
    console.print(
        f"[green]finished {counts.finished} trial{'' if counts.finished == 1 else 's'} "
        f"(complete {counts.complete}, pruned {counts.pruned}),"
        f" failed {counts.failed}" + (f", retried {counts.retried}" if counts.retried else "")
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from search.display import best_table, counts_line, disk_line, failures_table, retries_table
    from search.progress import output
    from search.storage import artifact_dir, mask_url, resolve
    from search.trials import count_trials

    _, study, url = resolve(args.study, args.storage)
    output.print(best_table(study, args.top, width=output.width))
    trials = study.get_trials(deepcopy=False)  # one read for both views below
    for table in (retries_table(trials), failures_table(trials)):
        if table is not None:
            output.print(table)
    output.print(counts_line(count_trials(trials)))
    disk = disk_line(artifact_dir(study))
    if disk is not None:
        output.print(disk)
    output.print(f"[dim]storage {mask_url(url)}")  # never a password on screen
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from search import dashboard
    from search.dashboard import ReadOnlyArtifactStore
    from search.progress import console
    from search.storage import artifact_dir, resolve

    if not 1 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: must be a TCP port between 1 and 65535")
    storage, study, url = resolve(args.study, args.storage)
    dashboard.check_bind(args.host, args.port)
    shown_host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address, as URLs write it
    if not dashboard.is_loopback(args.host):
        console.print(
            f"[yellow]Warning: --host {args.host} exposes the dashboard to every network this machine (or "
            "container) is on; in a container, publish its port on 127.0.0.1 only, as docker-compose.yml "
            "does."
        )
    console.print(
        f"optuna-dashboard for '{study.study_name}' on http://{shown_host}:{args.port}/ (Ctrl-C stops)"
    )
    # The recorded folder is only read: a machine that does not mount it still shows the study.
    store = ReadOnlyArtifactStore(storage, artifact_dir(study))
    dashboard.serve(storage, artifact_store=store, host=args.host, port=args.port)
    return 0


def cmd_export_top(args: argparse.Namespace) -> int:
    from search.data import open_data
    from search.export import (
        check_data_folder,
        check_export_target,
        default_export_dir,
        export_top,
        render_export,
        study_cache_root,
        study_data_root,
    )
    from search.progress import console, output
    from search.storage import resolve

    _, study, _ = resolve(args.study, args.storage)
    out = args.out or default_export_dir(study, args.strategy, args.k, args.include_pruned)
    check_export_target(out, args.force)  # before the data set is opened (packed, if new: minutes)
    if args.data is not None:
        check_data_folder(study, args.data)  # another set is refused before minutes of packing it
    cache = study_cache_root(study)
    data = open_data(args.data, cache, progress=not args.quiet) if args.data is not None else None
    recorded = study_data_root(study) if args.data is None else None
    if recorded is not None and not args.quiet:
        console.print(
            f"No --data given: using the data set study '{study.study_name}' was run on, {recorded}"
        )
    result = export_top(
        study,
        args.k,
        out=out,
        strategy=args.strategy,
        include_pruned=args.include_pruned,
        force=args.force,
        data=data,
        exclude=args.exclude,
    )
    output.print(render_export(result))
    console.print(f"[green]{'replaced' if result.replaced else 'wrote'} {result.out}")
    return 0


def cmd_vote(args: argparse.Namespace) -> int:
    from search.manifest import export_cache_root, export_data_root
    from search.progress import console, output
    from search.submission import preflight

    manifest = preflight(args.out, args.force, export_dir=args.export_dir)
    assert manifest is not None  # an export was given
    root = args.data if args.data is not None else export_data_root(manifest)
    from search.data import check_index, open_data  # torch: after the checks that need none
    from search.devices import resolve_device
    from search.vote import export_speakers, render_vote, vote

    device = resolve_device(args.device)  # a wrong --device is refused before a data set is packed
    if args.data is not None:
        whose = f"the export's study '{manifest.study}'"
        fix = "pass the data folder it was run on, or a set of the same speakers (its mapping.json)"
        check_index(  # the export's speakers (its members hashed, one read) only for another set
            args.data,
            manifest.data_index,
            whose,
            manifest.data_root,
            fix,
            lambda: export_speakers(args.export_dir, manifest),
        )
    if args.data is None and not args.quiet:
        console.print(f"No --data given: using the data set the export's study was run on, {root}")
    data = open_data(root, progress=not args.quiet, reuse_from=export_cache_root(manifest))
    result = vote(args.export_dir, data, args.out, method=args.method, device=device, force=args.force)
    output.print(render_vote(result))
    console.print(f"[green]wrote {result.out} ({result.n_test} test rows)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from search.data import open_data
    from search.devices import resolve_device
    from search.progress import console, output
    from search.submission import preflight
    from search.vote import predict, render_vote

    preflight(args.out, args.force, checkpoint=args.checkpoint)
    device = resolve_device(args.device)  # a wrong --device is refused before a data set is packed
    data = open_data(args.data, progress=not args.quiet)
    result = predict(args.checkpoint, data, args.out, device=device, force=args.force)
    output.print(render_vote(result))
    console.print(f"[green]wrote {result.out} ({result.n_test} test rows)")
    return 0


# --------------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a wrong argument is one line that says where the help is, as every other error.

    Why: argparse printed the command's whole usage (six wrapped lines for ``run``) above the error, so
    the one line that said what was wrong was the last of seven.
    """

    def error(self, message: str) -> NoReturn:
        options = list(self._option_string_actions)
        unknown = [  # argparse takes a unique prefix too (--tri for --trials): that is known
            name
            for name in (token.split("=")[0] for token in _given if token.startswith("--"))
            if not any(option.startswith(name) for option in options)
        ]
        if unknown and message.startswith(("the following arguments are required", "unrecognized")):
            # A misspelt --trials was reported as --trials missing, the misspelling not named.
            import difflib  # here: every command's start-up imports this module

            names = [o[2:] for o in options if o.startswith("--")]  # the letters alone
            guess = difflib.get_close_matches(unknown[0][2:], names, n=1, cutoff=0.75)
            hint = f" (did you mean --{guess[0]}?)" if guess and len(unknown) == 1 else ""
            message = f"unrecognized argument{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}{hint}"
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


_given: list[str] = []  # the arguments main() parses, for _Parser.error's account of a misspelt option


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="spkid-search",
        description="Find, train and ensemble speaker-identification models on the HW4 feature set "
        "(or your own audio). Studies live in an Optuna SQL database (SQLite by default).",
    )
    parser.add_argument("--version", action="version", version="%(prog)s 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "synth",
        help="generate a synthetic data set in the exact HW4 layout",
        description="Write a synthetic speaker set in the HW4 layout (mapping.json, metadata.json, "
        "testdata.json, uttr-*.pt) plus answers.csv so test accuracy can be scored.",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="folder to create (must be new or empty; see --force)"
    )
    p.add_argument("--force", action="store_true", help="replace an earlier synth output in --out")
    p.add_argument(
        "--preset",
        choices=("tiny", "small", "hw4"),
        default="small",
        help="size: tiny (8 speakers, 96 labelled + 16 test utterances; tests), small (40, 2,400 + 400; "
        "minutes on CPU), hw4 (600, 56,666 + 8,000: the real set's size); default small",
    )
    p.add_argument(
        "--speakers", type=_non_negative, help="override the preset's number of speakers (2 or more)"
    )
    p.add_argument(
        "--utterances",
        type=_non_negative,
        help="override the preset's labelled utterances, in all (at least 3 per speaker)",
    )
    p.add_argument("--test", type=_non_negative, help="override the preset's test utterances (0 or more)")
    p.add_argument(
        "--seed", type=_non_negative, default=0, help="random seed (same seed, same files; default 0)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "prepare",
        help="compute HW4 features from your own audio (a speaker folder tree or a CSV list)",
        description="Turn AUDIO_DIR/<speaker>/[<session>/]<utt>.wav|.flac (or a CSV with header "
        "'path,speaker') into the HW4 layout: mono 16 kHz, peak -3 dB, silence removed, 40 log-mels. "
        "Bad files are skipped and listed; re-running resumes where it stopped.",
    )
    p.add_argument(
        "audio",
        type=Path,
        metavar="AUDIO_DIR",
        help="folder of speaker folders, or a CSV file list with header path,speaker "
        "(paths relative to the CSV's folder)",
    )
    p.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder to write: new, empty, or an earlier prepare's output (resumes it)",
    )
    test = p.add_mutually_exclusive_group()
    test.add_argument(
        "--test-per-speaker",
        type=_non_negative,
        metavar="N",
        help="held-out test utterances per speaker (default 1; 0 keeps every file for training)",
    )
    test.add_argument(
        "--test-fraction",
        type=_fraction,
        metavar="F",
        help="held-out fraction of each speaker's utterances instead (0 < F < 1; at least 1 utterance each)",
    )
    p.add_argument(
        "--workers",
        type=_positive,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="parallel processes (default: CPU cores, at most 8)",
    )
    p.add_argument(
        "--seed",
        type=_non_negative,
        default=0,
        help="seed for file names, speaker ids and the test split (same seed, same output; default 0)",
    )
    p.add_argument(
        "--min-utterances",
        type=_positive,
        default=2,
        help="leave out speakers with fewer usable files (default 2: one to train, one to test)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="re-prepare a finished --out from another AUDIO_DIR, or with another --seed, split option or "
        "--min-utterances (studies made on it will refuse it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="train one configuration (a YAML of fixed values)",
        description="Train one configuration with a live progress bar; writes best.pt (best validation "
        "accuracy, with its config) under --out. --config strong (or simple, medium, boss) trains a "
        "shipped baseline.",
    )
    p.add_argument(
        "--config",
        type=Path,
        required=True,
        help="YAML config file, or a shipped baseline's name: simple, medium, strong, boss "
        "(spaces/baselines/)",
    )
    p.add_argument("--data", type=Path, help="HW4 data folder (default: a generated synthetic set)")
    p.add_argument("--out", type=Path, help="output folder (default studies/runs/<config name>)")
    p.add_argument(
        "--steps",
        type=_positive,
        help="override the config's number of training steps (its warm-ups are scaled to match; it "
        "validates at least twice)",
    )
    p.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--log-every", type=_positive, default=50, help="progress update interval in steps (default 50)"
    )
    p.add_argument(
        "--force", action="store_true", help="start over in --out, replacing a finished or interrupted run"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "run",
        help="run (or resume) a hyperparameter search study",
        description="Sample configurations from a search space and train them as trials of an Optuna study "
        "(SQLite under studies/<study>/ by default, or --storage postgresql://...). One worker process per "
        "GPU running --per-gpu trials at once, or --workers CPU workers. Re-running the same command "
        "resumes until --trials are finished.",
    )
    p.add_argument(
        "--space", required=True, help="search space: a name in spaces/ (boss, smoke...) or a path"
    )
    p.add_argument("--trials", type=_positive, required=True, help="finished trials the study should hold")
    p.add_argument(
        "--data",
        type=Path,
        help="HW4 data folder (default: the set the study was run on; for a new study, a generated "
        "synthetic set)",
    )
    p.add_argument("--study", help="study name (default: the space's name)")
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument("--gpus", type=_gpu_list, help="GPU indices to use, e.g. 0,1 (default: all visible)")
    p.add_argument(
        "--per-gpu",
        type=_positive,
        help="trials run at once on each GPU, as threads of one worker process whose kernels overlap "
        "(default 4: measured 1.5x the trial-steps/s of one trial; 8 gained nothing more)",
    )
    p.add_argument("--workers", type=_positive, help="CPU workers when no GPU is used (default 1)")
    p.add_argument(
        "--steps",
        type=_positive,
        metavar="N",
        help="train every trial N steps instead of the space's steps (warm-ups and the pruner's step "
        "options scaled to match, valid_steps at most N/2); the study records it and refuses another "
        "value later unless --allow-changed",
    )
    p.add_argument(
        "--seed",
        type=_non_negative,
        help="seed the sampler (added to the space's sampler seed, if it has one): the same seed makes the "
        "same search; default: the space's seed, else unseeded",
    )
    p.add_argument(
        "--heartbeat",
        type=_positive,
        help="seconds between worker heartbeats (default: the space's study: {heartbeat_interval}, else 20)",
    )
    p.add_argument(
        "--max-failures",
        type=_positive,
        help="stop after this many failed trials (default: --trials, at least 3)",
    )
    p.add_argument(
        "--allow-changed",
        action="store_true",
        help="continue a study although its data set, split, space or --steps changed",
    )
    p.add_argument("--quiet", action="store_true", help="no live display")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "status",
        help="show a study's best trials and counts",
        description="Print a table of the best finished trials and the trial counts.",
    )
    p.add_argument(
        "--study", help="study name (optional when ./studies, or $SPKID_SEARCH_STUDIES, holds only one)"
    )
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument("--top", type=_positive, default=10, help="rows to show (default 10)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "dashboard",
        help="open optuna-dashboard on a study",
        description="Serve optuna-dashboard for the study's storage and artifact store "
        "(checkpoints), bound to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument(
        "--study", help="study name (optional when ./studies, or $SPKID_SEARCH_STUDIES, holds only one)"
    )
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_positive, default=8080, help="port (default 8080)")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser(
        "export-top",
        help="export the best K trials of a study as a checked ensemble folder",
        description="Copy the K best finished trials' checkpoints (verified against their recorded sha256) "
        "with a manifest.json into export/<strategy><K>/ in the study's folder (studies/<study>, where its "
        "first run put it, from any working folder). --strategy greedy runs Caruana "
        "ensemble selection on the study's validation split (K caps the distinct members).",
    )
    p.add_argument("k", type=_positive, metavar="K", help="number of members (greedy: at most K distinct)")
    p.add_argument(
        "--study", help="study name (optional when ./studies, or $SPKID_SEARCH_STUDIES, holds only one)"
    )
    p.add_argument("--storage", help=STORAGE_HELP)
    p.add_argument(
        "--out",
        type=Path,
        help="export folder (default <study folder>/export/<strategy><K>, plus -with-pruned with "
        "--include-pruned)",
    )
    p.add_argument("--strategy", choices=("top", "greedy"), default="top", help="top (default) or greedy")
    p.add_argument(
        "--include-pruned", action="store_true", help="also use PRUNED trials that kept a checkpoint"
    )
    p.add_argument("--force", action="store_true", help="replace an existing export (atomically)")
    p.add_argument(
        "--exclude",
        type=_trial_list,
        default=set(),
        metavar="N[,N...]",
        help="leave these trials out (e.g. one whose stored checkpoint is lost)",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="HW4 data folder for scoring on validation (default: the folder the study trained on)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export_top)

    p = sub.add_parser(
        "vote",
        help="score the test set with an exported ensemble and write the Kaggle CSV",
        description="Verify an export's checksums, run every member on whole utterances, combine "
        "(soft: calibrated mean probability; hard: majority; weighted: by weight x validation accuracy) "
        "and write Id,Category rows in testdata.json order.",
    )
    p.add_argument("export_dir", type=Path, metavar="EXPORT_DIR", help="folder written by export-top")
    p.add_argument(
        "--data",
        type=Path,
        help="HW4 data folder (default: the one the study trained on; or another set of the same speakers)",
    )
    p.add_argument(
        "--out", type=Path, default=Path("submission.csv"), help="CSV to write (default submission.csv)"
    )
    p.add_argument("--method", choices=("soft", "hard", "weighted"), default="soft", help="default soft")
    p.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--force", action="store_true", help="replace an earlier submission CSV at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_vote)

    p = sub.add_parser(
        "predict",
        help="write the Kaggle CSV for one checkpoint",
        description="Run one checkpoint on the test set of --data (whole utterances, batched) and write "
        "Id,Category rows in testdata.json order; reports validation and, with answers.csv, test accuracy.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a best.pt or an export's trial-N.pt")
    p.add_argument(
        "--data",
        type=Path,
        required=True,
        help="HW4 data folder the model was trained on, or another set of the same speakers",
    )
    p.add_argument("--out", type=Path, required=True, help="CSV to write, e.g. submission.csv")
    p.add_argument("--device", type=_device, default="auto", help=DEVICE_HELP)
    p.add_argument("--force", action="store_true", help="replace an earlier submission CSV at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    for command in sub.choices.values():  # an unknown option is reported with its command's name
        command.set_defaults(command_parser=command)
    return parser


_stopped_by = {"signal": int(signal.SIGINT)}  # the stop main() reports, for its exit status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # bare `spkid-search`: what it can do
        parser.print_help(sys.stderr)
        return 2
    _given[:] = sys.argv[1:] if argv is None else argv
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    handler: Handler = args.func

    _stopped_by["signal"] = int(signal.SIGINT)

    def on_term(signum: int, frame: object) -> None:
        _stopped_by["signal"] = signum
        raise KeyboardInterrupt  # SIGTERM stops as cleanly as Ctrl-C

    signal.signal(signal.SIGTERM, on_term)
    try:
        with (
            lost_stops_redelivered(lambda: _stopped_by["signal"]),
            imports_with_stops_deferred(),
        ):
            return handler(args)
    except UserError as exc:
        message = exc.message.removeprefix(f"{args.command}: ")  # library errors may name the command too
        print(f"spkid-search {args.command}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except (ImportError, OSError) as exc:
        from search.errors import broken_install
        from search.files import disk_full

        why = broken_install(exc)
        if why:
            print(
                f"spkid-search {args.command}: error: torch/torchaudio cannot be loaded ({why}); reinstall "
                "the versions pyproject.toml pins: pip install --force-reinstall -e <this repository>",
                file=sys.stderr,
            )
            return 1
        if not isinstance(exc, OSError) or not disk_full(exc):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        print(
            f"spkid-search {args.command}: error: no space left on device{where}; free space and run the "
            "same command again (files are written whole or not at all; train resumes from its last "
            "checkpoint)",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print(f"spkid-search {args.command}: interrupted", file=sys.stderr)
        return 128 + _stopped_by["signal"]  # 130 after Ctrl-C, 143 after SIGTERM, as shells report them


def entry() -> None:
    """The ``spkid-search`` command: :func:`main`, then an exit that skips collecting what it made.

    Why: with torch imported, the interpreter's teardown (cyclic garbage collections while modules are
    cleared) took 1.1-1.7 s on the 2-core dev VM after the command had finished. Frozen objects are left
    out of those collections; atexit handlers and the flushing of output run as usual.
    """
    try:
        code = main()
    except KeyboardInterrupt:
        # A second stop that landed while main() reported the first: it died of an unhandled
        # KeyboardInterrupt (traceback, then killed by SIGINT) after printing "interrupted".
        code = 128 + _stopped_by["signal"]
    # The work is done and reported: a Ctrl-C or SIGTERM from here on must not turn it into a failure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
