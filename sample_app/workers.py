"""Run several sample-app workers on one database and one message queue.

    python -m sample_app.workers --workers N --base-port P [--host H]
        [--async-mode eventlet|gevent|threading] [--database-url URL]
        [--message-queue redis://...]

Starts ``python -m sample_app --port P+i --message-queue ...`` for i = 0..N-1: the
first one alone (it creates the tables), then the others. All of them share the
database, the message queue and one ``/monitor`` token (``DBCTX_MONITOR_AUTH``, or one
generated here), so every dashboard shows the whole fleet. Prints each worker's URL
and pid once all answer ``/healthz``; their output follows, each line prefixed with
``[wI]``. Ctrl-C (or SIGTERM) is forwarded to every worker, which drains (its events in
flight finish and ack) and exits; the launcher waits ``DBCTX_DRAIN_TIMEOUT`` + 10 s for
that before it escalates. A worker that dies stops the rest. Exit status: 0 after
Ctrl-C, 1 when a worker failed, 2 for bad arguments.

Environment: ``DATABASE_URL``, ``SOCKETIO_MESSAGE_QUEUE`` (default
``redis://127.0.0.1:6379/0``), ``DBCTX_MONITOR_AUTH``. Without ``--database-url``
every worker uses the sample app's SQLite file, which serialises writes: use
PostgreSQL to measure anything.

A load balancer in front of the workers must keep each client on one worker (sticky
sessions), unless every client uses the WebSocket transport only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import IO
from urllib.parse import urlsplit

from .__main__ import dashboard_url, drain_timeout

__all__ = ["Worker", "main", "parse_args"]

DEFAULT_MESSAGE_QUEUE = "redis://127.0.0.1:6379/0"
MAX_WORKERS = 64
START_TIMEOUT = 60.0
#: seconds the workers get to drain after Ctrl-C before a second signal stops them at once
STOP_TIMEOUT = drain_timeout() + 10.0
# urllib without proxies from the environment: the workers are local
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] = os.environ
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sample_app.workers",
        description="Several sample-app workers on one database and one message queue.",
    )
    parser.add_argument("--workers", type=int, default=2, help="how many (default: 2)")
    parser.add_argument(
        "--base-port", type=int, default=5000, help="worker i listens on BASE_PORT+i"
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument(
        "--async-mode",
        choices=("eventlet", "gevent", "threading"),
        default=None,
        help="passed to every worker (default: the sample app's)",
    )
    parser.add_argument(
        "--database-url",
        default=environ.get("DATABASE_URL") or None,
        help="SQLAlchemy URL shared by all workers (env DATABASE_URL)",
    )
    parser.add_argument(
        "--message-queue",
        default=environ.get("SOCKETIO_MESSAGE_QUEUE") or DEFAULT_MESSAGE_QUEUE,
        help="Socket.IO message queue (env SOCKETIO_MESSAGE_QUEUE; "
        f"default {DEFAULT_MESSAGE_QUEUE})",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.workers <= MAX_WORKERS:
        parser.error(f"--workers must be 1-{MAX_WORKERS}, got {args.workers}")
    if args.base_port < 1 or args.base_port + args.workers - 1 > 65535:
        parser.error(
            f"--base-port must leave room for {args.workers} ports in 1-65535, "
            f"got {args.base_port}"
        )
    queue = urlsplit(args.message_queue)
    if not queue.scheme or not (queue.hostname or queue.path):
        parser.error(
            f"--message-queue must be a URL such as {DEFAULT_MESSAGE_QUEUE}, "
            f"got {args.message_queue!r}"
        )
    return args


def queue_problem(url: str) -> str | None:
    """Why a Redis message queue cannot be reached, or None (other kinds: not checked)."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return None
    host, port = parts.hostname or "127.0.0.1", parts.port or 6379
    try:
        with socket.create_connection((host, port), timeout=3):
            return None
    except OSError as exc:
        return f"cannot reach the message queue at {host}:{port} ({exc})"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the worker gets SIGTERM when the launcher dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Worker:
    """One ``python -m sample_app`` child, its output prefixed and copied to ours."""

    def __init__(
        self,
        index: int,
        args: argparse.Namespace,
        token: str,
        out: IO[str],
        lock: threading.Lock,
    ) -> None:
        self.index = index
        self.port = args.base_port + index
        host = "127.0.0.1" if args.host in ("", "0.0.0.0", "::") else args.host
        host = f"[{host}]" if ":" in host else host
        self.url = f"http://{host}:{self.port}/"
        command = [
            sys.executable,
            "-m",
            "sample_app",
            "--host",
            args.host,
            "--port",
            str(self.port),
            "--message-queue",
            args.message_queue,
        ]
        if args.async_mode:
            command += ["--async-mode", args.async_mode]
        if args.database_url:
            command += ["--database-url", args.database_url]
        env = {**os.environ, "DBCTX_MONITOR_AUTH": token, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            # its own session: a terminal's Ctrl-C reaches the launcher only, which
            # forwards it once
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        self._out, self._lock = out, lock
        self._copier = threading.Thread(target=self._copy, daemon=True)
        self._copier.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self._out.write(f"[w{self.index}] {line}")
                self._out.flush()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready(self) -> bool:
        """Whether ``/healthz`` answers at all (503 too: the app is up)."""
        try:
            with _HTTP.open(self.url + "healthz", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def send(self, signum: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signum)

    def finish(self) -> None:
        self._copier.join(5)


class Launcher:
    def __init__(self, args: argparse.Namespace, out: IO[str] = sys.stdout) -> None:
        self.args = args
        self.out = out
        self.lock = threading.Lock()
        self.workers: list[Worker] = []
        self.stop_signal: int | None = None

    def say(self, text: str) -> None:
        with self.lock:
            self.out.write(text + "\n")
            self.out.flush()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum

    def _wait_ready(self, workers: list[Worker]) -> Worker | None:
        """None when all answer; else the first worker that died or timed out."""
        deadline = time.monotonic() + START_TIMEOUT
        pending = list(workers)
        while pending:
            if self.stop_signal is not None:
                return None
            for worker in list(pending):
                if worker.proc.poll() is not None:
                    return worker
                if worker.ready():
                    pending.remove(worker)
            if pending and time.monotonic() >= deadline:
                return pending[0]
            time.sleep(0.2)
        return None

    def run(self, token: str, generated: bool) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        args = self.args
        try:
            # the first alone: it creates the tables; then the others at once
            for batch in ([0], range(1, args.workers)):
                started = []
                for index in batch:
                    worker = Worker(index, args, token, self.out, self.lock)
                    self.say(f"worker {index}: {worker.url} (pid {worker.pid})")
                    started.append(worker)
                self.workers += started
                failed = self._wait_ready(started)
                if failed is not None:
                    state = (
                        f"exited with code {failed.proc.returncode}"
                        if failed.proc.poll() is not None
                        else f"did not answer /healthz within {START_TIMEOUT:.0f}s"
                    )
                    self.say(f"worker {failed.index} ({failed.url}) {state}; stopping all")
                    return 1
                if self.stop_signal is not None:
                    return 0
            note = " (generated; set DBCTX_MONITOR_AUTH to choose one)" if generated else ""
            self.say(f"monitor token{note}")
            self.say(
                f"dashboard: {dashboard_url(args.host, args.base_port, token)} "
                f"(any worker's port works)"
            )
            self.say(f"all {args.workers} workers ready; Ctrl-C stops them all")
            while self.stop_signal is None:
                for worker in self.workers:
                    if worker.proc.poll() is not None:
                        self.say(
                            f"worker {worker.index} ({worker.url}) exited with code "
                            f"{worker.proc.returncode}; stopping all"
                        )
                        return 1
                time.sleep(0.2)
            return 0
        finally:
            self.stop()

    def stop(self) -> None:
        """SIGINT (like Ctrl-C: the workers drain) to every worker, then SIGTERM (a
        second signal: at once), then SIGKILL."""
        for signum, grace in (
            (signal.SIGINT, STOP_TIMEOUT),
            (signal.SIGTERM, 5.0),
            (signal.SIGKILL, 5.0),
        ):
            alive = [w for w in self.workers if w.proc.poll() is None]
            if not alive:
                break
            for worker in alive:
                worker.send(signum)
            deadline = time.monotonic() + grace
            while any(w.proc.poll() is None for w in alive) and time.monotonic() < deadline:
                time.sleep(0.1)
        for worker in self.workers:
            worker.finish()
        if self.workers:
            self.say(f"stopped {len(self.workers)} worker(s)")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = queue_problem(args.message_queue)
    if problem is not None:
        print(f"python -m sample_app.workers: error: {problem}", file=sys.stderr)
        return 2
    token = os.environ.get("DBCTX_MONITOR_AUTH") or ""
    generated = not token
    token = token or secrets.token_urlsafe(24)
    if args.database_url is None and args.workers > 1:
        print(
            "note: all workers share the sample app's SQLite file; "
            "pass --database-url postgresql://... for real concurrency",
            flush=True,
        )
    return Launcher(args).run(token, generated)


if __name__ == "__main__":
    sys.exit(main())
