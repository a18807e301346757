"""search.storage: storage URLs checked by their form and refused in one line (never with a password),
SQLite files looked at without writing or unlocking them, the default places."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from search.errors import UserError
from search.storage import check_storage_url, open_storage


def test_a_sqlite_file_in_a_folder_that_does_not_exist_is_refused_outside_studies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A typo in the path made its folders (as root, anywhere) and a new, empty study there."""
    typo = tmp_path / "no" / "such" / "x.db"
    with pytest.raises(
        UserError, match=rf"^--storage sqlite:///{typo}: the folder {typo.parent} does not exist"
    ):
        open_storage(f"sqlite:///{typo}")
    assert not (tmp_path / "no").exists()
    default = Path("studies") / "new" / "study.db"  # the default place is made as needed
    open_storage(f"sqlite:///{default}").engine.dispose()
    assert default.is_file()
    monkeypatch.setenv("SPKID_SEARCH_STUDIES", "/proc/spkid")  # a place no folder can be made
    with pytest.raises(UserError, match="^--storage sqlite:////proc/spkid/new/study.db: cannot create /proc"):
        open_storage("sqlite:////proc/spkid/new/study.db")


def test_a_wrong_storage_url_is_one_line_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(UserError, match="expected sqlite:///"):
        open_storage("mongodb://x")
    from search.storage import mask_url

    assert mask_url("postgresql://u:s3c@ret@h:5/db") == "postgresql://u:***@h:5/db"  # an unescaped @
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"
    # A password holding "/" (base64) was printed whole; one holding "@" leaked its tail through the
    # driver's message, which quotes the host it parsed.
    assert (
        mask_url("postgresql://postgres:Top/Secret@127.0.0.1:5432/db")
        == "postgresql://postgres:***@127.0.0.1:5432/db"
    )
    given = "postgresql://u:TopSecret@Part2@127.0.0.1/db"
    said = mask_url("failed to resolve host 'Part2@127.0.0.1': Name or service not known", given)
    assert "Part2" not in said and "TopSecret" not in said and "127.0.0.1" in said
    assert mask_url("user u: password authentication failed", "postgresql://u:pw@h/db").startswith("user u:")
    for given, said in (  # short pieces too, where a driver quotes them as its host
        ("postgresql://u:sec@ret@127.0.0.1/db", "failed to resolve host 'ret@127.0.0.1'"),
        ("postgresql://u:a/b@c/d@127.0.0.1/db", "failed to resolve host 'c'"),
    ):
        assert mask_url(said, given) in (
            "failed to resolve host '***@127.0.0.1'",
            "failed to resolve host '***'",
        ), mask_url(said, given)
    with pytest.raises(UserError, match=r"write @ as %40, / as %2F") as refused:
        open_storage("postgresql://u:a/b@c/d@127.0.0.1/db")  # the driver tries host 'c'
    assert "a/b" not in str(refused.value) and "'c'" not in str(refused.value)
    # A MySQL URL without its driver installed (it is not a requirement): one line, no password.
    monkeypatch.setitem(sys.modules, "pymysql", None)  # the test extras install it: as if they had not
    monkeypatch.setitem(sys.modules, "MySQLdb", None)
    for url in ("mysql://root:s3cret@127.0.0.1/db", "mysql+pymysql://root:s3cret@127.0.0.1/db"):
        with pytest.raises(
            UserError, match=r"^--storage mysql.*://root:\*\*\*@.*MySQL driver is not installed"
        ):
            open_storage(url, must_exist=True)
    # The URL as the user wrote it (not SQLAlchemy's postgresql+psycopg form), and what to check.
    with pytest.raises(
        UserError, match=r"^--storage postgresql://nobody:\*\*\*@127.0.0.1:1/none: cannot connect "
    ):
        open_storage("postgresql://nobody:secret@127.0.0.1:1/none")
    with pytest.raises(UserError, match="check the host, port, user and database name"):
        open_storage("postgres://nobody@127.0.0.1:1/none")
    try:
        open_storage("postgresql://nobody:secret@127.0.0.1:1/none")
    except UserError as exc:
        assert "secret" not in str(exc)


def test_a_postgresql_url_whose_driver_is_missing_says_so() -> None:
    """postgresql+psycopg2:// (Optuna's docs write it) was "expected sqlite:///... or postgresql://"; a
    missing driver was "cannot connect ...; check the host, port, user and database name"."""
    with pytest.raises(
        UserError, match=r"^--storage postgresql\+nosuchdriver://u:\*\*\*@h/db: its PostgreSQL driver is not"
    ):
        check_storage_url("postgresql+nosuchdriver://u:pw12@h/db")
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match=r"driver is not installed .*write the URL as postgresql://"):
            check_storage_url("postgresql+psycopg2://u@h/db")
    assert check_storage_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    # A URL SQLAlchemy cannot parse is not a missing driver (the first version said it was).
    for url, bad in (("postgresql://u:pw12@h:abc/db", "'abc'"), ("postgresql://u@[::1/db", "':1'")):
        with pytest.raises(
            UserError, match=rf"^--storage postgresql://u.*: not a valid URL \(.*{bad}\); expected"
        ):
            check_storage_url(url)


