"""Helpers for tests that run studies: a space on disk, the study it made, a worker's progress, PostgreSQL."""

from __future__ import annotations

import json
import time
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from search.storage import default_storage_url, open_storage
from tests.spaces import UNIT_SPACE

PG_BASE = "postgresql://postgres@127.0.0.1:5432"
MYSQL_BASE = "mysql+pymysql://root@127.0.0.1:3306"


def write_space(path: Path, **params: object) -> Path:
    """The unit space with some params replaced, written to ``path``."""
    space = {**UNIT_SPACE, "params": {**UNIT_SPACE["params"], **params}}
    path.write_text(yaml.safe_dump(space))
    return path


def load(name: str = "unit", url: str | None = None) -> optuna.Study:
    """A study as a run left it (default: the unit space's, on its default SQLite storage)."""
    return optuna.load_study(study_name=name, storage=open_storage(url or default_storage_url(name)))


def states(study: optuna.Study) -> dict[TrialState, int]:
    """How many of the study's trials are in each state."""
    out: dict[TrialState, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state] = out.get(t.state, 0) + 1
    return out


def long_space(tmp_path: Path, steps: int = 400) -> Path:
    """Trials long enough to stop midway (``steps``, 400 by default; a checkpoint every 50), none pruned."""
    data = {
        **UNIT_SPACE,
        "params": {**UNIT_SPACE["params"], "steps": steps, "valid_steps": 50},
        "pruner": {"name": "none"},
    }
    space = tmp_path / "unit.yaml"
    space.write_text(yaml.safe_dump(data))
    return space


def wait_for_step(status_dir: Path, min_step: int, timeout: float) -> dict[str, object]:
    """The status of a worker (lane) training at ``min_step`` or later; fails after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        for path in status_dir.rglob("*.json"):  # under each run's own folder
            try:
                state = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(state.get("step"), int) and state["step"] >= min_step and not state.get("done"):
                return state
        time.sleep(0.2)
    raise AssertionError(f"no worker reached step {min_step} within {timeout}s")


def postgres_answers(timeout: float = 3.0) -> bool:
    """Whether the local PostgreSQL server answers (tests that need it skip when it does not)."""
    try:
        import psycopg

        with psycopg.connect(f"{PG_BASE}/postgres", connect_timeout=max(1, int(timeout))):
            return True
    except Exception:  # noqa: BLE001 - any failure means: no server to test against
        return False


def mysql_answers(timeout: float = 3.0) -> str | None:
    """Why no MySQL/MariaDB test can run here (its driver or the local server missing), or None."""
    try:
        import pymysql
    except ImportError:
        return "pymysql is not installed (pip install -e '.[test]' installs it)"
    try:
        pymysql.connect(
            host="127.0.0.1", port=3306, user="root", connect_timeout=max(1, int(timeout))
        ).close()
    except Exception:  # noqa: BLE001 - any failure means: no server to test against
        return "no MySQL/MariaDB server answers at 127.0.0.1:3306 (user root, no password)"
    return None
