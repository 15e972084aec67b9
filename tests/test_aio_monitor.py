"""The monitor of ``socketio_dbctx.aio`` on real servers: uvicorn processes serving
``tests/servers/aio_monitor.py`` (``AsyncDBContext`` over asyncpg), real
python-socketio clients of ``/monitor`` over WebSocket.

Covered: the monitor's auth (refused, accepted, not registered without
``monitor_auth``); the ``pool_status`` push (at once, then every interval, none once
nobody listens) with the Flask version's keys at every level; ``get_status`` (local,
bad scope, cluster without Redis), ``health`` and the rate limit; ``unhealthy`` while
the health probes fail; the Prometheus text with the Flask collector's metric names,
types and labels; two uvicorn servers on one Redis (one through an
``AsyncRedisManager``, one through ``cluster_redis_url``) giving ``cluster_status``
with both workers and the right totals, and a killed one dropping out within three
intervals.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import socketio
import sqlalchemy as sa
from aiokit import UvicornServer, asyncpg_url, start_uvicorn
from conftest import free_port
from monitor_client import CLUSTER_STATUS, POOL_STATUS, MonitorClient, is_busy
from test_metrics_unit import LABELS, SAMPLE_NAMES, TYPES, samples, type_lines

pytestmark = pytest.mark.server

TOKEN = "aio-monitor-token"
INTERVAL = 0.3
SERVER = "tests.servers.aio_monitor:app"
LOGS = ("--log-level", "warning", "--port")


MonitorServer = UvicornServer


Factory = Callable[..., MonitorServer]


@pytest.fixture
def monitor_server(postgres_url: str, tmp_path: Path) -> Iterator[Factory]:
    pytest.importorskip("asyncpg", reason="the test extra installs asyncpg")
    started: list[MonitorServer] = []

    def start(
        pool: str = "5,0,30",
        redis_manager: str | None = None,
        database_url: str | None = None,
        **options: Any,
    ) -> MonitorServer:
        env = {
            "AIO_DATABASE_URL": database_url or asyncpg_url(postgres_url),
            "AIO_POOL": pool,
            "AIO_OPTIONS": json.dumps(options),
        }
        if redis_manager:
            env["AIO_REDIS_MANAGER"] = redis_manager
        server = start_uvicorn(SERVER, env, tmp_path)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def subscribe() -> Iterator[Callable[..., MonitorClient]]:
    clients: list[MonitorClient] = []

    def connect(server: MonitorServer, auth: Any = None) -> MonitorClient:
        client = MonitorClient(server.url, server.log)
        clients.append(client)
        return client.connect(server.url, auth)

    yield connect
    for client in clients:
        client.client.disconnect()


def worker_client(server: MonitorServer) -> socketio.Client:
    client = socketio.Client(reconnection=False)
    client.connect(server.url, namespaces=["/a"], transports=["websocket"], wait_timeout=10)
    return client


@pytest.fixture(scope="module")
def flask_payload(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A monitor payload of the Flask version (after one event of ``/a:ping``)."""
    from flask import Flask
    from flask_socketio import SocketIO
    from flask_sqlalchemy import SQLAlchemy

    from socketio_dbctx import DBContext, DBContextNamespace
    from socketio_dbctx.state import app_state

    app = Flask("flask_parity")
    app.config["SQLALCHEMY_DATABASE_URI"] = f"sqlite:///{tmp_path_factory.mktemp('p')}/p.db"
    db = SQLAlchemy(app)
    sock = SocketIO(app, async_mode="threading")
    DBContext(app, sock, db)

    class Ping(DBContextNamespace):  # type: ignore[misc]
        def on_ping(self) -> int:
            return int(db.session.execute(sa.text("SELECT 1")).scalar_one())

    sock.on_namespace(Ping("/a"))
    client = sock.test_client(app, namespace="/a")
    assert client.emit("ping", namespace="/a", callback=True) == 1
    with app.app_context():
        payload = dict(app_state(app).payload(app))
    client.disconnect(namespace="/a")
    return payload


def assert_flask_shape(payload: dict[str, Any], flask: dict[str, Any]) -> None:
    """The same keys as the Flask payload at every level."""
    assert set(payload) == set(flask), payload
    assert set(payload["pools"]) == {"default"}
    assert set(payload["pools"]["default"]) == set(flask["pools"]["default"])
    assert payload["pools"]["default"]["bind"] == "default"
    for summary in payload["events"].values():
        assert set(summary) == set(flask["events"]["/a:ping"]), summary
    assert isinstance(payload["worker"], str) and ":" in payload["worker"]
    assert isinstance(payload["timestamp"], float)


# -- auth -----------------------------------------------------------------------------------


