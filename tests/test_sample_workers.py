"""The sample app's launcher, ``python -m sample_app.workers``: its arguments, and
real fleets of sample-app workers on one Redis message queue.

The fleets use a Redis database of their own (``cluster_redis``); every worker the
launcher reports is killed at teardown, whatever the test did.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import socketio
from conftest import REPO_ROOT, free_port, schema_url, wait_for
from monitor_client import CLUSTER_STATUS, MonitorClient

from sample_app.__main__ import drain_timeout
from sample_app.workers import DEFAULT_MESSAGE_QUEUE, STOP_TIMEOUT, parse_args

TOKEN = "sample-workers-test-token"
#: How long the fleet may take to show up in a worker's cluster view (two shared CPU
#: cores, other test runs at the same time): generous.
SLACK = 15.0
WORKER_LINE = re.compile(r"^worker (\d+): (http://\S+/) \(pid (\d+)\)$", re.MULTILINE)
LAUNCH_TIMEOUT = 90.0


def free_ports(count: int) -> int:
    """A base port P with P..P+count-1 all free right now."""
    for _ in range(50):
        base = free_port()
        if base + count - 1 > 65535:
            continue
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    sock = stack.enter_context(socket.socket())
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return base
    pytest.fail(f"found no {count} consecutive free ports")


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@dataclass
class Launched:
    proc: subprocess.Popen[bytes]
    out_path: Path

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def workers(self) -> dict[int, tuple[str, int]]:
        """``{index: (url, pid)}`` of the workers started so far."""
        return {int(i): (url, int(pid)) for i, url, pid in WORKER_LINE.findall(self.output())}


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Callable[..., Launched]]:
    """``launch(*args)``: ``python -m sample_app.workers *args`` in the background;
    at teardown the launcher and every worker it reported are killed."""
    launched: list[Launched] = []

    def start(*args: str) -> Launched:
        out_path = tmp_path / f"launcher-{len(launched)}.log"
        with out_path.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sample_app.workers", *args],
                cwd=REPO_ROOT,
                env={**os.environ, "DBCTX_MONITOR_AUTH": TOKEN, "PYTHONUNBUFFERED": "1"},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        launched.append(Launched(proc, out_path))
        return launched[-1]

    yield start
    for item in launched:
        pids = [pid for _, pid in item.workers().values()]
        if item.proc.poll() is None:
            item.proc.kill()
            item.proc.wait(10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.server
@pytest.mark.postgres
@pytest.mark.redis
def test_sample_app_workers_launcher_runs_a_fleet_and_forwards_ctrl_c(
    launch: Callable[..., Launched], cluster_redis: str, postgres_url: str, pg_schema: str
) -> None:
    """Two sample-app workers on one database and one queue: an order placed on worker
    0 reaches a client of worker 1, the monitor of worker 1 lists both workers, and a
    SIGINT to the launcher (Ctrl-C) stops everything with status 0."""
    base = free_ports(2)
    launched = launch(
        "--workers",
        "2",
        "--base-port",
        str(base),
        "--database-url",
        schema_url(postgres_url, pg_schema),
        "--message-queue",
        cluster_redis,
    )

    def ready() -> bool:
        if launched.proc.poll() is not None:
            pytest.fail(f"the launcher exited ({launched.proc.returncode}):\n{launched.output()}")
        return "all 2 workers ready" in launched.output()

    wait_for(ready, LAUNCH_TIMEOUT, "the launcher to report 2 workers ready")
    workers = launched.workers()
    assert sorted(workers) == [0, 1]
    assert [url for url, _ in (workers[0], workers[1])] == [
        f"http://127.0.0.1:{base}/",
        f"http://127.0.0.1:{base + 1}/",
    ]
    assert f"dashboard: http://127.0.0.1:{base}/?token={TOKEN}" in launched.output()
    # each worker prints its own real URL, never a placeholder
    for index in (0, 1):
        assert (
            f"[w{index}] dashboard: http://127.0.0.1:{base + index}/?token={TOKEN}"
            in launched.output()
        )
    assert "<DBCTX_MONITOR_AUTH>" not in launched.output()
    ids = {f"{socket.gethostname()}:{pid}" for _, pid in workers.values()}

    monitor = MonitorClient("sample worker 1", launched.output)
    trading: list[socketio.Client] = []
    heard: list[dict[str, Any]] = []
    try:
        monitor.connect(workers[1][0], {"token": TOKEN})
        monitor.wait(
            CLUSTER_STATUS,
            lambda d: set(d.get("workers", {})) == ids and "error" not in d,
            SLACK,
            "worker 1's view to list both sample workers",
        )
        for url, _ in workers.values():
            client = socketio.Client(reconnection=False)
            trading.append(client)
            client.on("order_placed", heard.append, namespace="/trading")
            client.connect(url, namespaces=["/trading"], transports=["websocket"], wait_timeout=10)
        order = {"symbol": "CLUSTER", "side": "buy", "qty": 2, "price": 101.5}
        ack = trading[0].call("place_order", order, namespace="/trading", timeout=15)
        assert ack.get("ok") is True, ack
        wait_for(
            lambda: any(o.get("id") == ack["order"]["id"] for o in heard),
            SLACK,
            "worker 0's order_placed on worker 1",
        )
    finally:
        for client in (monitor.client, *trading):
            if client.connected:
                client.disconnect()

    launched.proc.send_signal(signal.SIGINT)
    assert launched.proc.wait(45) == 0, launched.output()
    assert "stopped 2 worker(s)" in launched.output()
    # each worker drained (nothing was in flight), closed its connections and exited
    assert launched.output().count("SIGINT: draining") == 2, launched.output()
    assert launched.output().count(": drained, ") == 2, launched.output()
    for _, pid in workers.values():
        assert pid_gone(pid), f"worker pid {pid} still runs after Ctrl-C"


@pytest.mark.server
@pytest.mark.redis
def test_sample_app_workers_launcher_stops_all_when_one_fails(
    launch: Callable[..., Launched], cluster_redis: str, tmp_path: Path
) -> None:
    """Worker 1's port is taken: the launcher says so, stops worker 0 and exits 1."""
    base = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        taken.listen(1)
        launched = launch(
            "--workers",
            "2",
            "--base-port",
            str(base),
            "--async-mode",
            "threading",
            "--database-url",
            f"sqlite:///{tmp_path}/fleet.db",
            "--message-queue",
            cluster_redis,
        )
        code = launched.proc.wait(LAUNCH_TIMEOUT)
    output = launched.output()
    assert code == 1, output
    assert re.search(r"worker 1 \(\S+\) exited with code [1-9]", output), output
    assert "stopped 2 worker(s)" in output
    assert "workers ready" not in output
    workers = launched.workers()
    assert sorted(workers) == [0, 1], output
    for _, pid in workers.values():
        assert pid_gone(pid), f"worker pid {pid} still runs"


