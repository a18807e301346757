"""Where studies live: storage URLs, the RDB storage with heartbeats, the artifact store, study lookup.

SQLite (embedded, under ``studies/<study>/study.db``) is the default; PostgreSQL is the same code with a
``postgresql://`` URL. Every function raises :class:`UserError` with the URL or study at fault.
"""

from __future__ import annotations

import os
import re
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.artifacts import FileSystemArtifactStore
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

from search.errors import UserError

STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NETWORK_FS = {
    "nfs",
    "nfs4",
    "cifs",
    "smbfs",
    "smb3",
    "fuse.sshfs",
    "9p",
    "afs",
    "lustre",
    "glusterfs",
    "ceph",
}


def studies_root() -> Path:
    return Path(os.environ.get("SPKID_SEARCH_STUDIES", "studies"))


def check_study_name(name: str) -> str:
    """Study names become folder names, so only a safe, short alphabet is allowed."""
    if not STUDY_NAME.match(name):
        raise UserError(
            f"study name '{name}' is not allowed: use letters, digits, '.', '_' or '-' (at most 64, no '/')"
        )
    return name


def study_dir(study: str) -> Path:
    return studies_root() / check_study_name(study)


def default_storage_url(study: str) -> str:
    return f"sqlite:///{study_dir(study) / 'study.db'}"


def _filesystem_type(path: Path) -> str | None:
    """The mount's filesystem type from /proc/mounts (Linux), longest matching mount point wins."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return None
    best, kind = "", None
    target = str(path.resolve())
    for line in mounts:
        parts = line.split()
        inside = len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/"))
        if inside and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def _prepare_sqlite(url: str) -> None:
    """Create the folder, refuse network filesystems, and switch the file to WAL once (it persists)."""
    path_text = url[len("sqlite:///") :]
    if not path_text or path_text == ":memory:":
        return
    path = Path(path_text)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--storage {url}: cannot create {path.parent} ({exc.strerror})") from None
    fs = _filesystem_type(path.parent)
    if fs in NETWORK_FS and not os.environ.get("SPKID_SEARCH_ALLOW_NETWORK_SQLITE"):
        raise UserError(
            f"--storage {url}: {path.parent} is on a network filesystem ({fs}); SQLite locking is unsafe "
            "there. Use PostgreSQL (--storage postgresql://user@host/db) for several machines"
        )
    try:
        con = sqlite3.connect(path, timeout=60)
        con.execute("PRAGMA journal_mode=WAL")
        con.close()
    except sqlite3.Error as exc:
        raise UserError(f"--storage {url}: cannot open the SQLite file ({exc})") from None


def open_storage(
    url: str,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    max_retry: int | None = 3,
) -> RDBStorage:
    """An RDBStorage for ``url``; with a heartbeat, a killed worker's trial is retried, not left RUNNING."""
    if not re.match(r"^(sqlite|postgresql|postgresql\+psycopg|postgres|mysql(\+\w+)?)://", url):
        raise UserError(f"--storage '{url}': expected sqlite:///path/to/file.db or postgresql://user@host/db")
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        _prepare_sqlite(url)
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            kwargs: dict[str, Any] = {}
            if heartbeat_interval:
                kwargs = {
                    "heartbeat_interval": heartbeat_interval,
                    "grace_period": grace_period or 4 * heartbeat_interval,
                    "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
                }
            return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy/driver errors come in many types
        first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
        shown = re.sub(r"://([^:@/]+):[^@/]+@", r"://\1:***@", url)  # never echo a password
        raise UserError(f"--storage {shown}: cannot connect ({first[:200]})") from None


def study_names(storage: RDBStorage) -> list[str]:
    return [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]


def load_study(storage: RDBStorage, name: str | None, url: str = "") -> optuna.Study:
    """Load a study by name; with no name, the only study in the storage (several: list them)."""
    names = study_names(storage)
    if name is None:
        if len(names) == 1:
            name = names[0]
        elif not names:
            raise UserError(f"{url or 'storage'}: holds no study yet; start one with 'spkid-search run'")
        else:
            raise UserError(
                f"{url or 'storage'}: holds several studies ({', '.join(names)}); pick one with --study"
            )
    if name not in names:
        known = f" (it has: {', '.join(names)})" if names else ""
        raise UserError(f"study '{name}' does not exist in {url or 'the storage'}{known}")
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
    storage = open_storage(storage_url)
    loaded = load_study(storage, study, storage_url)
    return storage, loaded, storage_url


def artifact_store(study: optuna.Study) -> FileSystemArtifactStore:
    """The study's artifact store: the folder recorded at creation (default studies/<study>/artifacts)."""
    base = Path(study.user_attrs.get("artifact_dir") or study_dir(study.study_name) / "artifacts")
    base.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(base_path=str(base))
