from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import search.storage as storage_module
from search.data import PackedData, pack
from tests.hw4fake import make_hw4
from tests.studies import MYSQL_BASE, PG_BASE, mysql_answers, postgres_answers


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in its own folder so default paths (studies/...) never touch the repo, and with
    none of the caller's SPKID_SEARCH_* settings (a shared $SPKID_SEARCH_STUDIES made every test's
    studies one folder's)."""
    for name in [n for n in os.environ if n.startswith("SPKID_SEARCH_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(storage_module, "_SEEN_PASSWORDS", set())  # each test masks only what it checked
    monkeypatch.setenv("SPKID_SEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPKID_SEARCH_DATA", str(tmp_path / "data"))


@pytest.fixture(scope="session")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hw4(tmp_path_factory.mktemp("fake") / "Dataset")


@pytest.fixture(scope="session")
def fake_data(fake_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PackedData:
    return pack(fake_dir, tmp_path_factory.mktemp("fake-cache"), progress=False)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from search.synth import generate

    return generate(tmp_path_factory.mktemp("tiny") / "Dataset", preset="tiny", seed=0, progress=False)


@pytest.fixture(scope="session")
def tiny_data(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PackedData:
    return pack(tiny_dir, tmp_path_factory.mktemp("tiny-cache"), progress=False)


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh, empty database on the local server (dropped afterwards); skips when none answers."""
    if not postgres_answers():
        pytest.skip("no PostgreSQL server answers at 127.0.0.1:5432")
    import psycopg

    name = f"spkid_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as con:
        con.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG_BASE}/{name}"
    deadline = time.monotonic() + 60  # a test may have restarted the server: let it come back first
    while not postgres_answers() and time.monotonic() < deadline:
        time.sleep(0.5)
    with psycopg.connect(f"{PG_BASE}/postgres", autocommit=True) as con:
        con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def mysql_database() -> Iterator[str]:
    """A fresh, empty database on the local MySQL/MariaDB server (dropped afterwards); skips when none
    answers or pymysql is missing."""
    missing = mysql_answers()
    if missing:
        pytest.skip(missing)
    import pymysql

    name = f"spkid_{uuid.uuid4().hex[:10]}"
    with pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True) as con:
        con.cursor().execute(f"CREATE DATABASE `{name}`")
    yield f"{MYSQL_BASE}/{name}"
    with pymysql.connect(host="127.0.0.1", port=3306, user="root", autocommit=True) as con:
        con.cursor().execute(f"DROP DATABASE IF EXISTS `{name}`")