@pytest.mark.server
def test_sample_app_workers_launcher_needs_a_reachable_queue(
    launch: Callable[..., Launched],
) -> None:
    closed = free_port()
    launched = launch("--message-queue", f"redis://127.0.0.1:{closed}/0")
    assert launched.proc.wait(30) == 2
    output = launched.output()
    assert f"cannot reach the message queue at 127.0.0.1:{closed}" in output, output
    assert not launched.workers(), "workers were started"


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        (["--workers", "0"], "--workers"),
        (["--workers", "-2"], "--workers"),
        (["--workers", "65"], "--workers"),
        (["--workers", "two"], "--workers"),
        (["--base-port", "0"], "--base-port"),
        (["--base-port", "-1"], "--base-port"),
        (["--base-port", "65535", "--workers", "2"], "--base-port"),
        (["--base-port", "http"], "--base-port"),
        (["--message-queue", "not a url"], "--message-queue"),
        (["--message-queue", ""], "--message-queue"),
        (["--async-mode", "asyncio"], "--async-mode"),
        (["--bogus"], "--bogus"),
    ],
)
def test_sample_app_workers_launcher_rejects_bad_arguments(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv, environ={})
    assert info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_sample_app_workers_launcher_waits_longer_than_the_drain() -> None:
    """After Ctrl-C the workers drain; the launcher's second signal stops them at once,
    so it must not come before the drain timeout has passed."""
    assert drain_timeout({}) == 30.0
    assert drain_timeout({"DBCTX_DRAIN_TIMEOUT": "5"}) == 5.0
    assert drain_timeout() + 10 <= STOP_TIMEOUT


def test_sample_app_workers_launcher_defaults() -> None:
    args = parse_args([], environ={})
    assert (args.workers, args.base_port, args.host) == (2, 5000, "127.0.0.1")
    assert (args.database_url, args.message_queue, args.async_mode) == (
        None,
        DEFAULT_MESSAGE_QUEUE,
        None,
    )
    env = {"DATABASE_URL": "postgresql://db/x", "SOCKETIO_MESSAGE_QUEUE": "redis://q:6380/2"}
    args = parse_args(["--workers", "3", "--base-port", "65533"], environ=env)
    assert (args.workers, args.base_port) == (3, 65533)
    assert (args.database_url, args.message_queue) == (env["DATABASE_URL"], "redis://q:6380/2")