def test_monitor_auth_refused_accepted_and_unset(
    monitor_server: Factory, subscribe: Callable[..., MonitorClient]
) -> None:
    """A wrong or missing token gets a connect error and nothing else; the right one a
    ``pool_status`` at once; without ``monitor_auth`` there is no ``/monitor``."""
    server = monitor_server(monitor_auth=TOKEN, monitor_interval=INTERVAL)
    assert server.state()["monitor"] is True
    for auth in ({"token": "wrong"}, None, {"token": 42}, {"user": TOKEN}):
        refused = MonitorClient(server.url, server.log)
        with pytest.raises(socketio.exceptions.ConnectionError):
            refused.connect(server.url, auth, wait_timeout=5)
        assert refused.since() == []
        refused.client.disconnect()
    assert "monitor connection refused" in server.log()
    assert server.state()["subscribers"] == 0

    accepted = subscribe(server, {"token": TOKEN})
    first = accepted.wait_pushes(1, timeout=5)[0]
    assert first.data["pools"]["default"]["checked_out"] == 0
    assert server.state()["subscribers"] == 1

    closed = monitor_server()
    assert closed.state()["monitor"] is False
    with pytest.raises(socketio.exceptions.ConnectionError):
        MonitorClient(closed.url).connect(closed.url, {"token": TOKEN}, wait_timeout=5)
    server.wait_checked_out(0)


# -- payload, calls, rate limit -------------------------------------------------------------


def test_pool_status_pushes_get_status_and_health(
    monitor_server: Factory,
    subscribe: Callable[..., MonitorClient],
    flask_payload: dict[str, Any],
) -> None:
    """Pushes every interval with the Flask payload's keys; a held connection shows in
    them; ``get_status`` acks the same payload, ``health`` the health result, and a
    bad scope or the cluster scope without Redis ``invalid_request``. The push loop
    ends when the last subscriber leaves."""
    server = monitor_server(monitor_auth=TOKEN, monitor_interval=INTERVAL)
    worker = worker_client(server)
    assert worker.call("ping", namespace="/a", timeout=10) == 1
    subscriber = subscribe(server, {"token": TOKEN})
    pushes = subscriber.wait_pushes(4, timeout=5)
    gaps = [b.at - a.at for a, b in zip(pushes[1:], pushes[2:])]
    assert all(INTERVAL * 0.5 < gap < INTERVAL * 3.5 for gap in gaps), gaps
    for push in pushes:
        assert_flask_shape(push.data, flask_payload)
    assert pushes[-1].data["events"]["/a:ping"]["count"] == 1
    assert pushes[-1].data["status"] == "healthy"
    assert pushes[-1].data["leaks"] == []

    mark = subscriber.mark()
    worker.emit("hold", 1.5, namespace="/a")
    held = subscriber.wait(
        POOL_STATUS, lambda p: p["pools"]["default"]["checked_out"] == 1, 5, "a held one", mark
    )
    assert held.data["pools"]["default"]["utilization"] == 0.2

    status = subscriber.call("get_status")
    assert_flask_shape(status, flask_payload)
    assert subscriber.call("get_status", {"scope": "local"})["pools"]["default"]["size"] == 5
    for bad in ({"scope": "everything"}, "x", [1]):
        assert subscriber.call("get_status", bad)["error"] == "invalid_request", bad
    cluster = subscriber.call("get_status", {"scope": "cluster"})
    assert cluster["error"] == "invalid_request" and "Redis" in cluster["message"]
    health = subscriber.call("health")
    assert set(health) == {"healthy", "latency_ms", "error"}
    assert health["healthy"] is True and health["error"] is None

    subscriber.wait(
        POOL_STATUS, lambda p: p["pools"]["default"]["checked_out"] == 0, 5, "released"
    )
    worker.disconnect()
    server.wait_checked_out(0)

    # nobody listens: no subscriber left, and the push loop ends
    assert server.state()["loop_running"] is True
    subscriber.client.disconnect()
    deadline = time.monotonic() + 5
    while (state := server.state())["subscribers"] or state["loop_running"]:
        assert time.monotonic() < deadline, state
        time.sleep(0.05)


def test_status_is_unhealthy_while_probes_fail(
    monitor_server: Factory, subscribe: Callable[..., MonitorClient], postgres_url: str
) -> None:
    """A database nobody answers for: while somebody watches, the push loop probes it
    and the pushes say ``unhealthy`` (never ``healthy`` while health says no); the
    ``health`` ack names no URL."""
    dead = sa.engine.make_url(asyncpg_url(postgres_url)).set(host="127.0.0.1", port=free_port())
    server = monitor_server(
        database_url=dead.render_as_string(hide_password=False),
        monitor_auth=TOKEN,
        monitor_interval=INTERVAL,
    )
    subscriber = subscribe(server, {"token": TOKEN})
    unhealthy = subscriber.wait(
        POOL_STATUS, lambda p: p["status"] == "unhealthy", 5, "an unhealthy push"
    )
    assert unhealthy.data["pools"]["default"]["status"] == "unhealthy"
    health = subscriber.call("health")
    assert health["healthy"] is False and health["error"], health
    assert str(dead.port) not in json.dumps(health) and "postgresql" not in json.dumps(health)
    mark = subscriber.mark()
    pushes = subscriber.wait_pushes(2, timeout=5, since=mark)
    assert all(p.data["status"] == "unhealthy" for p in pushes), pushes
    server.wait_checked_out(0)


