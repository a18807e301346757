"""``spkid-search dashboard`` end to end: a real server process, looked at by a real headless chromium.

The study is built without training (finished trials are written with ``optuna.trial.create_trial``), so
the module takes seconds. One server serves both tests. The browser test is skipped only when there is no
``chromium`` on PATH (Debian: ``apt-get install -y chromium``); the loopback test needs no browser.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution

from search.dashboard import REFUSED
from search.storage import default_storage_url, open_storage

CHROMIUM = shutil.which("chromium")
STUDY = "dash-demo"
# (lr, encoder, valid accuracy) of each finished trial; trial 1 is the best.
TRIALS = [(1e-3, "transformer", 0.61), (3e-3, "conformer", 0.74), (5e-4, "conformer", 0.68)]
START_TIMEOUT_S = 30.0
BROWSER_TIMEOUT_S = 30.0

pytestmark = pytest.mark.browser


@dataclass
class Dashboard:
    proc: subprocess.Popen[bytes]
    port: int
    study_id: int
    best_number: int
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _build_study(studies: Path) -> tuple[int, int]:
    """Write STUDY with its finished trials to the default SQLite storage under ``studies``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPKID_SEARCH_STUDIES", str(studies))
        storage = open_storage(default_storage_url(STUDY))
        study = optuna.create_study(study_name=STUDY, storage=storage, direction="maximize")
        dists = {
            "lr": FloatDistribution(1e-4, 1e-2, log=True),
            "encoder": CategoricalDistribution(["transformer", "conformer"]),
        }
        for lr, encoder, acc in TRIALS:
            trial = optuna.trial.create_trial(
                params={"lr": lr, "encoder": encoder},
                distributions=dists,
                value=acc,
                user_attrs={"valid_acc": acc, "device": "cpu"},
            )
            study.add_trial(trial)
        study_id = storage.get_study_id_from_name(STUDY)
        best = study.best_trial.number
        storage.engine.dispose()
    return study_id, best


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cli() -> list[str]:
    """The installed console script next to this interpreter, else the module."""
    script = Path(sys.executable).parent / "spkid-search"
    return [str(script)] if script.exists() else [sys.executable, "-m", "search.cli"]


