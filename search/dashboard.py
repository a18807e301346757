"""optuna-dashboard on a study's storage, for watching: it may read everything and change nothing.

Why read-only: optuna-dashboard offers whoever reaches its port to delete a study, rename it, mark a
trial COMPLETE or FAIL, and write notes; a deleted study loses every trial, and a trial told by hand
breaks the search's budget and retries. Checkpoints are served by
:class:`search.storage.ReadOnlyArtifactStore`; every other change is refused here, with 403.
"""

from __future__ import annotations

import json
import signal
from typing import Any

READ_METHODS = ("GET", "HEAD")
REFUSED = "the dashboard of spkid-search changes nothing: studies change through spkid-search run"


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


def read_only_app(storage: Any, artifact_store: Any) -> Any:
    """optuna-dashboard's WSGI app, refusing every request that would change the storage."""
    import optuna_dashboard
    from bottle import HTTPResponse, request

    app = optuna_dashboard.wsgi(storage, artifact_store=_NotFoundIs404(artifact_store))

    @app.hook("before_request")
    def refuse_changes() -> None:
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
        run(read_only_app(storage, artifact_store), host=host, port=port)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if stops:
        raise KeyboardInterrupt
