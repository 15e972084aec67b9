"""``examples/fastapi_app.py`` runs as its docstring says (``uvicorn examples.fastapi_app:app``
from the repository root) on PostgreSQL through asyncpg, in a database of its own, with
real python-socketio clients over WebSocket and real HTTP requests: commit before the ack,
the held broadcast, the argument check's ``invalid_request``, an idempotency key answered
once, ``history``, the FastAPI routes on the same engine (one of them broadcasting to the
chat from ``dbctx.session_scope()``), the pool back to 0 checked out, and a clean shutdown
through the lifespan's drain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import socketio
import sqlalchemy as sa
from conftest import REPO_ROOT, free_port, wait_for
from server_launch import stop_process

pytestmark = pytest.mark.server

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture
def database(postgres_url: str) -> Iterator[str]:
    """A throw-away PostgreSQL database; yields its ``postgresql+asyncpg://`` URL."""
    pytest.importorskip("fastapi", reason="the test extra installs fastapi")
    pytest.importorskip("asyncpg", reason="the test extra installs asyncpg")
    name = f"fastapi_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(
        postgres_url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(postgres_url).set(drivername="postgresql+asyncpg", database=name)
    try:
        yield url.set(query={}).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


class App:
    """``python -m uvicorn examples.fastapi_app:app`` from the repository root."""

    def __init__(self, database_url: str, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        command = [sys.executable, "-m", "uvicorn", "examples.fastapi_app:app"]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*command, "--port", str(self.port)],
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_for(self._up, 30, f"the app to answer; log:\n{self.log()}")

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"the app exited ({self.proc.returncode}):\n{self.log()}")
        try:
            return self.get("/health")["healthy"] is True
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> Any:
        with _HTTP.open(self.url + path, timeout=10) as response:
            return json.loads(response.read())

    def post(self, path: str, body: Any) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with _HTTP.open(request, timeout=10) as response:
            return json.loads(response.read())

    def client(self) -> socketio.Client:
        client = socketio.Client(reconnection=False)
        client.connect(self.url, namespaces=["/chat"], transports=["websocket"], wait_timeout=10)
        return client

    def stop(self) -> int | None:
        return stop_process(self.proc, 20)


@pytest.fixture
def fastapi_app(database: str, tmp_path: Path) -> Iterator[App]:
    app = App(database, tmp_path / "fastapi_app.log")
    yield app
    app.stop()


def test_fastapi_example(fastapi_app: App) -> None:
    app = fastapi_app
    ada, bob = app.client(), app.client()
    heard: list[Any] = []
    bob.on("message", heard.append, namespace="/chat")
    try:
        ack = ada.call("send", {"text": "hello"}, namespace="/chat", timeout=10)
        assert ack == {"ok": True, "id": 1}
        assert app.get("/messages/count") == {"messages": 1}  # committed before the ack
        wait_for(lambda: heard == [{"id": 1, "text": "hello"}], 10, f"bob to hear ada: {heard}")

        bad = ada.call("send", "hello", namespace="/chat", timeout=10)
        assert bad["error"] == "invalid_request" and bad["retryable"] is False

        keyed = {"text": "once", "key": "k-1"}
        first = ada.call("send", keyed, namespace="/chat", timeout=10)
        again = ada.call("send", keyed, namespace="/chat", timeout=10)
        assert first == again == {"ok": True, "id": 2}  # the stored ack, not a second row
        assert app.get("/messages/count") == {"messages": 2}

        posted = app.post("/messages", {"text": "from http"})
        assert posted == {"ok": True, "id": 3}
        wait_for(lambda: len(heard) == 3, 10, f"the HTTP route's broadcast: {heard}")
        assert heard[1:] == [{"id": 2, "text": "once"}, {"id": 3, "text": "from http"}]

        history = bob.call("history", 2, namespace="/chat", timeout=10)
        assert history == {"messages": [{"id": 3, "text": "from http"}, {"id": 2, "text": "once"}]}
        assert app.get("/messages/count") == {"messages": 3}
    finally:
        ada.disconnect()
        bob.disconnect()
    health = wait_for(
        lambda: (h := app.get("/health"))["pool"]["checked_out"] == 0 and h, 10, "an idle pool"
    )
    assert health["status"] == "healthy" and health["pool"]["capacity"] == 5
    assert app.stop() in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    log = app.log()
    assert "Application shutdown complete" in log and "Traceback" not in log, log