def _wait_for_port(dash: Dashboard) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if dash.proc.poll() is not None:
            pytest.fail(
                f"dashboard exited ({dash.proc.returncode}) before listening:\n{dash.log.read_text()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", dash.port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(
        f"dashboard did not answer on port {dash.port} in {START_TIMEOUT_S:.0f} s:\n{dash.log.read_text()}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _start(root: Path, log: Path, study_id: int = 0, best: int = 0) -> Dashboard:
    """``spkid-search dashboard --study STUDY --port <free>``, default --host, run in ``root``."""
    port = _free_port()
    env = {**os.environ, "SPKID_SEARCH_STUDIES": str(root / "studies"), "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*_cli(), "dashboard", "--study", STUDY, "--port", str(port)],
            cwd=root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Dashboard(proc=proc, port=port, study_id=study_id, best_number=best, log=log)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    """``spkid-search dashboard --study STUDY --port <free>``, default --host, in a fresh folder."""
    root = tmp_path_factory.mktemp("dashboard")
    study_id, best = _build_study(root / "studies")
    dash = _start(root, root / "dashboard.log", study_id, best)
    try:
        _wait_for_port(dash)
        yield dash
    finally:
        _stop(dash.proc)


# --------------------------------------------------------------------------------------------------
# Listening sockets, read from /proc (Linux)
# --------------------------------------------------------------------------------------------------


def _decode_address(hex_addr: str) -> str:
    """/proc/net/tcp{,6} addresses are 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    ordered = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(ordered))


def _listening(pid: int) -> set[tuple[str, int]]:
    """(address, port) of every TCP socket the process holds in the LISTEN state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd))
        except OSError:
            continue
        if match:
            inodes.add(match.group(1))
    found = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A = TCP_LISTEN
                address, port = local.split(":")
                found.add((_decode_address(address), int(port, 16)))
    return found


# --------------------------------------------------------------------------------------------------
# Headless chromium
# --------------------------------------------------------------------------------------------------


class _TextOf(HTMLParser):
    """The visible text of a DOM dump: everything outside <script> and <style>, whitespace collapsed."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("script", "style"):
            self._hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style") and self._hidden:
            self._hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self._hidden:
            self.parts.append(data)

    @classmethod
    def of(cls, dom: str) -> str:
        parser = cls()
        parser.feed(dom)
        parser.close()
        return " ".join(" ".join(parser.parts).split())


def _chromium(url: str, workdir: Path, *action: str) -> subprocess.CompletedProcess[str]:
    """Run headless chromium once on ``url`` with a fresh profile; ``action``: --dump-dom or --screenshot."""
    assert CHROMIUM is not None
    profile = workdir / f"profile-{time.monotonic_ns()}"
    profile.mkdir(parents=True)
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        "--window-size=1280,900",
        *action,
        url,
    ]
    env = {**os.environ, "HOME": str(profile)}  # nothing written to the real home
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S, env=env, check=False
    )
    assert done.returncode == 0, f"chromium failed on {url} ({done.returncode}):\n{done.stderr[-2000:]}"
    return done


def _page_text(url: str, workdir: Path) -> str:
    return _TextOf.of(_chromium(url, workdir, "--dump-dom").stdout)


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------


def test_dashboard_binds_loopback_only_by_default(dashboard: Dashboard) -> None:
    if not Path(f"/proc/{dashboard.proc.pid}/fd").is_dir():
        pytest.skip("reading listening sockets needs Linux /proc")
    assert _listening(dashboard.proc.pid) == {("127.0.0.1", dashboard.port)}
    with urllib.request.urlopen(f"{dashboard.base}/api/studies", timeout=10) as resp:
        summaries = json.load(resp)["study_summaries"]
    assert [(s["study_id"], s["study_name"]) for s in summaries] == [(dashboard.study_id, STUDY)]


def test_a_request_to_another_host_name_is_refused_dns_rebinding(dashboard: Dashboard) -> None:
    """A web page open in this machine's browser could make its own name resolve to 127.0.0.1 and read the
    dashboard as its own site (every study, the search space, checkpoints); it answered any Host."""
    for host in ("attacker.example", f"attacker.example:{dashboard.port}", "127.0.0.1.attacker.example"):
        request = urllib.request.Request(f"{dashboard.base}/api/studies", headers={"Host": host})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403, host
        assert "answers only requests to 127.0.0.1 or localhost" in json.loads(refused.value.read())["reason"]
    for host in (f"localhost:{dashboard.port}", f"127.0.0.1:{dashboard.port}", "localhost"):
        request = urllib.request.Request(f"{dashboard.base}/api/studies", headers={"Host": host})
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert json.load(answer)["study_summaries"], host


def test_a_dashboard_exposed_on_purpose_answers_any_host_name() -> None:
    """--host 0.0.0.0 (or a LAN address) is reached by names this cannot know; loopback binds check."""
    from search.dashboard import foreign_host

    assert not foreign_host("spkid-box.lan:8080", "0.0.0.0")
    assert not foreign_host("10.0.0.5:8080", "10.0.0.5")
    assert foreign_host("evil.example", "localhost") and foreign_host("evil.example", "::1")
    assert not foreign_host("[::1]:8080", "::1") and not foreign_host("127.0.0.2", "127.0.0.1")
    assert not foreign_host(None, "127.0.0.1")  # HTTP/1.0 without a Host: no browser sends that


def test_uploads_and_deletes_are_refused_with_403_not_a_server_error(dashboard: Dashboard) -> None:
    """The read-only store's refusal reached optuna-dashboard as an unexpected exception: a 500 "internal
    server error" and a traceback in the server's log. It is a 403 with the reason now."""
    artifact = "0123abcd-0000-0000-0000-000000000000"
    body = json.dumps({"file": "data:text/plain;base64,eA==", "filename": "x.txt"}).encode()
    calls = [
        ("DELETE", f"/api/artifacts/{dashboard.study_id}/{artifact}", None),
        ("POST", f"/api/artifacts/{dashboard.study_id}", body),
    ]
    for method, path, data in calls:
        request = urllib.request.Request(
            dashboard.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403, (method, path, refused.value.code)
        reason = json.loads(refused.value.read())["reason"]
        assert reason == REFUSED, reason
    assert "Traceback" not in dashboard.log.read_text() and "Exception" not in dashboard.log.read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="no 'chromium' on PATH (Debian: apt-get install -y chromium)")
def test_dashboard_page_lists_study_and_trials(dashboard: Dashboard, tmp_path: Path) -> None:
    home = _page_text(f"{dashboard.base}/dashboard", tmp_path)
    assert STUDY in home, f"study name missing from the study list: {home[:800]}"
    assert "Direction: MAXIMIZE" in home, home[:800]

    best = dashboard.best_number
    lr, encoder, acc = TRIALS[best]
    url = f"{dashboard.base}/dashboard/studies/{dashboard.study_id}/trials?numbers={best}"
    page = _page_text(url, tmp_path)
    assert f"{STUDY} (id={dashboard.study_id})" in page, page[:800]
    assert f"{len(TRIALS)} Trials" in page, page[:800]
    for number in range(len(TRIALS)):
        assert re.search(rf"\bTrial {number}\b", page), f"Trial {number} missing: {page[:800]}"
    assert "Best Trial" in page, page[:800]
    # The selected (best) trial's details: its value, parameters and user attributes.
    anchor = f"Trial {best} (trial_id="
    assert anchor in page, f"best trial's details not shown: {page[:800]}"
    details = page[page.index(anchor) :]
    assert f"Value {acc}" in details, details[:800]
    assert f"lr {lr}" in details and f"encoder {encoder}" in details, details[:800]
    assert f"valid_acc {acc}" in details, details[:800]


def test_a_taken_port_or_unknown_host_is_one_line_not_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from search.cli import main

    _build_study(tmp_path / "studies")
    monkeypatch.setenv("SPKID_SEARCH_STUDIES", str(tmp_path / "studies"))
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--study", STUDY, "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"spkid-search dashboard: error: --port {port}: already in use on 127.0.0.1; pick another "
            "--port, or stop what listens there"
        )
    assert main(["dashboard", "--study", STUDY, "--host", "no-such-host.invalid", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "--host no-such-host.invalid: not a known host name or address; the default is 127.0.0.1"
    )
    assert "Traceback" not in err


def _upload(store: Any, study: optuna.Study, source: Path, content: bytes) -> str:
    """Store ``content`` as an artifact of ``study`` (as a worker stores a checkpoint); its id."""
    source.write_bytes(content)
    return optuna.artifacts.upload_artifact(
        artifact_store=store, file_path=str(source), study_or_trial=study, storage=study._storage
    )


def test_the_dashboard_gets_a_read_only_artifact_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """optuna-dashboard offers uploads and deletes to whoever reaches its port; a delete removed a
    finished trial's checkpoint. The store it is given serves downloads and refuses both."""
    import io

    from bottle import HTTPError

    import search.dashboard
    from search.cli import main
    from search.storage import artifact_store

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPKID_SEARCH_STUDIES", str(tmp_path / "studies"))
    _build_study(tmp_path / "studies")
    study = optuna.load_study(study_name=STUDY, storage=open_storage(default_storage_url(STUDY)))
    artifact_id = _upload(artifact_store(study), study, tmp_path / "best.pt", b"checkpoint bytes")
    given: dict[str, object] = {}
    monkeypatch.setattr(search.dashboard, "serve", lambda storage, **kwargs: given.update(kwargs))
    assert main(["dashboard", "--study", STUDY, "--port", str(_free_port())]) == 0
    store = given["artifact_store"]
    with store.open_reader(artifact_id) as fh:  # type: ignore[attr-defined]
        assert fh.read() == b"checkpoint bytes"
    with pytest.raises(HTTPError, match="403"):
        store.remove(artifact_id)  # type: ignore[attr-defined]
    with pytest.raises(HTTPError, match="403"):
        store.write("new", io.BytesIO(b"x"))  # type: ignore[attr-defined]
    stored = Path(study.user_attrs.get("artifact_dir") or tmp_path / "studies" / STUDY / "artifacts")
    assert (stored / artifact_id).read_bytes() == b"checkpoint bytes"


def test_the_dashboard_serves_every_listed_studys_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One database holds several studies (PostgreSQL for many machines, or one SQLite file) and the
    dashboard lists them all; each keeps its checkpoints in the folder its first run recorded. Only the
    --study's folder was served: the others' downloads were "not found"."""
    from optuna.artifacts.exceptions import ArtifactNotFound

    import search.dashboard
    from search.cli import main
    from search.storage import AtomicArtifactStore

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPKID_SEARCH_STUDIES", str(tmp_path / "studies"))
    _build_study(tmp_path / "studies")
    storage = open_storage(default_storage_url(STUDY))
    other = optuna.create_study(study_name="other", storage=storage, direction="maximize")
    folder = tmp_path / "elsewhere" / "other" / "artifacts"  # as run records it: an absolute path
    folder.mkdir(parents=True)
    other.set_user_attr("artifact_dir", str(folder))
    checkpoint = b"the other study's checkpoint"
    artifact_id = _upload(AtomicArtifactStore(folder), other, tmp_path / "best.pt", checkpoint)
    given: dict[str, object] = {}
    monkeypatch.setattr(search.dashboard, "serve", lambda storage, **kwargs: given.update(kwargs))
    assert main(["dashboard", "--study", STUDY, "--port", str(_free_port())]) == 0
    store = given["artifact_store"]
    with store.open_reader(artifact_id) as fh:  # type: ignore[attr-defined]
        assert fh.read() == checkpoint
    with pytest.raises(ArtifactNotFound):
        store.open_reader("no-such-artifact")  # type: ignore[attr-defined]
    with pytest.raises(ValueError):  # each folder's own check: no way out of it
        store.open_reader("../../best.pt")  # type: ignore[attr-defined]


def test_an_ipv6_host_is_shown_as_a_url_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import search.dashboard
    from search.cli import main

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback (::1) on this machine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPKID_SEARCH_STUDIES", str(tmp_path / "studies"))
    _build_study(tmp_path / "studies")
    monkeypatch.setattr(search.dashboard, "serve", lambda storage, **kwargs: None)
    port = _free_port()
    assert main(["dashboard", "--study", STUDY, "--host", "::1", "--port", str(port)]) == 0
    assert f"on http://[::1]:{port}/ (Ctrl-C stops)" in capsys.readouterr().err  # not http://::1:port/


def test_the_dashboard_changes_nothing(dashboard: Dashboard) -> None:
    """optuna-dashboard let whoever reached its port delete the study (the UI's own delete dialog),
    rename it, tell trials and write notes; every such request is now refused with 403."""
    study = dashboard.study_id
    changes = [
        ("DELETE", f"/api/studies/{study}", {"remove_associated_artifacts": False}),
        ("POST", f"/api/studies/{study}/rename", {"study_name": "renamed"}),
        ("PUT", f"/api/studies/{study}/note", {"version": 1, "body": "hello"}),
        ("POST", "/api/studies", {"study_name": "new", "directions": ["maximize"]}),
        ("POST", "/api/trials/1/tell", {"state": "Fail"}),
        ("POST", "/api/trials/1/user-attrs", {"user_attrs": {"x": 1}}),
        ("PUT", f"/api/studies/{study}/1/note", {"version": 1, "body": "hello"}),
        ("POST", f"/api/studies/{study}/1/skip", {}),
    ]
    for method, path, body in changes:
        request = urllib.request.Request(
            dashboard.base + path,
            data=json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 403, (method, path)
        assert json.loads(refused.value.read())["reason"] == REFUSED
    with urllib.request.urlopen(dashboard.base + "/api/studies", timeout=30) as answer:
        studies = json.loads(answer.read())["study_summaries"]
    assert [s["study_name"] for s in studies] == [STUDY]  # still there, under its name, and alone


def test_a_stopped_dashboard_exits_as_every_command_does(tmp_path: Path) -> None:
    """The server swallowed Ctrl-C and SIGTERM and the command exited 0, silently."""
    import signal

    _build_study(tmp_path / "studies")
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        log = tmp_path / f"dashboard-{code}.log"
        dash = _start(tmp_path, log)
        try:
            _wait_for_port(dash)
            dash.proc.send_signal(sig)
            assert dash.proc.wait(timeout=30) == code, log.read_text()
        finally:
            _stop(dash.proc)
        said = log.read_text()
        assert "Traceback" not in said and said.rstrip().endswith("spkid-search dashboard: interrupted"), said


def test_a_study_whose_checkpoint_folder_is_not_mounted_here_is_still_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dashboard created the recorded artifact folder, and refused the study where it could not
    (a laptop that does not mount the machines' shared studies/ folder); it only reads it now."""
    import search.dashboard
    from search.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPKID_SEARCH_STUDIES", str(tmp_path / "studies"))
    _build_study(tmp_path / "studies")
    elsewhere = tmp_path / "not-mounted" / "studies" / STUDY / "artifacts"
    study = optuna.load_study(study_name=STUDY, storage=open_storage(default_storage_url(STUDY)))
    study.set_user_attr("artifact_dir", str(elsewhere))
    served: list[object] = []
    monkeypatch.setattr(search.dashboard, "serve", lambda storage, **kwargs: served.append(kwargs))
    assert main(["dashboard", "--study", STUDY, "--port", str(_free_port())]) == 0
    assert served and not (tmp_path / "not-mounted").exists()


def test_a_checkpoint_missing_here_is_a_404_not_a_server_error(tmp_path: Path) -> None:
    """Its download was a 500 and an ArtifactNotFound traceback in the dashboard's log."""
    from wsgiref.util import setup_testing_defaults

    from search.dashboard import ReadOnlyArtifactStore, read_only_app
    from search.storage import AtomicArtifactStore

    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite'}")
    study = optuna.create_study(study_name=STUDY, storage=storage)
    trial = study.ask()
    (tmp_path / "best.pt").write_bytes(b"weights")
    (tmp_path / "there").mkdir()
    artifact_id = optuna.artifacts.upload_artifact(
        artifact_store=AtomicArtifactStore(tmp_path / "there"),
        file_path=str(tmp_path / "best.pt"),
        study_or_trial=trial,
        storage=storage,
    )
    study.tell(trial, 0.5)
    app = read_only_app(storage, ReadOnlyArtifactStore(storage, tmp_path / "not-mounted"))
    environ: dict[str, Any] = {}
    setup_testing_defaults(environ)
    environ["PATH_INFO"] = f"/artifacts/{study._study_id}/{trial._trial_id}/{artifact_id}"
    statuses: list[str] = []
    body = b"".join(app(environ, lambda status, headers, exc_info=None: statuses.append(status)))
    assert statuses == ["404 Not Found"] and b"is not in the study&#039;s folder here" in body  # HTML-escaped
