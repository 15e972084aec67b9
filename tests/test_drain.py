"""Drain and shutdown on signals, against real servers and real clients in the three
async modes (``--extra tests.servers.ops``).

Events are kept in flight by a server-side event released through ``/_ops/release``;
the tests see them held through ``/_ops/state``, never by sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
from typing import Any, Callable

import pytest
import socketio as socketio_client
import sqlalchemy as sa
from conftest import HTTP, REPO_ROOT, ServerProcess, free_port, schema_url, wait_for
from server_launch import wait_ready
from tcp_proxy import TcpProxy

ServerFactory = Callable[..., ServerProcess]
Connect = Callable[..., socketio_client.Client]

NS = "/ops"


def start(server_factory: ServerFactory, async_mode: str, **config: Any) -> ServerProcess:
    settings = {"DBCTX_MAX_IN_FLIGHT_PER_CLIENT": 0, "DBCTX_DRAIN_TIMEOUT": 20, **config}
    return server_factory(async_mode, extra=["tests.servers.ops"], config=settings)


def state(server: ServerProcess) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(server.get("/_ops/state"))
    return data


def healthz(server: ServerProcess) -> tuple[int, dict[str, Any]]:
    try:
        with HTTP.open(server.url + "/healthz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Acks:
    """Acks of emitted events, by key."""

    def __init__(self, client: socketio_client.Client) -> None:
        self.client = client
        self.got: dict[str, Any] = {}
        self._lock = threading.Lock()

    def emit(self, event: str, key: str) -> None:
        def callback(ack: Any) -> None:
            with self._lock:
                self.got[key] = ack

        self.client.emit(event, key, namespace=NS, callback=callback)

    def wait(self, keys: list[str], timeout: float = 15) -> dict[str, Any]:
        wait_for(lambda: all(k in self.got for k in keys), timeout, f"acks of {keys}")
        return {k: self.got[k] for k in keys}


def stored(server: ServerProcess) -> set[str]:
    engine = sa.create_engine(server.database_url)
    try:
        with engine.connect() as conn:
            return {row[0] for row in conn.execute(sa.text("SELECT key FROM ops_rows"))}
    finally:
        engine.dispose()


def hold(server: ServerProcess, acks: Acks, keys: list[str]) -> None:
    for key in keys:
        acks.emit("slow", key)
    wait_for(lambda: state(server)["held"] == len(keys), 15, f"{keys} to be held")


def exit_status(server: ServerProcess, timeout: float) -> int:
    try:
        return server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"{server} did not exit within {timeout}s\n--- log ---\n{server.log()[-6000:]}"
        )


def assert_busy_draining(ack: Any) -> None:
    assert ack["error"] == "busy" and ack["retryable"] is True, ack
    assert ack["retry_after_ms"] == 1000, ack


def test_sigterm_drains_in_flight_events_then_exits(
    async_mode: str, server_factory: ServerFactory, connect_client: Connect
) -> None:
    """SIGTERM with four slow events in flight: new events are acked busy (with
    retry_after_ms), a client can still connect, /healthz says draining (503) and the
    status is ``draining``; released, the four commit and ack, and the process ends
    with SIGTERM's status, well within the drain timeout."""
    server = start(server_factory, async_mode, OPS_SIGNALS=True)
    acks = Acks(connect_client(server, NS))
    slow = [f"slow{i}" for i in range(4)]
    hold(server, acks, slow)

    server.proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    wait_for(lambda: state(server)["draining"], 10, "the drain to start")
    assert state(server)["status"] == "draining"
    code, health = healthz(server)
    assert (code, health["healthy"], health["error"]) == (503, False, "draining"), health

    acks.emit("quick", "new-on-old-client")
    late = Acks(connect_client(server, NS))  # connects are accepted during a drain
    late.emit("quick", "new-on-new-client")
    assert_busy_draining(acks.wait(["new-on-old-client"])["new-on-old-client"])
    assert_busy_draining(late.wait(["new-on-new-client"])["new-on-new-client"])
    assert server.alive() and not any(k in acks.got for k in slow)

    server.get("/_ops/release")
    got = acks.wait(slow)
    assert got == {k: {"ok": True, "key": k} for k in slow}
    assert exit_status(server, 10) == -signal.SIGTERM
    assert time.monotonic() - signalled < 20
    assert stored(server) == set(slow)  # committed; the refused ones stored nothing
    log = server.log()
    assert "SIGTERM: draining" in log and "drained, " in log, log[-3000:]
    assert "Traceback" not in log, log[-5000:]


