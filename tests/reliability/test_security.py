"""Security properties: tensor files are never unpickled beyond tensors, the dashboard stays on loopback,
study names cannot leave studies/, and deployment secrets stay out of the repository."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from search.checkpoint import read_checkpoint
from search.cli import build_parser
from search.data import pack
from search.errors import UserError
from search.layout import load_feature
from search.storage import check_study_name, study_dir
from tests.hw4fake import make_hw4

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the marker appearing means code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.mkdir, (str(self.marker),))


def _payloads(folder: Path, marker: Path) -> list[Path]:
    """The same payload as a torch zip file and as a bare (legacy) pickle."""
    zipped, raw = folder / "payload-zip.pt", folder / "payload-raw.pt"
    torch.save(Payload(marker), zipped)
    raw.write_bytes(pickle.dumps(Payload(marker)))
    return [zipped, raw]


def test_every_tensor_read_in_the_package_is_weights_only() -> None:
    """torch.load without weights_only=True (and np.load with allow_pickle) is how a file runs code."""
    offenders = []
    for path in sorted((REPO / "search").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name == "torch.load" and keywords.get("weights_only") != "True":
                offenders.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
            if name == "torch.load" and path.name != "files.py":  # one reader: files.load_tensors
                offenders.append(f"{path.name}:{node.lineno} torch.load outside files.load_tensors")
            if name.endswith("np.load") and keywords.get("allow_pickle", "False") != "False":
                offenders.append(f"{path.name}:{node.lineno} np.load with allow_pickle")
            if name in ("pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "eval", "exec"):
                if name == "eval" and path.name == "space.py":  # constraints: AST-checked, no builtins
                    continue
                if name == "yaml.load" and keywords.get("Loader") == "_UniqueKeyLoader":
                    continue  # a SafeLoader subclass: asserted below
                offenders.append(f"{path.name}:{node.lineno} {name}")
    assert not offenders, offenders
    from search.config import _UniqueKeyLoader

    assert issubclass(_UniqueKeyLoader, yaml.SafeLoader)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_a_pickle_payload_is_refused_by_every_reader_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "PAYLOAD-RAN"
    for payload in _payloads(tmp_path, marker):
        with pytest.raises(UserError, match="unreadable tensor file"):
            load_feature(payload, 40)  # data packing reads each uttr-*.pt through this
        with pytest.raises(UserError, match="not a loadable checkpoint"):
            read_checkpoint(payload)  # vote, predict, export and trial resume read checkpoints here
    # A data set with one hostile feature file is refused as a whole and packs nothing.
    data = make_hw4(tmp_path / "Dataset", speakers=2, per_speaker=3, test=1)
    victim = json.loads((data / "metadata.json").read_text())
    torch.save(Payload(marker), data / next(iter(victim["speakers"].values()))[0]["feature_path"])
    with pytest.raises(UserError, match="unreadable tensor file"):
        pack(data, tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").glob("*/index.npz"))
    assert not marker.exists(), "a pickle payload was executed"


def test_a_planted_last_checkpoint_fails_the_trial_without_running(tmp_path: Path, tiny_data: Any) -> None:
    """A trial resumes from studies/<study>/trials/<n>/last.pt: a planted payload there is refused."""
    from search.config import Config
    from search.train import train

    marker = tmp_path / "PAYLOAD-RAN"
    out = tmp_path / "trial"
    out.mkdir()
    torch.save(Payload(marker), out / "last.pt")
    config = Config.from_dict({"d_model": 16, "heads": 2, "ffn_dim": 32, "steps": 4, "valid_steps": 4})
    with pytest.raises(UserError, match="not a loadable checkpoint"):
        train(config, tiny_data, "cpu", out_dir=out)
    assert not marker.exists(), "a pickle payload was executed"


def test_the_refusal_says_what_was_blocked(tmp_path: Path) -> None:
    zipped = _payloads(tmp_path, tmp_path / "PAYLOAD-RAN")[0]
    for reader in (read_checkpoint, lambda path: load_feature(path, 40)):
        with pytest.raises(UserError) as info:
            reader(zipped)
        message = str(info.value)
        # Names the import it blocked; never suggests the unsafe weights_only=False that torch's text does.
        assert "posix.mkdir" in message and "Re-running" not in message and "weights_only" not in message


def test_the_dashboard_binds_loopback_unless_told_otherwise() -> None:
    args = build_parser().parse_args(["dashboard"])
    assert args.host == "127.0.0.1"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"service {name} publishes {port} beyond loopback"


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", ".hidden", "", "x" * 65, "evil\n", "/etc", "a b"])
def test_study_names_cannot_leave_the_studies_folder(name: str) -> None:
    with pytest.raises(UserError, match="is not allowed"):
        check_study_name(name)
    with pytest.raises(UserError):
        study_dir(name)


def test_plain_study_names_are_accepted() -> None:
    for name in ("boss", "boss-2.1_b", "A" * 64):
        assert check_study_name(name) == name


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30)


def test_compose_credentials_come_from_an_uncommitted_env_file() -> None:
    if shutil.which("git") is None or _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout: cannot check what is committed")
    assert _git("check-ignore", "-q", "deploy/.env").returncode == 0, "deploy/.env is not git-ignored"
    assert _git("ls-files", "deploy/.env").stdout.strip() == "", "deploy/.env is committed"
    text = (REPO / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    assert compose["services"]["postgres"]["env_file"] == "deploy/.env"
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (e.split("=", 1) + [""] for e in env)
        for key, value in items:
            assert "PASSWORD" not in str(key).upper() or not value, f"{name} sets {key} literally"
    # Every URL with credentials takes them from the environment, never spelled out.
    for url in re.findall(r"postgres(?:ql)?://[^\s\"']+", text):
        if "@" in url:
            userinfo = url.split("://", 1)[1].split("@", 1)[0]
            assert all(part.startswith("$") for part in userinfo.split(":")), url
    example = (REPO / "deploy" / ".env.example").read_text()
    assert re.search(r"^POSTGRES_PASSWORD=change-me$", example, re.M), "the example holds a placeholder"
