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


def read_only_app(storage: Any, artifact_store: Any) -> Any:
    """optuna-dashboard's WSGI app, refusing every request that would change the storage."""
    import optuna_dashboard
    from bottle import HTTPResponse, request

    app = optuna_dashboard.wsgi(storage, artifact_store=artifact_store)

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
