"""Start ``python -m tests.servers.app`` from another process: its command line, and
the wait until it answers.

One way to start the server for the tests (``tests/conftest.py``, ``server_factory``)
and the benchmarks (``benchmarks/_harness.py``, ``BenchServer``). Standard library
only: the starting process is never monkey patched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["HTTP", "server_command", "stop_process", "wait_ready"]

#: urllib without any proxy from the environment: the servers are on 127.0.0.1.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def server_command(
    async_mode: str,
    port: int,
    database_url: str,
    *,
    plain: bool = False,
    bare: bool = False,
    pool_size: int = 5,
    max_overflow: int = 0,
    pool_timeout: float = 30.0,
    config: Mapping[str, Any] | None = None,
    extra: Sequence[str] = (),
    message_queue: str | None = None,
    log_level: str | None = None,
) -> list[str]:
    """The command line; see ``tests/servers/app.py`` for what each option does.

    ``config`` values are sent as JSON (``--set KEY=JSON``); ``extra`` names modules
    whose ``setup(app, socketio, db, dbctx, args)`` adds handlers.
    """
    command = [
        sys.executable,
        "-m",
        "tests.servers.app",
        "--async-mode",
        async_mode,
        "--port",
        str(port),
        "--database-url",
        database_url,
        "--pool-size",
        str(pool_size),
        "--max-overflow",
        str(max_overflow),
        "--pool-timeout",
        str(pool_timeout),
    ]
    if plain:
        command.append("--plain")
    if bare:
        command.append("--bare")
    for key, value in (config or {}).items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    for module in extra:
        command += ["--extra", module]
    if message_queue:
        command += ["--message-queue", message_queue]
    if log_level:
        command += ["--log-level", log_level]
    return command


def wait_ready(proc: subprocess.Popen[Any], port: int, timeout: float) -> str | None:
    """None once ``GET /_ready`` answers ``ok``; else why not (the process exited, or
    ``timeout`` seconds passed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"the server exited with code {proc.returncode}"
        try:
            with HTTP.open(f"http://127.0.0.1:{port}/_ready", timeout=1) as response:
                if response.read() == b"ok":
                    return None
        except OSError:
            pass
        time.sleep(0.1)
    return f"the server did not answer /_ready within {timeout}s"


def stop_process(
    proc: subprocess.Popen[Any], timeout: float = 10.0, kill_timeout: float = 5.0
) -> int | None:
    """Terminate ``proc``; kill it if it has not ended within ``timeout`` seconds, then
    wait up to ``kill_timeout`` more. Returns its exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(kill_timeout)
    return proc.returncode
