"""Bad and hostile input to every command, table-driven.

One small real study (two trials) and its export are built once for the module; every case then runs
the command line (what ``python -m search.cli ...`` runs) in a process of its own against it and must
end with a non-zero exit, exactly one short line on stderr that names the file or key at fault and says
what to do, and no traceback. Every file under ``studies/`` is hashed before and after the whole
corpus: no case may change a study, a checkpoint or an export, and none may execute the pickle payloads
planted in tensor files.

The cases run a few at a time, each forked from a process that has imported torch (a new interpreter
per case spent most of its time importing it).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_exit
from pathlib import Path
from types import FrameType
from typing import Any, cast

import pytest
import torch
import yaml

from search.export import export_top
from search.storage import resolve
from search.study import RunOptions, run
from search.supervise import in_environment, worker_context
from tests.hw4fake import make_hw4
from tests.reliability.conftest import FIGURES, SPACE, DeadlineExceeded

CASE_TIMEOUT_S = 120
ARENA_DEADLINE_S = 480
PARALLEL = 3
MAX_LINE = 1000  # a message a person reads, not a dump


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # the arguments, split like a shell would; placeholders are filled in per token
    names: str  # the file, key or value the message must name
    fix: str  # words of the advice the message must give
    xfail: str = ""  # a known bug in a module this suite does not own (see the campaign report)

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.command)


# Placeholders: {tiny} the study's data, {fake} another data set, {export} the study's export folder,
# {attack} the folder of hostile files built below (outside studies/).
RUN = "run --quiet --space {attack}/ok.yaml --trials 2"
TRAIN = "train --quiet --config {attack}/config.yaml --data"
VOTE = "vote --quiet --data {tiny}"
PREDICT = "predict --quiet --data {tiny} --out {attack}/p.csv"
CASES = [
    # run: search spaces
    Case(
        "run-space-missing", "run --quiet --space {attack}/none.yaml --trials 2", "none.yaml", "no such file"
    ),
    Case("run-without-quiet", "run --space {attack}/none.yaml --trials 2", "none.yaml", "no such"),
    Case(
        "run-space-truncated",
        "run --quiet --space {attack}/truncated.yaml --trials 2",
        "truncated.yaml",
        "malformed",
    ),
    Case(
        "run-space-not-a-mapping",
        "run --quiet --space {attack}/list.yaml --trials 2",
        "list.yaml",
        "expected a mapping",
    ),
    Case(
        "run-space-python-tag",
        "run --quiet --space {attack}/python-tag.yaml --trials 2",
        "python-tag.yaml",
        "malformed",
    ),
    Case(
        "run-space-code",
        "run --quiet --space {attack}/code.yaml --trials 2",
        "constraints",
        "only arithmetic",
    ),
    Case(
        "run-space-low-above-high",
        "run --quiet --space {attack}/inverted.yaml --trials 2",
        "params.d_model",
        "> high",
    ),
    Case(
        "run-space-unknown-key",
        "run --quiet --space {attack}/unknown.yaml --trials 2",
        "params.frobnicate",
        "unknown",
    ),
    Case(
        "run-space-bare-list",
        "run --quiet --space {attack}/bare-list.yaml --trials 2",
        "params.pooling",
        "choices:",
    ),
    Case(
        "run-space-unsatisfiable",
        "run --quiet --space {attack}/never.yaml --trials 2",
        "never.yaml",
        "never held",
    ),
    Case(
        "run-space-alias-bomb",
        "run --quiet --space {attack}/bomb.yaml --trials 2",
        "pooling",
        "not valid",
    ),
    # run: numbers, names, storage, data
    Case(
        "run-trials-absurd",
        "run --quiet --space {attack}/ok.yaml --trials 5000000",
        "--trials 5000000",
        "at most",
    ),
    Case("run-steps-absurd", f"{RUN} --steps 999999999", "--steps 999999999", "at most"),
    Case("run-workers-absurd", f"{RUN} --workers 5000", "5000 workers", "at most 64"),
    Case("run-gpu-absent", f"{RUN} --gpus 7", "--gpus: GPU 7", "not visible"),
    Case("run-study-escapes", f"{RUN} --study ../evil", "'../evil'", "letters, digits"),
    Case("run-storage-scheme", f"{RUN} --storage redis://x", "redis://x", "expected sqlite:///"),
    Case(
        "run-storage-unreachable",
        f"{RUN} --quiet --data {{tiny}} --storage postgresql://nobody:hunter2@127.0.0.1:1/none",
        "nobody:***@127.0.0.1:1",
        "cannot connect",
    ),
    Case(
        "run-storage-folder-missing",
        f"{RUN} --quiet --data {{tiny}} --storage sqlite:////proc/spkid/study.db",
        "/proc/spkid",
        "does not exist; correct the path, or create the folder",
    ),
    Case(
        "run-other-data-set",
        "run --quiet --space {attack}/fix.yaml --study fix --trials 3 --data {fake}",
        "study 'fix'",
        "--allow-changed",
    ),
    Case(
        "run-pickle-in-data",
        f"{RUN} --quiet --study fresh --data {{attack}}/evil-data",
        "uttr-",
        "restore it, or delete it and its entry in metadata.json",
    ),
    # train
    Case(
        "train-config-wrong-type",
        "train --quiet --config {attack}/wrong-type.yaml",
        "'d_model'",
        "must be int",
    ),
    Case("train-steps-absurd", f"{TRAIN} {{tiny}} --steps 999999999", "'steps'", "at most 10,000,000"),
    Case("train-data-wrong-shape", f"{TRAIN} {{attack}}/shape-data", "n_mels mismatch", "metadata says 40"),
    Case("train-data-path-escapes", f"{TRAIN} {{attack}}/escape-data", "feature_path", "plain file name"),
    Case(
        "train-data-truncated-json", f"{TRAIN} {{attack}}/truncated-data", "metadata.json", "restore the file"
    ),
    # status and dashboard
    Case("status-unknown-study", "status --study nope", "study 'nope'", "check --study"),
    Case("status-study-escapes", "status --study ../fix", "'../fix'", "letters, digits"),
    Case("status-study-newline", "status --study evil{nl}name", "'evil\\nname'", "letters, digits"),
    Case(
        "status-storage-typo",
        "status --storage sqlite:///studies/typo.db",
        "studies/typo.db",
        "check the path",
    ),
    Case("status-storage-scheme", "status --storage mongodb://x", "mongodb://x", "expected sqlite:///"),
    Case("dashboard-unknown-study", "dashboard --study nope", "study 'nope'", "check --study"),
    Case("dashboard-study-escapes", "dashboard --study ../../etc", "'../../etc'", "letters, digits"),
    Case("dashboard-port-absurd", "dashboard --study fix --port 70000", "70000", "65535"),
    # export-top
    Case("export-unknown-study", "export-top 1 --quiet --study nope", "study 'nope'", "check --study"),
    Case("export-k-absurd", "export-top 5000 --quiet --study fix", "K=5000", "lower K"),
    Case("export-already-there", "export-top 2 --quiet --study fix", "top2", "--force"),
    Case(
        "export-greedy-other-data",
        "export-top 1 --quiet --study fix --strategy greedy --data {fake} --out {attack}/greedy",
        "--data",
        "pass that folder",
    ),
    # vote
    Case("vote-folder-missing", f"{VOTE} {{attack}}/no-export", "no-export", "export-top"),
    Case("vote-manifest-missing", f"{VOTE} {{attack}}/empty-export", "manifest.json", "export-top"),
    Case(
        "vote-manifest-truncated", f"{VOTE} {{attack}}/x-truncated", "manifest.json", "re-create the export"
    ),
    Case("vote-member-tampered", f"{VOTE} {{attack}}/x-tampered", "trial-", "re-export"),
    Case("vote-member-missing", f"{VOTE} {{attack}}/x-missing", "trial-", "restore the file"),
    Case("vote-path-dotdot", f"{VOTE} {{attack}}/x-dotdot", "../../", "escapes the export folder"),
    Case("vote-path-absolute", f"{VOTE} {{attack}}/x-absolute", "/etc/passwd", "escapes the export folder"),
    Case("vote-path-symlink", f"{VOTE} {{attack}}/x-symlink", "resolves outside", "copy the checkpoint"),
    Case("vote-member-pickle", f"{VOTE} {{attack}}/x-pickle", "trial-", "unsafe"),
    Case("vote-member-tensor", f"{VOTE} {{attack}}/x-tensor", "trial-", "not an spkid-search checkpoint"),
    Case("vote-other-data-set", "vote --quiet {export} --data {fake}", "--data", "pass the data folder"),
    Case("vote-out-exists", f"{VOTE} {{export}} --out {{attack}}/existing.csv", "existing.csv", "--force"),
    # predict
    Case("predict-missing", f"{PREDICT} {{attack}}/none.pt", "none.pt", "not found"),
    Case("predict-pickle-payload", f"{PREDICT} {{attack}}/evil-zip.pt", "evil-zip.pt", "unsafe"),
    Case("predict-legacy-pickle", f"{PREDICT} {{attack}}/evil-raw.pt", "evil-raw.pt", "unsafe"),
    Case("predict-truncated", f"{PREDICT} {{attack}}/truncated.pt", "truncated.pt", "corrupt"),
    Case(
        "predict-wrong-shape",
        f"{PREDICT} {{attack}}/wrong-shape.pt",
        "wrong-shape.pt",
        "weights do not match",
    ),
    # synth and prepare
    Case("synth-speakers-absurd", "synth --quiet --out {attack}/s --speakers 5000000", "speakers", "100000"),
    Case("synth-out-not-empty", "synth --quiet --out {attack}/evil-data --preset tiny", "evil-data", "empty"),
    Case(
        "prepare-audio-missing", "prepare --quiet {attack}/no-audio --out {attack}/prep", "no-audio", "AUDIO"
    ),
    Case(
        "prepare-csv-bad-header", "prepare --quiet {attack}/list.csv --out {attack}/prep", "list.csv", "path,"
    ),
]


# --------------------------------------------------------------------------------------------------
# The arena: a real study and export to attack, and the hostile files
# --------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: proof of execution if the marker ever appears."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _command_line(args: list[str], cwd: str, out: str, err: str) -> None:
    """What ``python -m search.cli ARGS`` does once its imports are done, its output to two files."""
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    from search.cli import main

    raise SystemExit(main(args))  # multiprocessing exits with its code, or prints a traceback and exits 1


# The cases run from several threads. Process.start() polls every child this process started, and a
# poll reads the exit code from the fork server's pipe once: one racing another thread's poll of the
# same child found the pipe empty, and multiprocessing then reports exit code 255. Starting and polling
# under one lock keeps each read whole.
_CHILDREN = threading.Lock()


def _exitcode(proc: Any) -> int | None:
    with _CHILDREN:
        return cast(int | None, proc.exitcode)


def _cli(args: list[str], cwd: Path, env: dict[str, str], timeout: float = CASE_TIMEOUT_S) -> Any:
    """A case's command in a process of its own, forked from run's fork server: a new interpreter per
    case would import torch again each time (most of this corpus's time, for 59 cases)."""
    name = uuid.uuid4().hex[:8]
    out, err = cwd / f"case-{name}.out", cwd / f"case-{name}.err"
    case = (args, str(cwd), str(out), str(err))
    proc = worker_context().Process(target=in_environment, args=(env, _command_line, *case))  # as run's
    with _CHILDREN:
        proc.start()
    deadline = time.monotonic() + timeout
    while (code := _exitcode(proc)) is None and time.monotonic() < deadline:
        wait_for_exit([proc.sentinel], deadline - time.monotonic())
    if code is None:
        proc.kill()
        proc.join()
        raise subprocess.TimeoutExpired(args, timeout)
    done = subprocess.CompletedProcess(args, code, out.read_text(), err.read_text())
    out.unlink()
    err.unlink()
    return done


def _tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``; a SQLite database by its content as SQLite reads it.

    A process that opens a study read-only may leave SQLite's ``-wal``/``-shm`` companions behind (an
    empty log and an index); they hold no study data, so they are skipped, and ``*.db`` is hashed
    through a dump that includes anything committed to the log, so a real write is still caught.
    """
    out = {}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.is_symlink() or path.name.endswith(("-wal", "-shm", "-journal")):
            continue
        if path.suffix == ".db":
            with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
                body = "\n".join(con.iterdump()).encode()
        else:
            body = path.read_bytes()
        out[str(path.relative_to(root))] = hashlib.sha256(body).hexdigest()
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _export_copy(export: Path, attack: Path, name: str) -> tuple[Path, dict[str, Any]]:
    target = attack / name
    shutil.copytree(export, target)
    return target, json.loads((target / "manifest.json").read_text())


def _build_attack(attack: Path, export: Path, marker: Path) -> None:
    attack.mkdir()
    ok = {**SPACE, "name": "ok"}
    (attack / "ok.yaml").write_text(yaml.safe_dump(ok))
    (attack / "truncated.yaml").write_text("name: cut\nparams:\n  d_model: {low: 16, hi")
    (attack / "list.yaml").write_text("- d_model\n- heads\n")
    (attack / "python-tag.yaml").write_text(f"params: !!python/object/apply:os.mkdir ['{marker}']\n")
    code = {**ok, "constraints": [f"__import__('os').mkdir('{marker}')"]}
    (attack / "code.yaml").write_text(yaml.safe_dump(code))
    inverted = {**ok, "params": {**ok["params"], "d_model": {"low": 64, "high": 16}}}
    (attack / "inverted.yaml").write_text(yaml.safe_dump(inverted))
    (attack / "unknown.yaml").write_text(yaml.safe_dump({**ok, "params": {**ok["params"], "frobnicate": 1}}))
    bare = {**ok, "params": {**ok["params"], "pooling": ["mean", "attention"]}}
    (attack / "bare-list.yaml").write_text(yaml.safe_dump(bare))
    (attack / "never.yaml").write_text(yaml.safe_dump({**ok, "constraints": ["d_model > 1000"]}))
    names = "abcdef"  # six levels of nine: 531,441 strings from a 300-byte file
    bomb = "name: bomb\ndescription:\n  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, len(names)):
        bomb += f"  - &{names[i]} [" + ", ".join(["*" + names[i - 1]] * 9) + "]\n"
    (attack / "bomb.yaml").write_text(bomb + f"params:\n  steps: 10\n  pooling: {{choices: *{names[-1]}}}\n")
    config = {k: v for k, v in ok["params"].items() if not isinstance(v, dict)}
    config.update({"d_model": 16, "lr": 1e-3, "pooling": "mean", "steps": 4, "valid_steps": 4})
    (attack / "config.yaml").write_text(yaml.safe_dump(config))
    (attack / "wrong-type.yaml").write_text(yaml.safe_dump({**config, "d_model": "many"}))
    (attack / "existing.csv").write_text("Id,Category\n")
    (attack / "list.csv").write_text("file,who\na.wav,x\n")
    (attack / "empty-export").mkdir()

    # Data sets with one hostile file each (hand-built: exact control over every file).
    for name in ("evil-data", "shape-data", "escape-data", "truncated-data"):
        make_hw4(attack / name, speakers=3, per_speaker=4, test=2)
    victim = json.loads((attack / "evil-data" / "metadata.json").read_text())
    first = next(iter(victim["speakers"].values()))[0]["feature_path"]
    torch.save(Payload(marker), attack / "evil-data" / first)
    meta = json.loads((attack / "shape-data" / "metadata.json").read_text())
    entry = next(iter(meta["speakers"].values()))[0]
    torch.save(torch.zeros(entry["mel_len"], 20), attack / "shape-data" / entry["feature_path"])
    meta = json.loads((attack / "escape-data" / "metadata.json").read_text())
    next(iter(meta["speakers"].values()))[0]["feature_path"] = "../../studies/fix/study.db"
    (attack / "escape-data" / "metadata.json").write_text(json.dumps(meta))
    text = (attack / "truncated-data" / "metadata.json").read_text()
    (attack / "truncated-data" / "metadata.json").write_text(text[: len(text) // 2])

    # Checkpoints: a raw pickle payload, a truncated file, weights of the wrong shape, a bare tensor.
    members = sorted(export.glob("trial-*.pt"))
    real = members[0]
    (attack / "evil-raw.pt").write_bytes(__import__("pickle").dumps(Payload(marker)))
    torch.save(Payload(marker), attack / "evil-zip.pt")
    data = real.read_bytes()
    (attack / "truncated.pt").write_bytes(data[: len(data) // 2])
    ckpt = torch.load(real, weights_only=True)
    key = next(iter(ckpt["model"]))
    ckpt["model"][key] = torch.zeros(3, 3, 3)
    torch.save(ckpt, attack / "wrong-shape.pt")
    torch.save(torch.zeros(3, 3), attack / "tensor.pt")

    # Copies of the real export, each broken one way (the original under studies/ stays intact).
    folder, manifest = _export_copy(export, attack, "x-truncated")
    text = (folder / "manifest.json").read_text()
    (folder / "manifest.json").write_text(text[: len(text) // 2])
    folder, manifest = _export_copy(export, attack, "x-foreign")
    (folder / "manifest.json").write_text(json.dumps({**manifest, "format": "somebody-else"}))
    folder, manifest = _export_copy(export, attack, "x-tampered")
    member = folder / manifest["members"][0]["file"]
    raw = bytearray(member.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    member.write_bytes(bytes(raw))
    folder, manifest = _export_copy(export, attack, "x-missing")
    (folder / manifest["members"][0]["file"]).unlink()
    for name, path in (
        ("x-dotdot", f"../../studies/fix/export/top2/{real.name}"),
        ("x-absolute", "/etc/passwd"),
    ):
        folder, manifest = _export_copy(export, attack, name)
        manifest["members"][0]["file"] = path
        (folder / "manifest.json").write_text(json.dumps(manifest))
    folder, manifest = _export_copy(export, attack, "x-symlink")
    outside = attack / "outside.pt"
    shutil.copy(folder / manifest["members"][0]["file"], outside)
    (folder / manifest["members"][0]["file"]).unlink()
    (folder / manifest["members"][0]["file"]).symlink_to(outside)
    for name, planted in (("x-pickle", attack / "evil-zip.pt"), ("x-tensor", attack / "tensor.pt")):
        folder, manifest = _export_copy(export, attack, name)
        target = folder / manifest["members"][0]["file"]
        shutil.copy(planted, target)
        manifest["members"][0]["sha256"] = _sha(target)  # a consistent manifest: only the loader can refuse
        (folder / "manifest.json").write_text(json.dumps(manifest))


@dataclass
class Arena:
    root: Path
    env: dict[str, str]
    studies_before: dict[str, str]
    results: dict[str, Any]
    marker: Path
    elapsed: float


@pytest.fixture(scope="module")
def arena(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, fake_dir: Path) -> Iterator[Arena]:
    def expired(signum: int, frame: FrameType | None) -> None:
        raise DeadlineExceeded(f"building and running the bad-input corpus took over {ARENA_DEADLINE_S} s")

    previous = signal.signal(signal.SIGALRM, expired)  # a module fixture is outside the per-test deadline
    signal.alarm(ARENA_DEADLINE_S)
    try:
        built = _arena(tmp_path_factory.mktemp("arena"), tiny_dir, fake_dir)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    yield built
    slowest = sorted(built.results.items(), key=lambda kv: -kv[1]["seconds"])[:6]
    print(f"\n{len(CASES)} bad inputs across every command in {built.elapsed:.0f} s; slowest: ", end="")
    print(", ".join(f"{name} {result['seconds']:.1f} s" for name, result in slowest))


def _arena(root: Path, tiny_dir: Path, fake_dir: Path) -> Arena:
    env = {
        **os.environ,
        "SPKID_SEARCH_CACHE": str(root / "cache"),
        "SPKID_SEARCH_DATA": str(root / "data"),
        "SPKID_SEARCH_STUDIES": str(root / "studies"),
        "PYTHONUNBUFFERED": "1",
    }
    space = {**SPACE, "name": "fix", "params": {**SPACE["params"], "steps": 20, "valid_steps": 10}}
    (root / "fix.yaml").write_text(yaml.safe_dump(space))
    with pytest.MonkeyPatch.context() as mp:  # built in-process (it is the target, not under test)
        mp.chdir(root)
        for key in ("SPKID_SEARCH_CACHE", "SPKID_SEARCH_DATA", "SPKID_SEARCH_STUDIES"):
            mp.setenv(key, env[key])
        run(RunOptions(space=str(root / "fix.yaml"), trials=2, data=tiny_dir, workers=2, display=False))
        export_top(resolve("fix", None)[1], 2)
    with sqlite3.connect(root / "studies/fix/study.db") as con:  # fold the WAL in: the file is at rest
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    export = root / "studies/fix/export/top2"
    attack = root / "attack"
    marker = root / "PAYLOAD-RAN"
    _build_attack(attack, export, marker)
    shutil.copy(root / "fix.yaml", attack / "fix.yaml")
    places = {"tiny": str(tiny_dir), "fake": str(fake_dir), "export": str(export), "attack": str(attack)}
    places["nl"] = "\n"
    before = _tree_digest(root / "studies")

    def one(case: Case) -> Any:
        argv = [a.format(**places) for a in case.argv]
        started = time.monotonic()
        try:
            done = _cli(argv, root, env)
        except subprocess.TimeoutExpired:
            return {"rc": None, "stderr": "", "stdout": "", "seconds": time.monotonic() - started}
        return {
            "rc": done.returncode,
            "stderr": done.stderr,
            "stdout": done.stdout,
            "seconds": time.monotonic() - started,
        }

    started = time.monotonic()
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = dict(zip([c.id for c in CASES], pool.map(one, CASES), strict=True))
    FIGURES.inputs += len(CASES)
    return Arena(root, env, before, results, marker, time.monotonic() - started)


# --------------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------------


def _params() -> list[Any]:
    out = []
    for case in CASES:
        marks = [pytest.mark.xfail(reason=case.xfail, strict=True)] if case.xfail else []
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


@pytest.mark.deadline(600)
@pytest.mark.parametrize("case", _params())
def test_bad_input_is_refused_in_one_line(case: Case, arena: Arena) -> None:
    result = arena.results[case.id]
    err = result["stderr"]
    shown = err if len(err) < 3000 else err[:1500] + f"... ({len(err)} characters)"
    assert result["rc"] is not None, f"{case.id}: did not finish within {CASE_TIMEOUT_S} s"
    assert result["rc"] == 2, (case.id, result["rc"], shown)
    assert "Traceback" not in err and "Traceback" not in result["stdout"], shown
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, (case.id, shown)
    line = lines[0]
    assert len(line) <= MAX_LINE, (case.id, f"{len(line)} characters", line[:300])
    assert line.startswith(f"spkid-search {case.argv[0]}: error: "), line
    names = case.names.format(attack=arena.root / "attack")
    assert names in line, (case.id, "does not name", names, line)
    assert case.fix in line, (case.id, "gives no fix like", case.fix, line)
    assert "hunter2" not in err  # a password is never echoed


def test_corpus_is_large_and_covers_every_command() -> None:
    commands = {c.argv[0] for c in CASES}
    assert len(CASES) >= 30
    assert commands == {
        "run",
        "train",
        "status",
        "dashboard",
        "export-top",
        "vote",
        "predict",
        "synth",
        "prepare",
    }


def test_no_study_checkpoint_or_export_was_touched_and_no_payload_ran(arena: Arena) -> None:
    after = _tree_digest(arena.root / "studies")
    changed = sorted(
        k for k in set(after) | set(arena.studies_before) if after.get(k) != arena.studies_before.get(k)
    )
    assert not changed, changed
    assert not arena.marker.exists(), "a pickle payload was executed"
    assert len(arena.studies_before) >= 4  # the study database, two checkpoints and the manifest at least
