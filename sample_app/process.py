"""Run ``python -m sample_app`` as a child process, for tests and demos.

>>> with SampleAppProcess(database_url="sqlite:////tmp/x.db", token="t") as app:
...     print(app.url, app.dashboard_url)

Starts on a free local port, waits (with a deadline) until ``/healthz`` answers 200,
and stops the process, and only that one, on exit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["SampleAppProcess", "StartError", "free_port"]

ROOT = Path(__file__).resolve().parent.parent
# urllib without proxies from the environment: the app is on 127.0.0.1
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_TOKEN = re.compile(r"dashboard: (http://\S+/\?token=(\S+))")


class StartError(RuntimeError):
    """The app did not become healthy; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class SampleAppProcess:
    """One ``python -m sample_app`` child process.

    :param database_url: passed as ``--database-url``.
    :param token: ``DBCTX_MONITOR_AUTH``; ``None`` lets the app generate one, read
        back from its output into :attr:`token`.
    :param async_mode: ``threading``, ``eventlet`` or ``gevent``; None: the app's default.
    :param port: default: a free one (retried if somebody takes it first).
    :param log_path: where stdout and stderr go; default: a temporary file.
    :param start_timeout: seconds to wait for ``/healthz``.
    :param extra_args: more command-line options (``["--allowed-hosts", "x"]``).
    """

    def __init__(
        self,
        database_url: str,
        token: str | None = None,
        async_mode: str | None = "threading",
        port: int | None = None,
        log_path: Path | None = None,
        start_timeout: float = 30.0,
        extra_env: dict[str, str] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.database_url = database_url
        self.token = token
        self.async_mode = async_mode
        self.port = port or 0
        self.start_timeout = start_timeout
        self.extra_env = extra_env or {}
        self.extra_args = extra_args or []
        if log_path is None:
            handle, name = tempfile.mkstemp(prefix="sample_app-", suffix=".log")
            os.close(handle)
            log_path = Path(name)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"{self.url}/?token={self.token}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        """``(status, body)`` of a GET on the app."""
        try:
            with _HTTP.open(self.url + path, timeout=timeout) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read().decode()

    def health(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/healthz")[1]))

    def start(self) -> SampleAppProcess:
        """Start the process and wait until it is healthy (three tries at a port)."""
        problem = ""
        for _ in range(1 if self.port else 3):
            port = self.port or free_port()
            problem = self._start_on(port)
            if not problem:
                self.port = port
                return self
            self.stop()
            if "in use" not in self.log():
                break
        raise StartError(f"sample app did not start: {problem}\n--- log ---\n{self.log()[-6000:]}")

    def _start_on(self, port: int) -> str:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        env.pop("DBCTX_MONITOR_AUTH", None)
        if self.token is not None:
            env["DBCTX_MONITOR_AUTH"] = self.token
        command = [
            sys.executable,
            "-m",
            "sample_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database-url",
            self.database_url,
            *(["--async-mode", self.async_mode] if self.async_mode else []),
            *self.extra_args,
        ]
        with self.log_path.open("wb") as log_file:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.port = port
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"it exited with code {self.proc.returncode}"
            try:
                status, _ = self.get("/healthz", timeout=2)
            except OSError:
                status = 0
            if status == 200:
                if self.token is None:
                    found = _TOKEN.search(self.log())
                    if found is None:
                        return "it printed no dashboard URL with a token"
                    self.token = found.group(2)
                return ""
            time.sleep(0.1)
        return f"/healthz did not answer 200 within {self.start_timeout}s"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` (default SIGTERM; kill it after 10 s)."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signum)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def __enter__(self) -> SampleAppProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