def test_second_signal_stops_at_once(
    async_mode: str, server_factory: ServerFactory, connect_client: Connect
) -> None:
    server = start(server_factory, async_mode, OPS_SIGNALS=True)
    acks = Acks(connect_client(server, NS))
    hold(server, acks, ["a", "b"])
    server.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: state(server)["draining"], 10, "the drain to start")
    server.proc.send_signal(signal.SIGTERM)
    assert exit_status(server, 5) == -signal.SIGTERM
    assert stored(server) == set()  # never committed: the database rolled them back
    assert "SIGTERM again: stopping at once" in server.log()


def test_a_drain_that_times_out_still_exits(
    async_mode: str, server_factory: ServerFactory, connect_client: Connect
) -> None:
    server = start(server_factory, async_mode, OPS_SIGNALS=True, DBCTX_DRAIN_TIMEOUT=2)
    acks = Acks(connect_client(server, NS))
    hold(server, acks, ["stuck"])
    server.proc.send_signal(signal.SIGINT)
    signalled = time.monotonic()
    assert exit_status(server, 2 + 8) == -signal.SIGINT
    assert time.monotonic() - signalled >= 2
    assert "drain timed out" in server.log()
    assert stored(server) == set()


def test_drain_without_admission_limits(
    async_mode: str, server_factory: ServerFactory, connect_client: Connect
) -> None:
    """With admission off (no process or per-client limit) the drain still counts the
    events in flight and refuses new ones; ``dbctx.drain()`` returns True once the
    last one has acked, and False while one is still running at its timeout."""
    server = start(
        server_factory, async_mode, DBCTX_MAX_CONCURRENT_EVENTS=0, DBCTX_MONITOR_AUTH="tok"
    )
    monitor = connect_client(server, "/monitor", auth={"token": "tok"})
    acks = Acks(connect_client(server, NS))
    hold(server, acks, ["x", "y"])
    assert 'socketio_dbctx_pool_status{pool_name="default",status="healthy"} 1.0' in server.get(
        "/metrics"
    )
    server.get("/_ops/drain?timeout=1")
    wait_for(lambda: state(server)["drained"] is False, 10, "the first drain to time out")
    metrics = server.get("/metrics")
    assert 'socketio_dbctx_pool_status{pool_name="default",status="draining"} 1.0' in metrics
    # the monitor answers during a drain, and says so
    payload = monitor.call("get_status", namespace="/monitor", timeout=10)
    assert payload["status"] == payload["pools"]["default"]["status"] == "draining", payload
    health = monitor.call("health", namespace="/monitor", timeout=10)
    assert (health["healthy"], health["error"]) == (False, "draining"), health
    assert 'socketio_dbctx_pool_status{pool_name="default",status="healthy"} 0.0' in metrics
    acks.emit("quick", "refused")
    assert_busy_draining(acks.wait(["refused"])["refused"])
    server.get("/_ops/drain?timeout=30")
    server.get("/_ops/release")
    assert acks.wait(["x", "y"]) == {k: {"ok": True, "key": k} for k in ("x", "y")}
    wait_for(lambda: state(server)["drained"] is True, 10, "the second drain to end")
    server.wait_checked_out(0)
    assert stored(server) == {"x", "y"}
    # the monitor namespace and connects still work while drained
    connect_client(server, NS).disconnect()
    assert state(server)["status"] == "draining"


