"""uvicorn test servers for the asyncio stack (``tests/test_aio.py``,
``tests/test_aio_monitor.py``): start one on a free port with its configuration in the
environment, wait until it answers ``GET /state``, read its state and log, stop it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from conftest import free_port
from server_launch import HTTP, stop_process

__all__ = ["ROOT", "UvicornServer", "asyncpg_url", "start_uvicorn"]

ROOT = Path(__file__).resolve().parents[1]


def asyncpg_url(postgres_url: str) -> str:
    """``postgres_url`` for SQLAlchemy's asyncpg dialect (no psycopg2 query options)."""
    url = sa.engine.make_url(postgres_url).set(drivername="postgresql+asyncpg")
    return url.set(query={}).render_as_string(hide_password=False)


class UvicornServer:
    """A uvicorn process serving one of the ``tests.servers.aio_*`` apps."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log

    def get(self, path: str, timeout: float = 10.0) -> str:
        with HTTP.open(self.url + path, timeout=timeout) as response:
            return str(response.read().decode())

    def state(self) -> dict[str, Any]:
        return json.loads(self.get("/state"))  # type: ignore[no-any-return]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_checked_out(self, expected: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (out := self.state()["pool"]["checked_out"]) != expected:
            assert time.monotonic() < deadline, f"checked_out stays {out}"
            time.sleep(0.05)

    def stop(self) -> None:
        stop_process(self.proc, 10)


def start_uvicorn(
    target: str, env: dict[str, str], log_dir: Path, kind: type[UvicornServer] = UvicornServer
) -> UvicornServer:
    """Start ``uvicorn target`` with ``env`` added to this environment; return it once it
    answers (within 20 s)."""
    port = free_port()
    log = log_dir / f"uvicorn-{port}.log"
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        **env,
    }
    command = [sys.executable, "-m", "uvicorn", target, "--log-level", "warning"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "--port", str(port)],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = kind(proc, port, log)
    deadline = time.monotonic() + 20
    while True:
        try:
            server.state()
            return server
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise AssertionError(f"{target} did not answer: {server.log()}") from None
            time.sleep(0.1)