def test_rate_limit_is_one_budget_for_the_process(
    monitor_server: Factory, subscribe: Callable[..., MonitorClient]
) -> None:
    """Two clients bursting ``get_status`` share one budget of ``rate`` calls/s: the
    rest are ``busy`` (retryable), and it refills."""
    server = monitor_server(monitor_auth=TOKEN, monitor_interval=5)
    a, b = subscribe(server, {"token": TOKEN}), subscribe(server, {"token": TOKEN})
    started = time.monotonic()
    acks = [c.call_once("get_status") for _ in range(8) for c in (a, b)]
    elapsed = time.monotonic() - started
    answered = [ack for ack in acks if not is_busy(ack)]
    assert len(answered) <= 5 + 5 * elapsed + 1, (len(answered), elapsed)
    busy = [ack for ack in acks if is_busy(ack)]
    assert busy and all(ack["retryable"] is True for ack in busy), acks
    assert not is_busy(b.call("get_status", timeout=5))
    server.wait_checked_out(0)


# -- Prometheus ------------------------------------------------------------------------------


def test_prometheus_has_the_flask_metric_names_types_and_labels(
    monitor_server: Factory,
) -> None:
    """``register(async_dbctx, registry=...)`` exposes exactly the Flask collector's
    samples (``test_metrics_unit``), with its types and labels."""
    server = monitor_server()
    worker = worker_client(server)
    assert worker.call("ping", namespace="/a", timeout=10) == 1
    text = server.get("/metrics")
    found = samples(text)
    assert {s.name for s in found} == SAMPLE_NAMES
    assert type_lines(text) == TYPES
    for sample in found:
        assert set(sample.labels) == LABELS[sample.name], sample
    values = {(s.name, tuple(sorted(s.labels.items()))): s.value for s in found}
    ping = (("event", "ping"), ("namespace", "/a"), ("outcome", "ok"))
    assert values[("socketio_dbctx_events_total", ping)] == 1
    assert values[("db_client_connection_max", (("pool_name", "default"),))] == 5
    status = (("pool_name", "default"), ("status", "healthy"))
    assert values[("socketio_dbctx_pool_status", status)] == 1
    worker.disconnect()
    server.wait_checked_out(0)


def test_register_takes_an_async_dbctx_without_an_app(postgres_url: str) -> None:
    """``register(async_dbctx, registry)`` (positional or keyword) needs no app and no
    database for the pool series; a Flask ``DBContext`` still needs its app."""
    pytest.importorskip("asyncpg", reason="the test extra installs asyncpg")
    from flask_socketio import SocketIO
    from prometheus_client import CollectorRegistry, generate_latest
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from socketio_dbctx import ContextSetupError, DBContext
    from socketio_dbctx.aio import AsyncDBContext
    from socketio_dbctx.prometheus import register

    engine = create_async_engine(asyncpg_url(postgres_url), pool_size=3, max_overflow=1)
    dbctx = AsyncDBContext(socketio.AsyncServer(async_mode="asgi"), async_sessionmaker(engine))
    assert dbctx.monitor is None  # no monitor_auth: no /monitor
    for how in ("positional", "keyword"):
        registry = CollectorRegistry()
        if how == "positional":
            register(dbctx, registry)
        else:
            register(dbctx, registry=registry)
        text = generate_latest(registry).decode()
        assert 'db_client_connection_max{pool_name="default"} 4.0' in text, text
        assert "socketio_dbctx_leaks_total 0.0" in text
    with pytest.raises(TypeError, match="two registries"):
        register(dbctx, CollectorRegistry(), CollectorRegistry())
    with pytest.raises(ContextSetupError, match="needs the app"):
        register(
            DBContext(socketio=SocketIO(async_mode="threading")), registry=CollectorRegistry()
        )


def test_cluster_url_from_an_async_redis_manager() -> None:
    from socketio_dbctx.cluster import cluster_redis_url

    url = "redis://127.0.0.1:6379/9"
    sio = socketio.AsyncServer(async_mode="asgi", client_manager=socketio.AsyncRedisManager(url))
    assert cluster_redis_url(None, sio) == url
    assert cluster_redis_url("redis://other/1", sio) == "redis://other/1"
    assert cluster_redis_url(None, socketio.AsyncServer(async_mode="asgi")) is None