def test_drain_refuses_the_events_waiting_for_admission(
    async_mode: str, server_factory: ServerFactory, connect_client: Connect
) -> None:
    """Pool 5/0: five slow events take every slot and a sixth waits for admission. The
    drain acks the sixth ``busy`` at once (it never started: nothing was applied) while
    the five run on, then commit and ack."""
    server = start(server_factory, async_mode, DBCTX_QUEUE_TIMEOUT=60)
    acks = Acks(connect_client(server, NS))
    held = [f"h{i}" for i in range(5)]
    hold(server, acks, held)
    acks.emit("quick", "waiting")
    wait_for(lambda: server.stats()["pool"]["waiting"] == 1, 10, "the sixth to wait")
    server.get("/_ops/drain?timeout=30")
    assert_busy_draining(acks.wait(["waiting"])["waiting"])
    assert server.stats()["pool"]["waiting"] == 0
    assert not any(k in acks.got for k in held)
    server.get("/_ops/release")
    assert acks.wait(held) == {k: {"ok": True, "key": k} for k in held}
    wait_for(lambda: state(server)["drained"] is True, 10, "the drain to end")
    server.wait_checked_out(0)
    assert stored(server) == set(held)


# -- status follows the health probes --------------------------------------------------


def test_status_is_unhealthy_while_probes_fail(
    async_mode: str,
    server_factory: ServerFactory,
    pg_proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
) -> None:
    """The database behind a proxy that refuses: the moment /healthz answers 503 the
    status (and the Prometheus gauge) says ``unhealthy``, never ``healthy``; back to
    ``healthy`` once a probe succeeds again."""
    url = sa.engine.make_url(postgres_url).set(host="127.0.0.1", port=pg_proxy.port)
    url = url.update_query_dict({"sslmode": "disable", "connect_timeout": "2"})
    server = start(
        server_factory,
        async_mode,
        SQLALCHEMY_DATABASE_URI=schema_url(url.render_as_string(hide_password=False), pg_schema),
    )
    assert healthz(server)[0] == 200 and state(server)["status"] == "healthy"
    pg_proxy.cut()
    for _ in range(3):  # each 503 is followed by an unhealthy status, every time
        code, health = healthz(server)
        assert code == 503 and health["healthy"] is False, health
        assert state(server)["status"] == "unhealthy"
    metrics = server.get("/metrics")
    assert 'socketio_dbctx_pool_status{pool_name="default",status="unhealthy"} 1.0' in metrics
    pg_proxy.restore()
    wait_for(lambda: healthz(server)[0] == 200, 15, "/healthz to answer 200 again")
    assert state(server)["status"] == "healthy"
    server.wait_checked_out(0)