def test_a_sqlite_url_to_a_folder_or_a_file_that_is_not_a_database_says_what_to_do(tmp_path: Path) -> None:
    """status said "<folder> does not exist" and run "unable to open database file" for a folder; a
    corrupt study.db gave SQLite's words alone. The file is never written to."""
    folder = tmp_path / "studies"
    folder.mkdir()
    for must_exist in (True, False):
        with pytest.raises(
            UserError, match=rf"studies is a folder; name a database file, e.g. sqlite:///{folder}/"
        ):
            open_storage(f"sqlite:///{folder}", must_exist=must_exist)
    garbage = tmp_path / "study.db"
    garbage.write_bytes(b"not a database, some notes" * 100)
    for must_exist in (True, False):
        with pytest.raises(UserError, match="study.db is not a SQLite database; restore it from a copy"):
            open_storage(f"sqlite:///{garbage}", must_exist=must_exist)
    # By its form, before run packs a data set (minutes for HW4) to find the storage unusable.
    with pytest.raises(UserError, match="study.db is not a SQLite database"):
        check_storage_url(f"sqlite:///{garbage}")
    assert garbage.read_bytes() == b"not a database, some notes" * 100


@pytest.mark.parametrize("journal", ["wal", "delete"])
def test_checking_a_sqlite_url_keeps_this_processs_locks_and_writes_nothing(
    tmp_path: Path, journal: str
) -> None:
    """The check once read the file's header with a plain open(): closing that descriptor dropped every
    POSIX lock this process held on the database (a driver with its study open), and another process
    could write under it (a resumed run's workers then saw no trials to run). Nor may it leave -wal or
    -shm files beside a database no one has open."""
    db = tmp_path / "study.db"
    with sqlite3.connect(db) as con:
        con.execute(f"PRAGMA journal_mode={journal}")
        con.execute("CREATE TABLE t (x)")
    con.close()
    before = sorted(p.name for p in tmp_path.iterdir())
    check_storage_url(f"sqlite:///{db}")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # this process holds the write lock
        check_storage_url(f"sqlite:///{db}")
        other = subprocess.run(
            [sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0)\n"
             "try:\n    c.execute('BEGIN IMMEDIATE'); print('got it')\n"
             "except sqlite3.OperationalError as e:\n    print(e)", str(db)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert other.stdout.strip() == "database is locked", other
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_holds_studies_only_looks(tmp_path: Path) -> None:
    """The quick look run takes before answering "nothing to do": it never creates a file or a table."""
    from search.storage import holds_studies

    missing = tmp_path / "missing.db"
    assert not holds_studies(f"sqlite:///{missing}") and not missing.exists()
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE notes (x)")
    assert not holds_studies(f"sqlite:///{other}")
    with sqlite3.connect(other) as db:
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["notes"]
    started = time.monotonic()
    assert not holds_studies("postgresql://nobody@127.0.0.1:1/none")  # nothing listens there
    assert time.monotonic() - started < 3
    ours = tmp_path / "study.db"
    open_storage(f"sqlite:///{ours}")
    assert holds_studies(f"sqlite:///{ours}")


def test_passwords_in_the_query_or_with_a_space_are_masked_too(capsys: pytest.CaptureFixture[str]) -> None:
    """libpq takes ?password= and ?sslpassword= (the client key's passphrase), and SQLAlchemy a password
    holding a space: status and every refusal that quotes --storage printed them as given."""
    from search.cli import main
    from search.storage import mask_url as mask

    assert mask("postgresql://u:Pw12@h/db?sslpassword=KeyPass9") == "postgresql://u:***@h/db?sslpassword=***"
    assert mask("postgresql://u@h/db?sslmode=require&PASSWORD=QsPass9") == (
        "postgresql://u@h/db?sslmode=require&PASSWORD=***"
    )
    alone = "postgresql://u:secret word9@h/db"
    assert mask(alone, alone) == "postgresql://u:***@h/db"  # the URL itself given as the one quoted
    # a message that goes on after the URL keeps its words (an '@' in them is not the password's end)
    said_more = "postgresql://u:pw12@h/db failed; mail admin@example.com"
    assert mask(said_more) == "postgresql://u:***@h/db failed; mail admin@example.com"
    spaced = "postgresql://u:secret word9@127.0.0.1:1/db"
    said = f"{spaced}: holds several studies; pass --study"  # a message quoting it: known once checked
    assert "word9" in mask(said)
    check_storage_url(spaced)
    assert mask(said) == "postgresql://u:***@127.0.0.1:1/db: holds several studies; pass --study"
    for url in (
        "postgresql://nobody@127.0.0.1:1/none?password=QsSecret9",
        "postgresql://nobody:open sesame9@127.0.0.1:1/none",
        "postgresql://nobody@127.0.0.1:1/none?password=open sesame8",  # SQLAlchemy takes it whole
    ):
        assert main(["status", "--study", "x", "--storage", url]) == 2
        err = capsys.readouterr().err
        assert "cannot connect" in err and not re.search("QsSecret9|sesame[89]", err), err
