"""optuna-dashboard on a study's storage, for watching: it may read everything and change nothing.

Why read-only: optuna-dashboard offers whoever reaches its port to delete a study, rename it, mark a
trial COMPLETE or FAIL, and write notes; a deleted study loses every trial, and a trial told by hand
breaks the search's budget and retries. Checkpoints are served by :class:`ReadOnlyArtifactStore`;
every change is refused with 403 and the reason.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import signal
import socket
from pathlib import Path
from typing import IO, Any, BinaryIO, NoReturn

from search.errors import UserError

READ_METHODS = ("GET", "HEAD")
REFUSED = "the dashboard of spkid-search changes nothing: studies change through spkid-search run"


def is_loopback(host: str) -> bool:
    """``localhost`` (and its subdomains, which browsers resolve to it) or a loopback address."""
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def foreign_host(host_header: str | None, bound: str) -> bool:
    """Whether a request's ``Host`` header names another machine than the loopback one it was bound to.

    Why: a web page in this machine's browser can make its own host name resolve to 127.0.0.1 (DNS
    rebinding) and then read the dashboard as its own site: every study, the search space, each trial's
    results and checkpoints. Its requests still name that host, and are refused. A dashboard bound to
    another address was exposed on purpose (--host), to names this cannot know: none is refused there.
    """
    if not host_header or not is_loopback(bound):
        return False
    if host_header.startswith("["):  # [::1]:8080
        name = host_header[: host_header.find("]") + 1]
    else:
        name = host_header.rsplit(":", 1)[0]
    return not is_loopback(name)


class ReadOnlyArtifactStore:
    """The artifact stores of every study in a storage, as the dashboard gets them: downloads only.

    Why read-only: optuna-dashboard offers uploads and deletes to whoever reaches its port, and a delete
    removed a finished trial's checkpoint (export-top then refused the study for the missing file).
    Why every study: the dashboard lists every study in the database (a PostgreSQL one holds many), and
    each keeps its checkpoints in the folder its first run recorded; with only one study's folder, the
    others' checkpoints were "not found".
    """

    def __init__(self, storage: Any, first: Path) -> None:
        self.storage = storage
        self.first = Path(first)  # the study the dashboard was opened on: tried before asking the storage

    def _folders(self) -> list[Path]:
        folders = [self.first]
        for frozen in self.storage.get_all_studies():
            recorded = frozen.user_attrs.get("artifact_dir")
            if recorded and Path(recorded) not in folders:
                folders.append(Path(recorded))
        return folders

    def open_reader(self, artifact_id: str) -> BinaryIO:
        from optuna.artifacts import FileSystemArtifactStore
        from optuna.artifacts.exceptions import ArtifactNotFound

        try:
            return FileSystemArtifactStore(self.first).open_reader(artifact_id)
        except ArtifactNotFound:
            pass
        for folder in self._folders()[1:]:
            try:
                return FileSystemArtifactStore(folder).open_reader(artifact_id)
            except ArtifactNotFound:
                continue
        raise ArtifactNotFound(f"artifact {artifact_id} is in no study's artifact folder")

    def write(self, artifact_id: str, content_body: IO[bytes]) -> None:
        _refuse_change()

    def remove(self, artifact_id: str) -> None:
        _refuse_change()


def _refuse_change() -> NoReturn:
    """A 403 with the reason: optuna-dashboard's API answers a bottle HTTPError with its status and text
    (any other exception was a 500 "internal server error" and a traceback in the server's log)."""
    from bottle import HTTPError

    raise HTTPError(403, REFUSED)


class _NotFoundIs404:
    """An artifact store whose missing file is a 404 with the reason, not a 500 and a traceback in
    the server's log (a study's checkpoint folder that this machine does not mount)."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def open_reader(self, artifact_id: str) -> Any:
        from bottle import HTTPError
        from optuna.artifacts.exceptions import ArtifactNotFound

        try:
            return self.store.open_reader(artifact_id)
        except ArtifactNotFound:
            raise HTTPError(404, f"checkpoint {artifact_id} is not in the study's folder here") from None

    def write(self, artifact_id: str, content_body: Any) -> None:
        self.store.write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self.store.remove(artifact_id)


def read_only_app(storage: Any, artifact_store: Any, bound: str = "127.0.0.1") -> Any:
    """optuna-dashboard's WSGI app, refusing every request that would change the storage, and (bound
    to ``bound``, a loopback address) every request to another host name (see :func:`foreign_host`)."""
    import optuna_dashboard
    from bottle import HTTPResponse, request

    app = optuna_dashboard.wsgi(storage, artifact_store=_NotFoundIs404(artifact_store))

    @app.hook("before_request")
    def refuse_changes() -> None:
        if foreign_host(request.get_header("Host"), bound):
            reason = f"this dashboard answers only requests to 127.0.0.1 or localhost (bound to {bound})"
            raise HTTPResponse(
                status=403, body=json.dumps({"reason": reason}), headers={"Content-Type": "application/json"}
            )
        if request.method not in READ_METHODS:  # the dashboard's pages show the reason of a JSON error
            raise HTTPResponse(
                status=403, body=json.dumps({"reason": REFUSED}), headers={"Content-Type": "application/json"}
            )

    return app


def serve(storage: Any, *, artifact_store: Any, host: str, port: int) -> None:
    """Serve :func:`read_only_app` (as optuna_dashboard.run_server serves its app) until Ctrl-C or
    SIGTERM, then raise KeyboardInterrupt, as any command stopped so: the server swallowed it and
    returned, and the command exited 0."""
    from bottle import run

    stops: list[int] = []
    handlers: dict[int, Any] = {int(sig): signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def noted(signum: int, frame: Any) -> None:
        stops.append(signum)
        previous = handlers[signum]
        if callable(previous):
            previous(signum, frame)  # Python's own Ctrl-C handler, or the command's SIGTERM one, raises
        raise KeyboardInterrupt

    for sig in handlers:
        signal.signal(sig, noted)
    try:
        run(read_only_app(storage, artifact_store, host), host=host, port=port)
    except OSError as exc:  # the port taken between check_bind and the server's own bind
        raise UserError(bind_error(host, port, exc)) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stops:
        raise KeyboardInterrupt


def check_bind(host: str, port: int) -> None:
    """Bind ``host:port`` once, as the server will, so a taken port or a wrong host is one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's socket does
            sock.bind(address)
    except OSError as exc:
        raise UserError(bind_error(host, port, exc)) from None


def bind_error(host: str, port: int, exc: OSError) -> str:
    """Why ``host:port`` cannot be served, and what to change, in one line."""
    if isinstance(exc, socket.gaierror):
        return f"--host {host}: not a known host name or address; the default is 127.0.0.1"
    if exc.errno == errno.EADDRINUSE:
        return f"--port {port}: already in use on {host}; pick another --port, or stop what listens there"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"--host {host}: not an address of this machine; the default is 127.0.0.1"
    if exc.errno == errno.EACCES:
        return f"--port {port}: not allowed for this user (ports below 1024 need root); pick a higher --port"
    return f"cannot serve on {host}:{port} ({exc.strerror or exc}); try another --host or --port"
