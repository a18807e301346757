"""Where studies live: storage URLs, the RDB storage with heartbeats, riding out outages, the artifact
store, study lookup.

SQLite (embedded, under ``studies/<study>/study.db``) is the default; PostgreSQL is the same code with a
``postgresql://`` URL. Every function raises :class:`UserError` with the URL or study at fault.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import time
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, TypeVar

import optuna
import sqlalchemy.exc
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from search.errors import UserError, exception_chain, first_line
from search.files import NETWORK_FS, atomic_write, studies_root
from search.files import filesystem_type as _filesystem_type  # (tests replace it here)

STORAGE_PATIENCE = 300.0  # seconds a worker waits for an unreachable storage before it gives up
GRACE_BEATS = 3  # heartbeats a running trial may miss before it counts as stale (default grace period)
MAX_RETRY = 3  # retries of one trial after kills or lost heartbeats (stops and outages do not count)
SCHEMA_ATTEMPTS = 4  # opening a new database that other processes create at the same moment
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
T = TypeVar("T")


def check_study_name(name: str) -> str:
    """Study names become folder names, so only a safe, short alphabet is allowed."""
    if not STUDY_NAME.fullmatch(name):  # fullmatch: '$' alone would let a trailing newline through
        raise UserError(
            f"study name {name[:80]!r} is not allowed: use letters, digits, '.', '_' or '-' (at most 64, "
            "no '/')"
        )
    return name


def study_dir(study: str) -> Path:
    return studies_root() / check_study_name(study)


def default_storage_url(study: str) -> str:
    return f"sqlite:///{study_dir(study) / 'study.db'}"


def sqlite_file(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL; None for other URLs and for in-memory SQLite."""
    if not url.startswith("sqlite:///"):
        return None
    path_text = url[len("sqlite:///") :]
    return Path(path_text) if path_text and path_text != ":memory:" else None


def _refuse_network_sqlite(url: str) -> None:
    """SQLite's file locking is unsafe on NFS, CIFS and friends: refuse, naming PostgreSQL instead."""
    path = sqlite_file(url)
    if path is None:
        return
    folder = path.parent
    fs = _filesystem_type(folder)
    word = os.environ.get("SPKID_SEARCH_ALLOW_NETWORK_SQLITE", "").strip().lower()
    allowed = word not in ("", "0", "false", "no", "off")  # ("0" turned the check off, as any text did)
    if fs in NETWORK_FS and not allowed:
        raise UserError(
            f"--storage {url}: {folder} is on a network filesystem ({fs}); SQLite locking is unsafe "
            "there. Use PostgreSQL (--storage postgresql://user@host/db) for several machines (or, if its "
            "locking is sound, SPKID_SEARCH_ALLOW_NETWORK_SQLITE=1)"
        )


def _check_sqlite_path(url: str) -> None:
    """A folder, or a file that is not a SQLite database, is refused before any connection is made:
    before ``run`` packs a data set (minutes for HW4) only to find the storage unusable."""
    path = sqlite_file(url)
    if path is None:
        return
    if path.is_dir():
        raise UserError(
            f"--storage {url}: {path} is a folder; name a database file, e.g. sqlite:///{path / 'study.db'}"
        )
    if not path.is_file():
        return  # missing: run creates it
    # Through SQLite, never a plain open(): closing another descriptor of a database file drops every
    # POSIX lock this process holds on it, so a driver with the study open lost its locks (a resumed
    # run's workers then saw no trials to run).
    try:
        # immutable: no lock taken and no -wal/-shm file made beside a study's database; file:// with an
        # absolute path, so a name that is not UTF-8 or starts with // is still that file.
        where = urllib.parse.quote(os.fsencode(path.resolve()))
        con = sqlite3.connect(f"file://{where}?mode=ro&immutable=1", uri=True, timeout=1)
        try:
            con.execute("PRAGMA schema_version").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):
            raise UserError(f"--storage {url}: {path} is not a SQLite database{_NOT_A_DATABASE}") from None
        # busy, locked, unreadable: the open that follows waits or says which