# -- the cluster view ------------------------------------------------------------------------


@pytest.mark.redis
def test_two_workers_on_one_redis_then_one_dies(
    monitor_server: Factory,
    subscribe: Callable[..., MonitorClient],
    cluster_redis: str,
) -> None:
    """Two uvicorn servers, one with an ``AsyncRedisManager`` and one with
    ``cluster_redis_url``: each subscriber gets ``cluster_status`` with both workers and
    the fleet's totals (a connection held on one shows in them); a SIGKILLed worker
    drops out within three intervals."""
    options = {"monitor_auth": TOKEN, "monitor_interval": INTERVAL}
    a = monitor_server(redis_manager=cluster_redis, **options)
    b = monitor_server(cluster_redis_url=cluster_redis, **options)
    assert a.state()["cluster"] and b.state()["cluster"]
    ids = {a.state()["worker"], b.state()["worker"]}
    on_a, on_b = subscribe(a, {"token": TOKEN}), subscribe(b, {"token": TOKEN})
    for sub in (on_a, on_b):
        both = sub.wait(CLUSTER_STATUS, lambda p: set(p["workers"]) == ids, 10, "both workers")
        totals = both.data["totals"]
        assert {k: totals[k] for k in ("capacity", "workers")} == {"capacity": 10, "workers": 2}
        assert totals["max_connections"] > 0
        assert both.data["status"] == "healthy"
        assert "error" not in both.data

    worker = worker_client(b)
    mark = on_a.mark()
    worker.emit("hold", 2.0, namespace="/a")
    held = on_a.wait(
        CLUSTER_STATUS, lambda p: p["totals"]["checked_out"] == 1, 5, "the held one", mark
    )
    assert held.data["totals"]["utilization"] == 0.1
    assert held.data["workers"][b.state()["worker"]]["pools"]["default"]["checked_out"] == 1
    assert on_a.call("get_status", {"scope": "cluster"})["totals"]["workers"] == 2
    b.wait_checked_out(0)
    worker.disconnect()

    dead = b.state()["worker"]
    mark = on_a.mark()
    b.proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    b.proc.wait(5)
    gone = on_a.wait(CLUSTER_STATUS, lambda p: dead not in p["workers"], 10, "dropout", mark)
    # the key expires three intervals after the last write; the next round sees it
    assert gone.at - killed < 4 * INTERVAL + 1.0, gone.at - killed
    assert gone.data["totals"] == {
        "checked_out": 0,
        "capacity": 5,
        "utilization": 0.0,
        "workers": 1,
        "max_connections": gone.data["totals"]["max_connections"],
    }
    assert json.loads(a.get("/stop")) == {"stopped": True}
    a.wait_checked_out(0)


@pytest.mark.redis
def test_cluster_view_starts_on_the_first_request_and_stop_leaves_the_fleet(
    postgres_url: str, cluster_redis: str
) -> None:
    """Made with no event loop running (as under a host that imports the app first),
    the cluster view waits for the server's first request, then writes this worker's
    key; ``await dbctx.monitor.stop()`` deletes it at once."""
    pytest.importorskip("asyncpg", reason="the test extra installs asyncpg")
    import asyncio
    import contextlib

    import redis
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from socketio_dbctx.aio import AsyncDBContext
    from socketio_dbctx.cluster import KEY_PREFIX
    from socketio_dbctx.state import worker_id

    engine = create_async_engine(asyncpg_url(postgres_url), pool_size=2, max_overflow=0)
    sio = socketio.AsyncServer(async_mode="asgi")
    dbctx = AsyncDBContext(
        sio,
        async_sessionmaker(engine),
        monitor_auth=TOKEN,
        monitor_interval=INTERVAL,
        cluster_redis_url=cluster_redis,
    )
    monitor = dbctx.monitor
    assert monitor is not None and monitor.cluster is not None
    cluster = monitor.cluster
    key = f"{KEY_PREFIX}worker:{worker_id()}"
    store = redis.Redis.from_url(cluster_redis)

    async def serve() -> None:
        assert not cluster.running
        with contextlib.suppress(Exception):  # not a real ASGI request: it fails after
            await sio.handle_request({"type": "nothing"}, None, None)
        assert cluster.running
        assert "handle_request" not in vars(sio)  # the hook is gone
        deadline = time.monotonic() + 5
        while not store.exists(key):
            assert time.monotonic() < deadline, "no key written"
            await asyncio.sleep(0.05)
        assert 0 < store.pttl(key) <= 3 * INTERVAL * 1000
        assert json.loads(store.get(key))["worker"] == worker_id()  # type: ignore[arg-type]
        assert await monitor.stop(5)
        assert not store.exists(key)
        assert dbctx.pool_status()["checked_out"] == 0
        await engine.dispose()

    try:
        asyncio.run(serve())
    finally:
        store.close()