# -- the sample app ----------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize(
    ("mode", "signum"),
    [
        ("threading", signal.SIGTERM),
        ("threading", signal.SIGINT),
        ("eventlet", signal.SIGTERM),
        ("gevent", signal.SIGINT),
    ],
)
def test_sample_app_drains_on_ctrl_c_and_sigterm(
    mode: str, signum: int, postgres_url: str, pg_schema: str, tmp_path: Any
) -> None:
    """``python -m sample_app``: the signal drains, closes the connected client's
    connection and ends the process with the signal's status."""
    port = free_port()
    log_path = tmp_path / "sample.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DBCTX_MONITOR_AUTH": "t0ken"}
    command = [sys.executable, "-m", "sample_app", "--port", str(port), "--async-mode", mode]
    command += ["--database-url", schema_url(postgres_url, pg_schema)]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    client = socketio_client.Client(reconnection=False)
    try:
        problem = wait_ready_healthz(proc, port)
        assert problem is None, problem + "\n" + log_path.read_text()
        client.connect(
            f"http://127.0.0.1:{port}",
            namespaces=["/trading"],
            transports=["websocket"],
            wait_timeout=10,
        )
        proc.send_signal(signum)
        code = proc.wait(15)
        # Ctrl-C ends with SIGINT's status, or 0 where the sample turns SIGINT into a clean
        # exit (gevent, to spare the KeyboardInterrupt traceback)
        assert code == -signum or (signum == signal.SIGINT and code == 0), log_path.read_text()
        wait_for(lambda: not client.connected, 10, "the client to be disconnected")
        log = log_path.read_text()
        name = signal.Signals(signum).name
        assert f"{name}: draining" in log and ": drained, 1 connection(s) closed" in log, log
    finally:
        client.disconnect()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def wait_ready_healthz(proc: subprocess.Popen[bytes], port: int) -> str | None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            with HTTP.open(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return None
        except OSError:
            time.sleep(0.1)
    return "no /healthz within 30 s"


# -- gunicorn ------------------------------------------------------------------------------

GUNICORN_CONF = REPO_ROOT / "examples" / "gunicorn" / "gunicorn.conf.py"


def no_control_socket() -> list[str]:
    """gunicorn 25+ opens a control socket at one fixed path: tests run side by side."""
    from gunicorn.config import Config

    return ["--no-control-socket"] if "control_socket_disable" in Config().settings else []


@pytest.mark.server
@pytest.mark.parametrize("worker", ["gevent", "gthread"])
def test_gunicorn_sigterm_to_the_master_drains_the_worker(
    worker: str, postgres_url: str, pg_schema: str, tmp_path: Any
) -> None:
    """The recipe of docs/operations.rst (examples/gunicorn/gunicorn.conf.py, the app
    calling drain_on_signals() at import): SIGTERM to the master drains the worker
    (events in flight acked and committed, new ones busy, /healthz 503), then the
    worker and the master exit."""
    port = free_port()
    database_url = schema_url(postgres_url, pg_schema)
    server_args = ["--port", "0", "--database-url", database_url, "--extra", "tests.servers.ops"]
    for key, value in {
        "DBCTX_MAX_IN_FLIGHT_PER_CLIENT": 0,
        "DBCTX_DRAIN_TIMEOUT": 20,
        "OPS_SIGNALS": True,
    }.items():
        server_args += ["--set", f"{key}={json.dumps(value)}"]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OPS_SERVER_ARGS": json.dumps(server_args),
        "DBCTX_DRAIN_TIMEOUT": "20",
    }
    command = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF)]
    command += ["--chdir", str(REPO_ROOT), "-b", f"127.0.0.1:{port}", "-k", worker]
    command += [*no_control_socket(), "tests.servers.gunicorn_app:app"]
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    server = ServerProcess(proc, port, log_path, worker, database_url, plain=False)
    client = socketio_client.Client(reconnection=False)
    try:
        problem = wait_ready(proc, port, 30)
        assert problem is None, f"{problem}\n{server.log()}"
        client.connect(server.url, namespaces=[NS], transports=["websocket"], wait_timeout=10)
        acks = Acks(client)
        slow = ["g1", "g2", "g3"]
        hold(server, acks, slow)

        proc.send_signal(signal.SIGTERM)  # the master only
        signalled = time.monotonic()
        wait_for(lambda: state(server)["draining"], 10, "the worker to drain")
        code, health = healthz(server)
        assert (code, health["error"]) == (503, "draining"), health
        acks.emit("quick", "refused")
        assert_busy_draining(acks.wait(["refused"])["refused"])

        server.get("/_ops/release")
        assert acks.wait(slow) == {k: {"ok": True, "key": k} for k in slow}
        assert exit_status(server, 15) == 0  # the master's graceful stop
        assert time.monotonic() - signalled < 20
        assert stored(server) == set(slow)
        log = server.log()
        assert "SIGTERM: draining" in log and ": drained, 1 connection(s) closed" in log, log
        assert "Traceback" not in log, log
    finally:
        client.disconnect()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.mark.server
@pytest.mark.parametrize("worker", ["gevent", "gthread"])
def test_gunicorn_example_serves_the_sample_app_and_drains(
    worker: str, postgres_url: str, pg_schema: str, tmp_path: Any
) -> None:
    """examples/gunicorn as documented: ``gunicorn -c gunicorn.conf.py wsgi:app``."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "DATABASE_URL": schema_url(postgres_url, pg_schema),
        "DBCTX_DRAIN_TIMEOUT": "5",
        "GUNICORN_BIND": f"127.0.0.1:{port}",
        "GUNICORN_WORKER_CLASS": worker,
    }
    log_path = tmp_path / "gunicorn.log"
    command = [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", *no_control_socket()]
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [*command, "wsgi:app"],
            cwd=GUNICORN_CONF.parent,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    client = socketio_client.Client(reconnection=False)
    try:
        assert wait_ready_healthz(proc, port) is None, log_path.read_text()
        url = f"http://127.0.0.1:{port}"
        client.connect(url, namespaces=["/trading"], transports=["websocket"], wait_timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log_path.read_text()
        wait_for(lambda: not client.connected, 10, "the client to be disconnected")
        log = log_path.read_text()
        assert ": drained, 1 connection(s) closed" in log, log
    finally:
        client.disconnect()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