_NOT_A_DATABASE = "; restore it from a copy, or name another file"


def _sqlite_advice(exc: BaseException) -> str:
    """What to do about a SQLite file that cannot be opened, where the error says enough to tell."""
    if "not a database" in str(exc) or "malformed" in str(exc):
        return f"; it is not a SQLite database or is damaged{_NOT_A_DATABASE}"
    return ""


def _prepare_sqlite(url: str) -> None:
    """Refuse network filesystems, create the folder, and switch the file to WAL once (it persists)."""
    path = sqlite_file(url)
    if path is None:
        return
    _refuse_network_sqlite(url)
    inside_studies = path.parent.resolve().is_relative_to(studies_root().resolve())
    if not path.parent.is_dir() and not inside_studies:
        # A typo in a path of one's own (sqlite:////data/sutdies/x.db) made its folders and a new, empty
        # study there; only the default place, studies/<study>/, is made as needed.
        raise UserError(
            f"--storage {url}: the folder {path.parent} does not exist; correct the path, or create the "
            "folder first"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--storage {url}: cannot create {path.parent} ({exc.strerror})") from None
    for attempt in range(1, 11):
        try:
            con = sqlite3.connect(path, timeout=60)
            try:
                if str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    con.execute("PRAGMA journal_mode=WAL")
            finally:
                con.close()
            return
        except sqlite3.Error as exc:
            # Switching the journal mode needs the file to itself: a process creating the same new
            # study at this moment makes SQLite answer 'locked' at once, whatever the busy timeout.
            busy = "locked" in str(exc) or "busy" in str(exc)
            if not busy or attempt == 10:
                raise UserError(
                    f"--storage {url}: cannot open the SQLite file ({exc}){_sqlite_advice(exc)}"
                ) from None
            time.sleep(0.1 * attempt)


_PASSWORD = re.compile(r"^[\w+]+://[^:@/\s]*:(\S*)@")  # all between user: and the last @
_WHOLE_URL_PASSWORD = re.compile(r"^[\w+]+://[^:@/\s]*:(.*)@")  # a URL alone: a space may be in it too
_URL_PASSWORD = re.compile(r"://([^:@/\s]+):\S*@")  # any URL's, to the last @ before a space
# libpq also takes the password, and the client key's passphrase, as query parameters
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)([^&#\s'\"]*)", re.IGNORECASE)
_SEEN_PASSWORDS: set[str] = set()  # of every storage URL checked in this process: masked in any text


def _password(url: str) -> str:
    """What may be the password in ``url`` (drivers split an unescaped one at its first ``@``, and
    it may hold ``/`` too); "" when there is none."""
    found = _PASSWORD.match(url)
    return found.group(1) if found else ""


_WHOLE_QUERY_PASSWORD = re.compile(r"[?&](?:ssl)?password=([^&#]*)", re.IGNORECASE)  # a URL alone: spaces too


def _url_passwords(url: str) -> list[str]:
    """The secrets of a storage URL given alone: its password and query passwords, spaces and all."""
    found = _WHOLE_URL_PASSWORD.match(url)
    own = [found.group(1)] if found else []
    return [secret for secret in own + _WHOLE_QUERY_PASSWORD.findall(url) if secret]


def _query_passwords(text: str) -> list[str]:
    return [value for _, value in _QUERY_PASSWORD.findall(text)]


def mask_url(text: str, url: str | None = None) -> str:
    """``text`` (a URL, or a message quoting one) with passwords replaced by ``***``: never echo one.

    ``url``: the storage URL a driver's message in ``text`` is about; its password is masked wherever
    the message quotes it (or a piece of it), not only inside a URL. So is that of every URL that
    :func:`check_storage_url` has seen (a password holding a space, which ``text`` alone cannot tell
    from the words after it).
    """
    secrets = (*_url_passwords(url or ""), *_SEEN_PASSWORDS)  # a URL checked: spaces and all
    passwords = [p for p in (*secrets, _password(text), *_query_passwords(text)) if p]
    pieces = {piece for p in passwords for piece in re.split(r"[@/:]", p) if piece}
    # The whole password and its pieces wherever they appear, longest first; four characters or more
    # ("pw" would mask other words).
    for secret in sorted((s for s in {*passwords, *pieces} if len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    # A driver reads an unescaped password's tail after its first @ (or /) as the host, and quotes it
    # as 'tail@host' or 'tail': mask each piece so quoted, however short ("sec@ret" leaked "ret").
    for piece in pieces:
        for quoted in (f"{piece}@", f"'{piece}'", f'"{piece}"'):
            text = text.replace(quoted, quoted.replace(piece, "***"))
    # Any other URL's password: to the last @ before a space (a password may hold @ or /).
    text = _URL_PASSWORD.sub(r"://\1:***@", text)
    return _QUERY_PASSWORD.sub(r"\1***", text)


def check_storage_url(url: str) -> str:
    """Check a storage URL's form (no connection yet) and return it normalised for SQLAlchemy."""
    given = url
    _SEEN_PASSWORDS.update(_url_passwords(url))  # any message from here on masks them
    if not re.match(r"^(sqlite|postgresql(\+\w+)?|postgres|mysql(\+\w+)?)://", url):
        raise UserError(
            f"--storage '{mask_url(url)}': expected sqlite:///path/to/file.db or postgresql://user@host/db"
        )
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("sqlite:///"):
        _refuse_network_sqlite(url)
        _check_sqlite_path(url)
    if url.startswith("mysql"):
        try:  # its driver is not among this package's requirements
            sqlalchemy.engine.make_url(url).get_dialect().import_dbapi()
        except ImportError as exc:
            raise UserError(
                f"--storage {mask_url(url)}: its MySQL driver is not installed ({exc}); install one "
                "(pip install pymysql, with mysql+pymysql://) or use sqlite:/// or postgresql://"
            ) from None
    if url.startswith("postgresql"):
        try:
            parsed = sqlalchemy.engine.make_url(url)
            parsed.port  # noqa: B018 - parsed on first use: a port that is not a number raises here
        except Exception as exc:  # noqa: BLE001 - ArgumentError, ValueError
            raise UserError(
                f"--storage {mask_url(given)}: not a valid URL ({first_line(exc, 120)}); expected "
                "postgresql://user[:password]@host[:port]/database"
            ) from None
        # psycopg (3) is a requirement, but an install can lack it, and Optuna's docs write
        # postgresql+psycopg2://: a missing driver was "cannot connect ... check the host".
        try:
            parsed.get_dialect().import_dbapi()
        except Exception as exc:  # noqa: BLE001 - ImportError, or NoSuchModuleError for an unknown driver
            raise UserError(
                f"--storage {mask_url(given)}: its PostgreSQL driver is not installed "
                f"({first_line(exc, 120)}); write the URL as postgresql://... (psycopg 3, which this "
                "package installs: pip install 'psycopg[binary]' if it is missing)"
            ) from None
    return url


def check_server(url: str, timeout: int = 10) -> None:
    """Connect once to a database server (SQLite: nothing to do) and refuse it in one line if it does
    not answer. Why: run opens its storage after the data set is packed (minutes for HW4), and a wrong
    host or database name was said only then."""
    given, url = url, check_storage_url(url)
    if url.startswith("sqlite"):
        return
    # One attempt: a wrong password, database or host is what this is for, and the driver reports
    # each as an OperationalError, as it does a blip (retrying those took seconds on every typo).
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": timeout})
    try:
        with engine.connect():
            pass
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/driver errors come in many types
        raise UserError(_connect_failure(given, url, exc)) from None
    finally:
        engine.dispose()


def _connect_failure(given: str, url: str, exc: BaseException) -> str:
    """The line that says a storage could not be opened: the URL as given, masked, and what to check."""
    first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
    advice = (
        "check the host, port, user and database name, and that the server is running"
        if not url.startswith("sqlite")
        else "check the file and its folder's permissions"
    )
    if any(c in _password(given) for c in "@/:"):
        # Unescaped, they split the URL elsewhere: the driver tried another host or database.
        advice += "; in the URL's password write @ as %40, / as %2F and : as %3A"
    return f"--storage {mask_url(given)}: cannot connect ({mask_url(first, given)[:200]}); {advice}"


def is_transient_db_error(exc: BaseException) -> bool:
    """A lost or refused database connection (a restart, a network blip) or a busy SQLite file.

    Worth waiting for and retrying; anything else (a missing table, bad data) is a real error. Optuna
    wraps SQLAlchemy errors in ``StorageInternalError`` and some failures surface while handling
    others, so the whole ``__cause__``/``__context__`` chain is searched.
    """
    for current in exception_chain(exc):
        if isinstance(current, sqlalchemy.exc.DisconnectionError):
            return True
        if isinstance(current, sqlalchemy.exc.DBAPIError):
            if isinstance(current.orig, sqlite3.Error):
                text = str(current.orig).lower()
                return "locked" in text or "busy" in text
            if current.connection_invalidated or isinstance(
                current, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)
            ):
                return True
    return False


def db_error_text(exc: BaseException) -> str:
    """The driver's own words for a database error (Optuna's wrapper text only says a commit failed)."""
    for current in exception_chain(exc):
        if isinstance(current, sqlalchemy.exc.DBAPIError) and str(current.orig).strip():
            return str(current.orig).strip().splitlines()[0][:200]
    return first_line(exc, 200)


class StorageWait:
    """Bounded patience with an unreachable storage: retry with backoff, then give up with one line.

    ``call(fn, ...)`` retries ``fn`` while it fails for a transient reason (see
    :func:`search.storage.is_transient_db_error`), sleeping 0.5 s, 1 s, 2 s ... up to 8 s between tries,
    for at most ``patience`` seconds since the first failure of this outage; then it raises a
    :class:`UserError` naming the storage and what to do. Any other error is raised at once.
    """

    def __init__(
        self, url: str, patience: float, on_wait: Callable[[str, float], None] | None = None
    ) -> None:
        self.url = url
        self.patience = patience
        self.on_wait = on_wait
        self.since: float | None = None
        self.delay = 0.5

    def pause(self, exc: BaseException) -> None:
        """One failed attempt: sleep before the next, or raise when patience is spent."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        waited = now - self.since
        reason = db_error_text(exc)
        if waited >= self.patience:
            raise UserError(
                f"storage {mask_url(self.url)} unreachable for {waited:.0f} s "
                f"({mask_url(reason, self.url)}); the study is kept as it was: run the same command again "
                "once the database answers"
            )
        if self.on_wait is not None:
            self.on_wait(reason, waited)
        time.sleep(min(self.delay, max(0.1, self.patience - waited)))
        self.delay = min(2 * self.delay, 8.0)

    def reset(self) -> None:
        self.since, self.delay = None, 0.5

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        while True:
            try:
                result = fn(*args)
            except Exception as exc:
                if not is_transient_db_error(exc):
                    raise
                self.pause(exc)
                continue
            self.reset()
            return result


class ResilientRDBStorage(RDBStorage):
    """An RDBStorage whose heartbeat outlives a database outage.

    Optuna records heartbeats from a background thread that dies, with a traceback, on the first
    failed write; the trial then looks dead after the grace period although its worker is training
    on. Here a beat that fails for a transient reason is skipped and the next one retries.
    """

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    must_exist: bool = False,
) -> RDBStorage:
    """An RDBStorage for ``url``; with a heartbeat, a killed worker's trial is retried, not left RUNNING.

    ``must_exist`` (read-only commands): the database must be there and hold Optuna's tables; nothing
    is created in it.
    """
    given, url = url, check_storage_url(url)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        path = sqlite_file(url)
        if must_exist and path is not None and not path.is_file():
            raise UserError(
                f"--storage {url}: {path} does not exist; check the path (only 'spkid-search run' "
                "creates a study)"
            )
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    _check_tables(given, url, engine_kwargs, must_exist)  # before anything writes to it
    if url.startswith("sqlite"):
        _prepare_sqlite(url)
    for attempt in range(1, SCHEMA_ATTEMPTS + 1):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                kwargs: dict[str, Any] = {}
                if heartbeat_interval:
                    kwargs = {
                        "heartbeat_interval": heartbeat_interval,
                        "grace_period": grace_period or GRACE_BEATS * heartbeat_interval,
                        "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                            max_retry=MAX_RETRY
                        ),
                    }
                return ResilientRDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sqlalchemy/driver errors come in many types
            # Several processes opening a new database at once race to create Optuna's tables (the
            # loser finds a table or row already there): they exist now, the next attempt opens them.
            if attempt < SCHEMA_ATTEMPTS and (_is_schema_race(exc) or is_transient_db_error(exc)):
                time.sleep(0.25 * attempt)
                continue
            raise UserError(_connect_failure(given, url, exc)) from None
    raise AssertionError("unreachable")


def _table_names(url: str, engine_kwargs: dict[str, Any]) -> set[str] | None:
    """The database's tables, looked at without creating any; None when it cannot be read (a server
    that does not answer, a file that is not a database): the open that follows reports that itself.

    Why: opening an RDBStorage creates Optuna's schema in whatever database it is given.
    """
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs)
    except Exception:  # noqa: BLE001 - reported by the real open
        return None
    try:
        return set(sqlalchemy.inspect(engine).get_table_names())
    except Exception:  # noqa: BLE001 - reported by the real open
        return None
    finally:
        engine.dispose()


def holds_studies(url: str, timeout: int = 3) -> bool:
    """Whether the database answers within ``timeout`` seconds and holds Optuna's tables; creates
    nothing (not even a SQLite file). A quick look before deciding to open the storage for real."""
    url = check_storage_url(url)
    path = sqlite_file(url)
    if url.startswith("sqlite") and (path is None or not path.is_file()):
        return False
    connect = {"timeout": timeout} if url.startswith("sqlite") else {"connect_timeout": timeout}
    names = _table_names(url, {"connect_args": connect})
    return names is not None and "studies" in names


OPTUNA_TABLES = {
    "studies",
    "study_directions",
    "study_user_attributes",
    "study_system_attributes",
    "trials",
    "trial_user_attributes",
    "trial_system_attributes",
    "trial_params",
    "trial_values",
    "trial_intermediate_values",
    "trial_heartbeats",
    "version_info",
    "alembic_version",
}


def _check_tables(given: str, url: str, engine_kwargs: dict[str, Any], must_exist: bool) -> None:
    """Refuse a database that holds no study before Optuna adds its tables to it.

    A read-only command (status, export-top, dashboard) needs a study there. ``run`` creates one, but
    not in a SQLite file that holds another program's tables (any of Optuna's own, maybe being
    created by another worker right now, counts as a study's).
    """
    path = sqlite_file(url)
    if not must_exist and (path is None or not path.is_file() or path.stat().st_size == 0):
        return  # run on a server, or on a new or empty SQLite file: nothing to protect
    names = _table_names(url, engine_kwargs)
    if names is None:
        return
    if must_exist and "studies" not in names:
        raise UserError(
            f"{mask_url(given)}: holds no Optuna study (none of its tables); check --storage or --study "
            "(only 'spkid-search run' creates a study; nothing was written)"
        )
    if names and not names & OPTUNA_TABLES:
        shown = ", ".join(sorted(names)[:3]) + (", ..." if len(names) > 3 else "")
        raise UserError(
            f"--storage {url}: {path} holds another program's tables ({shown}) and no study; "
            "name a new file for the study (nothing was written)"
        )


def _is_schema_race(exc: BaseException) -> bool:
    return any(
        isinstance(current, sqlalchemy.exc.IntegrityError)
        or (isinstance(current, sqlalchemy.exc.DBAPIError) and "already exists" in str(current.orig))
        for current in exception_chain(exc)
    )


def study_names(storage: RDBStorage) -> list[str]:
    return [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]


def load_study(storage: RDBStorage, name: str | None, url: str = "") -> optuna.Study:
    """Load a study by name; with no name, the only study in the storage (several: list them)."""
    names = study_names(storage)
    where = mask_url(url) if url else "storage"
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif not names:
            raise UserError(f"{where}: holds no study yet; start one with 'spkid-search run'")
        else:
            raise UserError(f"{where}: holds several studies ({', '.join(names)}); pick one with --study")
    if name not in names:
        known = f" (it has: {', '.join(names)})" if names else ""
        raise UserError(f"study '{name}' does not exist in {mask_url(url) if url else 'the storage'}{known}")
    return optuna.load_study(study_name=name, storage=storage)


def resolve(study: str | None, storage_url: str | None) -> tuple[RDBStorage, optuna.Study, str]:
    """For read-only commands: find the storage (default: studies/<study>/study.db) and load the study."""
    if storage_url is None:
        if study is None:
            dbs = sorted(studies_root().glob("*/study.db"))
            if len(dbs) == 1:
                study = dbs[0].parent.name
            elif not dbs:
                raise UserError(
                    f"no study found under {studies_root()}/; run 'spkid-search run' first or pass --storage"
                )
            else:
                names = ", ".join(p.parent.name for p in dbs)
                raise UserError(f"several studies under {studies_root()}/ ({names}); pick one with --study")
        path = study_dir(study) / "study.db"
        if not path.exists():
            raise UserError(
                f"study '{study}' does not exist ({path} not found); check --study or pass --storage"
            )
        storage_url = default_storage_url(study)
    storage = open_storage(storage_url, must_exist=True)
    loaded = load_study(storage, study, storage_url)
    return storage, loaded, storage_url


class AtomicArtifactStore(FileSystemArtifactStore):
    """A file-system artifact store that never holds half an artifact.

    Each artifact is written to a temporary file in the store's folder, synced and renamed into place,
    so a full disk, a read-only remount or a vanished folder fails the upload with the OS error and
    leaves nothing behind that an export or the dashboard could pick up.
    """

    def __init__(self, base_path: str | Path) -> None:
        super().__init__(base_path)
        self.root = Path(base_path)

    def write(self, artifact_id: str, content_body: IO[bytes]) -> None:
        if not artifact_id or Path(artifact_id).name != artifact_id or artifact_id in (".", ".."):
            raise ValueError(f"Invalid artifact_id: {artifact_id}")
        final = self.root / artifact_id
        with atomic_write(final) as fh:
            shutil.copyfileobj(content_body, fh)


def study_home(study: optuna.Study) -> Path:
    """The study's folder, as its first run recorded it (an absolute path), so exports and caches land
    beside the study from any working folder; for a study from before that was recorded, the folder
    its artifacts are in (their link's target, where artifacts/ is a link to another disk); before
    either, studies/<study>."""
    home, artifacts = study.user_attrs.get("home_dir"), study.user_attrs.get("artifact_dir")
    if home:
        return Path(home)
    return Path(artifacts).parent if artifacts else study_dir(study.study_name)


def trials_dir(study: optuna.Study) -> Path:
    """Where the study's trials keep their checkpoints while they run: ``trials/`` in :func:`study_home`.

    Derived, not read from the recorded ``trials_dir`` (always the same folder when written): the sweep
    removes folders there, and the study folder is the one a run checks against its ``.study-mark``
    as it starts, so a value edited in the database alone cannot aim the sweep at another folder (and
    the sweep removes only folders named as workers name them, of ended trials).
    """
    return study_home(study) / "trials"


def artifact_dir(study: optuna.Study) -> Path:
    """The study's artifact folder: the one recorded at creation (default studies/<study>/artifacts)."""
    return Path(study.user_attrs.get("artifact_dir") or study_home(study) / "artifacts")


def artifact_store(study: optuna.Study) -> AtomicArtifactStore:
    """The study's artifact store, in :func:`artifact_dir` (created if missing)."""
    base = artifact_dir(study)
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"{base}: cannot create the study's artifact folder ({exc.strerror or exc}); "
            "make it a writable folder"
        ) from None
    return AtomicArtifactStore(base_path=str(base))
