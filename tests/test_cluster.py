"""Several workers on one Redis message queue, with a cluster-wide monitor.

Real worker processes (``tests.servers.app --extra tests.servers.cluster``) share one
PostgreSQL schema and one Redis message queue; real python-socketio clients talk to
them over WebSocket. Every test claims a Redis database of its own (1-15, by a lock
key), because the cluster keys (``socketio_dbctx:worker:*``) are global per Redis
database; the trade namespace is unique per test, because Socket.IO's pub/sub
channel is global per Redis server.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlsplit

import pytest
import redis
import socketio
import sqlalchemy as sa
from conftest import ServerProcess, wait_for
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from monitor_client import MONITOR, MonitorClient
from tcp_proxy import TcpProxy

from socketio_dbctx import ContextSetupError, DBContext
from socketio_dbctx.cluster import KEY_PREFIX
from socketio_dbctx.state import app_state

pytestmark = [pytest.mark.server, pytest.mark.postgres, pytest.mark.redis]

TOKEN = "cluster-test-token"
#: DBCTX_MONITOR_INTERVAL of every worker; a key lives three of them.
INTERVAL = 1.0
#: How long anything the cluster view promises "within an interval or three" may take
#: here (two shared CPU cores, other test runs at the same time): generous.
SLACK = 15.0
CAPACITY_WARNING = "more than PostgreSQL's max_connections"
REDIS_DOWN = "cluster view: Redis unavailable"
REDIS_BACK = "cluster view: Redis is back"

ServerFactory = Callable[..., ServerProcess]
ClientFactory = Callable[..., socketio.Client]
Subscribe = Callable[[ServerProcess], MonitorClient]


def worker_of(server: ServerProcess) -> str:
    """The ``host:pid`` a server reports itself as (it is the Popen'ed process)."""
    return f"{socket.gethostname()}:{server.proc.pid}"


# -- Redis: a database of our own (conftest's cluster_redis), and a proxy we can cut ----


@pytest.fixture
def redis_proxy(redis_url: str) -> Iterator[TcpProxy]:
    """A :class:`TcpProxy` in front of Redis, forwarding."""
    parts = urlsplit(redis_url)
    with TcpProxy(parts.hostname or "127.0.0.1", parts.port or 6379) as running:
        yield running


# -- workers and monitor subscribers ---------------------------------------------------------


@dataclass
class Fleet:
    """Starts workers on one message queue, sharing the first worker's schema."""

    redis_url: str
    trade_ns: str
    factory: ServerFactory
    workers: list[ServerProcess]

    @property
    def db_index(self) -> int:
        return int(urlsplit(self.redis_url).path.strip("/"))

    def start(
        self, async_mode: str, *, config: dict[str, Any] | None = None, pool_size: int = 5
    ) -> ServerProcess:
        server = self.factory(
            async_mode,
            pool_size=pool_size,
            config={
                "DBCTX_MONITOR_AUTH": TOKEN,
                "DBCTX_MONITOR_INTERVAL": INTERVAL,
                "CLUSTER_TRADE_NAMESPACE": self.trade_ns,
                **(config or {}),
            },
            extra=["tests.servers.cluster"],
            message_queue=self.redis_url,
            share_schema_with=self.workers[0] if self.workers else None,
        )
        self.workers.append(server)
        return server

    def key_of(self, server: ServerProcess) -> str:
        return f"{KEY_PREFIX}worker:{worker_of(server)}"


@pytest.fixture
def fleet(cluster_redis: str, server_factory: ServerFactory) -> Fleet:
    # cluster_redis first: it is torn down after the servers are stopped
    return Fleet(cluster_redis, f"/trade_{uuid.uuid4().hex[:10]}", server_factory, [])


def _workers(data: dict[str, Any]) -> set[str]:
    return set(data.get("workers", {}))


@pytest.fixture
def subscribe(fleet: Fleet) -> Iterator[Callable[[ServerProcess], MonitorClient]]:
    """``subscribe(server)``: a connected :class:`MonitorClient`, disconnected before
    the servers stop."""
    subscribers: list[MonitorClient] = []

    def make(server: ServerProcess) -> MonitorClient:
        subscriber = MonitorClient(repr(server), server.log)
        subscribers.append(subscriber)
        return subscriber.connect(server.url, {"token": TOKEN})

    yield make
    connected = [s.client for s in subscribers if s.client.connected]
    if connected:
        # In parallel: a WebSocket close waits up to 3 s for the server's close frame.
        with ThreadPoolExecutor(len(connected)) as pool:
            for future in [pool.submit(client.disconnect) for client in connected]:
                future.result(timeout=30)


@pytest.fixture(scope="module")
def max_connections(postgres_url: str) -> int:
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SHOW max_connections")).scalar_one())
    finally:
        engine.dispose()


def has_workers(*servers: ServerProcess) -> Callable[[dict[str, Any]], bool]:
    expected = {worker_of(s) for s in servers}
    return lambda data: _workers(data) == expected and "error" not in data


def write_count(payload: dict[str, Any]) -> int:
    return int(payload.get("events", {}).get("/t:write", {}).get("count", 0))


def assert_no_leaks(*servers: ServerProcess) -> None:
    for server in servers:
        server.wait_checked_out(0)
        assert server.alive(), f"{server} died:\n{server.log()[-4000:]}"


# -- the cluster view ---------------------------------------------------------------------------


def test_cluster_view_shows_every_worker_and_pushes_no_duplicates(
    async_mode: str,
    fleet: Fleet,
    subscribe: Subscribe,
    connect_client: ClientFactory,
    max_connections: int,
) -> None:
    """A subscriber on A sees B's events (handled only on B) in ``cluster_status`` and
    ``get_status({"scope": "cluster"})``; it gets A's own ``pool_status`` only, at the
    monitor's cadence, and ``cluster_status`` once per interval, not once per worker."""
    a = fleet.start(async_mode)
    b = fleet.start(async_mode)
    for server in (a, b):
        info = server.stats()
        assert info["async_mode"] == async_mode
        assert f'"worker":"{worker_of(server)}"' in server.get("/_cluster").replace(" ", "")
        assert '"cluster":true' in server.get("/_cluster").replace(" ", "")
    sub_a, sub_b = subscribe(a), subscribe(b)
    on_b = connect_client(b)
    writes = 7
    acks = [on_b.call("write", f"b{n}", namespace="/t", timeout=10) for n in range(writes)]
    assert all(isinstance(ack, dict) and isinstance(ack.get("id"), int) for ack in acks), acks

    both = has_workers(a, b)
    pushed = sub_a.wait(
        "cluster_status",
        lambda d: both(d) and write_count(d["workers"][worker_of(b)]) == writes,
        SLACK,
        f"A's cluster view to list A and B with B's {writes} writes",
    ).data
    assert write_count(pushed["workers"][worker_of(a)]) == 0, "A handled no write"
    assert pushed["status"] == "healthy"
    assert pushed["totals"] == {
        "checked_out": 0,
        "capacity": 10,
        "utilization": 0.0,
        "workers": 2,
        "max_connections": max_connections,
    }
    for name, server in (("A", a), ("B", b)):
        payload = pushed["workers"][worker_of(server)]
        assert payload["worker"] == worker_of(server), name
        assert payload["pools"]["default"]["capacity"] == 5, name

    acked = sub_a.call("get_status", {"scope": "cluster"})
    assert both(acked), acked
    assert write_count(acked["workers"][worker_of(b)]) == writes
    assert set(acked) >= {"timestamp", "status", "workers", "totals"}
    # B's own view is the same fleet
    assert both(sub_b.call("get_status", {"scope": "cluster"}))
    # the plain get_status is still this worker only
    assert sub_a.call("get_status")["worker"] == worker_of(a)
    assert sub_b.call("get_status", {"scope": "local"})["worker"] == worker_of(b)

    # cadence: six pool_status pushes on A, and the cluster_status pushes in between
    mark = sub_a.mark()
    pools = sub_a.wait_pushes(6, 6 * INTERVAL + SLACK, "pool_status", since=mark)
    span = pools[-1].at - pools[0].at
    clusters = [
        r for r in sub_a.since(mark, "cluster_status") if pools[0].at <= r.at <= pools[-1].at
    ]
    foreign = {r.data["worker"] for r in sub_a.since(0, "pool_status")} - {worker_of(a)}
    assert not foreign, f"A's subscriber received pool_status of other workers: {foreign}"
    foreign = {r.data["worker"] for r in sub_b.since(0, "pool_status")} - {worker_of(b)}
    assert not foreign, f"B's subscriber received pool_status of other workers: {foreign}"
    assert span >= 0.5 * 5 * INTERVAL, f"6 pool_status pushes within {span:.2f}s"
    assert len(clusters) <= 5 + 2, (
        f"{len(clusters)} cluster_status pushes in {span:.2f}s (5 intervals): duplicated"
    )
    assert all(both(r.data) for r in clusters[-2:]), [sorted(_workers(r.data)) for r in clusters]

    assert_no_leaks(a, b)
    for server in (a, b):
        assert CAPACITY_WARNING not in server.log(), "10 of 100 connections warned"


@pytest.mark.parametrize(
    ("mode_a", "mode_b"),
    [("threading", "eventlet"), ("eventlet", "gevent"), ("gevent", "threading")],
)
def test_broadcast_through_one_worker_reaches_clients_of_the_other(
    mode_a: str, mode_b: str, fleet: Fleet, connect_client: ClientFactory
) -> None:
    """A trade placed through B is stored once and reaches a client of A (and the other
    way round); bad trades ack ``invalid_request``, store and broadcast nothing."""
    a = fleet.start(mode_a)
    b = fleet.start(mode_b)
    ns = fleet.trade_ns
    heard: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}
    lock = threading.Lock()
    clients = {"a": connect_client(a, ns), "b": connect_client(b, ns)}
    for name, client in clients.items():

        def on_trade(data: dict[str, Any], name: str = name) -> None:
            with lock:
                heard[name].append(data)

        client.on("trade", on_trade, namespace=ns)

    def heard_ids(name: str) -> list[int]:
        with lock:
            return [t["id"] for t in heard[name]]

    via_b = clients["b"].call("trade", {"symbol": "AAPL", "qty": 3}, namespace=ns, timeout=10)
    assert via_b["ok"] is True and via_b["trade"]["worker"] == worker_of(b), via_b
    wait_for(lambda: via_b["trade"]["id"] in heard_ids("a"), SLACK, "B's trade on A")
    via_a = clients["a"].call("trade", {"symbol": "BRK.B", "qty": 1}, namespace=ns, timeout=10)
    assert via_a["trade"]["worker"] == worker_of(a), via_a
    wait_for(lambda: via_a["trade"]["id"] in heard_ids("b"), SLACK, "A's trade on B")
    wait_for(lambda: len(heard_ids("a")) == 2 == len(heard_ids("b")), SLACK, "both trades")
    assert heard["a"] == heard["b"] == [via_b["trade"], via_a["trade"]]
    assert clients["a"].call("count", namespace=ns, timeout=10) == 2

    bad_inputs: list[tuple[Any, ...]] = [
        (None,),
        ("AAPL",),
        ({},),
        ({"symbol": "AAPL"},),
        ({"symbol": "AAPL", "qty": 0},),
        ({"symbol": "AAPL", "qty": -5},),
        ({"symbol": "AAPL", "qty": True},),
        ({"symbol": "AAPL", "qty": 1.5},),
        ({"symbol": "AAPL", "qty": "1"},),
        ({"symbol": "AAPL", "qty": 10**12},),
        ({"symbol": "", "qty": 1},),
        ({"symbol": "aapl", "qty": 1},),
        ({"symbol": "X" * 13, "qty": 1},),
        ({"symbol": 5, "qty": 1},),
        ({"symbol": "AAPL", "qty": 1, "side": "buy"},),
        ({"symbol": "AAPL", "qty": 1}, "extra argument"),
    ]
    for args in bad_inputs:
        ack = clients["b"].call("trade", args, namespace=ns, timeout=10)
        assert isinstance(ack, dict) and ack.get("error") == "invalid_request", (args, ack)
        assert ack["retryable"] is False and ack["message"], (args, ack)
    # Broadcasts from B reach A in order: the next trade A hears must be this one.
    last = clients["b"].call("trade", {"symbol": "LAST", "qty": 9}, namespace=ns, timeout=10)
    wait_for(lambda: len(heard_ids("a")) >= 3, SLACK, "the last trade on A")
    assert heard_ids("a") == [via_b["trade"]["id"], via_a["trade"]["id"], last["trade"]["id"]]
    assert clients["a"].call("count", namespace=ns, timeout=10) == 3
    assert_no_leaks(a, b)


def test_killed_worker_leaves_the_cluster_view(fleet: Fleet, subscribe: Subscribe) -> None:
    """Three workers, one per async mode; B is SIGKILLed (no cleanup at all): its key
    expires three intervals after its last write and A's view drops it."""
    a = fleet.start("threading")
    b = fleet.start("eventlet")
    c = fleet.start("gevent")
    sub_a = subscribe(a)
    sub_a.wait("cluster_status", has_workers(a, b, c), SLACK, "A's view to list A, B and C")
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        ttl = client.pttl(fleet.key_of(b))
        assert 0 < ttl <= 3 * INTERVAL * 1000, f"B's key lives {ttl} ms, not 3 intervals"

        mark = sub_a.mark()
        killed = time.monotonic()
        b.proc.kill()
        b.proc.wait(10)
        gone = sub_a.wait(
            "cluster_status",
            has_workers(a, c),
            3 * INTERVAL + SLACK,
            "A's view to drop the killed B",
            since=mark,
        )
        elapsed = gone.at - killed
        print(f"killed worker left A's cluster view after {elapsed:.2f}s (interval {INTERVAL}s)")
        assert gone.data["totals"]["workers"] == 2
        assert gone.data["totals"]["capacity"] == 10
        assert client.exists(fleet.key_of(b)) == 0
        assert client.exists(fleet.key_of(a)) == 1 == client.exists(fleet.key_of(c))
    finally:
        client.close()
    # the survivors agree
    assert has_workers(a, c)(subscribe(c).call("get_status", {"scope": "cluster"}))
    assert_no_leaks(a, c)


#: How a failure is made: "refuse", connections refused; "stall", a network partition.
CUTS: dict[str, Callable[[TcpProxy], None]] = {
    "refuse": TcpProxy.cut,
    "stall": TcpProxy.partition,
}


@pytest.mark.parametrize(
    ("async_mode", "failure"),
    [
        ("threading", "refuse"),
        ("eventlet", "stall"),
        ("gevent", "stall"),
        ("threading", "refuse-at-start"),
    ],
)
def test_redis_outage_is_survived(
    async_mode: str,
    failure: str,
    fleet: Fleet,
    redis_proxy: TcpProxy,
    subscribe: Subscribe,
    connect_client: ClientFactory,
) -> None:
    """A reaches the cluster's Redis through a proxy that is cut (connections refused,
    or a partition where nothing answers) and restored; B reaches it directly. The
    message queue stays up. A keeps serving and pushing its own ``pool_status``;
    ``get_status`` answers; the outage is logged once; B's view drops A; after the
    restore A's view comes back with both workers."""
    proxied = f"redis://127.0.0.1:{redis_proxy.port}/{fleet.db_index}"
    at_start = failure.endswith("-at-start")
    if at_start:
        redis_proxy.cut()
    a = fleet.start(async_mode, config={"DBCTX_CLUSTER_REDIS_URL": proxied})
    b = fleet.start("threading")
    sub_a, sub_b = subscribe(a), subscribe(b)
    on_a = connect_client(a)
    if not at_start:
        sub_a.wait("cluster_status", has_workers(a, b), SLACK, "A's view before the cut")
        assert REDIS_DOWN not in a.log()
        CUTS[failure](redis_proxy)

    mark_a, mark_b = sub_a.mark(), sub_b.mark()
    wait_for(lambda: REDIS_DOWN in a.log(), SLACK, "the outage in A's log")
    # local monitoring goes on: A's own pool_status keeps coming
    pools = sub_a.wait_pushes(3, 3 * INTERVAL + SLACK, "pool_status", since=mark_a)
    assert {p.data["worker"] for p in pools} == {worker_of(a)}
    assert sub_a.call("get_status")["worker"] == worker_of(a)
    health = sub_a.call("health")
    assert health["healthy"] is True, health
    degraded = sub_a.call("get_status", {"scope": "cluster"})
    assert _workers(degraded) == {worker_of(a)}, degraded
    assert degraded["status"] == "unknown" and "redis" in degraded["error"].lower(), degraded
    assert degraded["totals"]["workers"] == 1
    # A still serves its clients (the message queue is not cut)
    assert isinstance(on_a.call("write", "during", namespace="/t", timeout=30)["id"], int)
    # B no longer hears from A: A's key expires
    sub_b.wait("cluster_status", has_workers(b), 3 * INTERVAL + SLACK, "B to drop A", mark_b)
    assert a.alive(), a.log()[-4000:]

    mark_a = sub_a.mark()
    redis_proxy.restore()
    sub_a.wait("cluster_status", has_workers(a, b), SLACK, "A's view after the restore", mark_a)
    wait_for(lambda: REDIS_BACK in a.log(), SLACK, "the recovery in A's log")
    assert has_workers(a, b)(sub_a.call("get_status", {"scope": "cluster"}))
    sub_b.wait("cluster_status", has_workers(a, b), SLACK, "B's view to list A again", mark_b)
    assert a.log().count(REDIS_DOWN) == 1, "the outage was logged more than once"
    assert_no_leaks(a, b)
    # Subscribers hear of the outage too: cluster_status keeps coming every interval,
    # the degraded payload (this worker only, with an error) while Redis is away.
    during = [
        r.data for r in sub_a.since(0, "cluster_status") if r.data.get("status") == "unknown"
    ]
    assert during, "no cluster_status was pushed while Redis was away"
    assert all(_workers(d) == {worker_of(a)} and "error" in d for d in during)


# -- capacity against max_connections ------------------------------------------------------


def test_fleet_capacity_above_max_connections_is_warned(
    fleet: Fleet, subscribe: Subscribe, max_connections: int
) -> None:
    """One worker with a pool just over half of max_connections is fine; a second one
    takes the fleet over it, and the log says so, once."""
    pool_size = max_connections // 2 + 10
    a = fleet.start("threading", pool_size=pool_size)
    sub_a = subscribe(a)
    alone = sub_a.wait("cluster_status", has_workers(a), SLACK, "A alone").data
    assert alone["totals"]["capacity"] == pool_size <= max_connections
    assert CAPACITY_WARNING not in a.log()

    b = fleet.start("eventlet", pool_size=pool_size)
    both = sub_a.wait("cluster_status", has_workers(a, b), SLACK, "A and B").data
    assert both["totals"]["capacity"] == 2 * pool_size > max_connections
    assert both["totals"]["max_connections"] == max_connections
    wait_for(lambda: CAPACITY_WARNING in a.log(), SLACK, "the capacity warning in A's log")
    line = next(line for line in a.log().splitlines() if CAPACITY_WARNING in line)
    assert "WARNING" in line and f"= {2 * pool_size} connections" in line, line
    assert f"max_connections = {max_connections}" in line, line
    # logged once, however many rounds follow
    sub_a.wait_pushes(3, 3 * INTERVAL + SLACK, "cluster_status", since=sub_a.mark())
    assert a.log().count(CAPACITY_WARNING) == 1


# -- bad input -------------------------------------------------------------------------------


def test_get_status_rejects_bad_scopes(
    fleet: Fleet,
    subscribe: Subscribe,
    server_factory: ServerFactory,
) -> None:
    """``get_status`` takes nothing, ``{"scope": "local"}`` or ``{"scope": "cluster"}``;
    anything else acks ``invalid_request``. Without Redis there is no cluster view."""
    clustered = fleet.start("threading")
    sub = subscribe(clustered)
    bad: list[Any] = [
        {"scope": "bogus"},
        {"scope": None},
        {"scope": "cluster", "extra": 1},
        {"scope": "local", "extra": 1},
        {"Scope": "cluster"},
        "cluster",
        ["cluster"],
        5,
    ]
    wrong = {}
    for data in bad:
        ack = sub.call("get_status", data)
        if not (isinstance(ack, dict) and ack.get("error") == "invalid_request"):
            wrong[repr(data)] = sorted(ack) if isinstance(ack, dict) else ack
        elif not (ack["retryable"] is False and ack["message"]):
            wrong[repr(data)] = ack
    # the good ones, for contrast
    assert "error" not in sub.call("get_status", {"scope": "local"})
    assert has_workers(clustered)(sub.call("get_status", {"scope": "cluster"}))

    alone = server_factory(
        "threading", config={"DBCTX_MONITOR_AUTH": TOKEN, "DBCTX_MONITOR_INTERVAL": INTERVAL}
    )
    lone = subscribe(alone)
    ack = lone.call("get_status", {"scope": "cluster"})
    assert ack["error"] == "invalid_request" and "redis" in ack["message"].lower(), ack
    lone.wait_pushes(3, 3 * INTERVAL + SLACK, "pool_status", since=0)
    assert not lone.since(0, "cluster_status"), "cluster_status without a cluster view"
    assert_no_leaks(clustered, alone)
    assert not wrong, f"accepted instead of invalid_request: {wrong}"


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:6379/0", "127.0.0.1:6379", "redis://127.0.0.1:99999/0"],
)
def test_invalid_cluster_redis_url_is_rejected_at_init_app(url: str, tmp_path: Any) -> None:
    """A URL redis cannot use is a configuration error naming the key, and leaves
    nothing registered (no half-set-up monitor)."""
    app = Flask(__name__)
    app.config.update(SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path}/x.db")
    db = SQLAlchemy(app)
    socketio_server = SocketIO(app, async_mode="threading")
    with pytest.raises(ContextSetupError, match="DBCTX_CLUSTER_REDIS_URL"):
        DBContext(app, socketio_server, db, monitor_auth=TOKEN, cluster_redis_url=url)
    assert "dbctx" not in app.extensions
    assert MONITOR not in socketio_server.server.namespace_handlers
    assert not socketio_server.namespace_handlers
    with app.app_context():
        db.engine.dispose()


@pytest.mark.redis
def test_stop_ends_the_cluster_loop_and_leaves_the_fleet_at_once(
    cluster_redis: str, tmp_path: Any
) -> None:
    """``dbctx.stop()`` ends the cluster view's loop (its shutdown path) and removes this
    worker's key at once, instead of after three intervals."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{tmp_path / 'stop.db'}",
        DBCTX_MONITOR_AUTH="t",
        DBCTX_MONITOR_INTERVAL=0.2,
        DBCTX_CLUSTER_REDIS_URL=cluster_redis,
    )
    db = SQLAlchemy(app)
    socketio = SocketIO(app, async_mode="threading")
    dbctx = DBContext(app, socketio, db)
    store = redis.Redis.from_url(cluster_redis)
    pattern = f"{KEY_PREFIX}worker:*"
    try:
        wait_for(lambda: list(store.scan_iter(match=pattern)), 10, "this worker's key")
        cluster = app_state(app).cluster
        assert cluster.running
        assert dbctx.stop(timeout=5) is True
        assert not cluster.running
        assert list(store.scan_iter(match=pattern)) == []
        assert dbctx.stop(timeout=1) is True  # stopping twice is harmless
    finally:
        dbctx.stop(timeout=5)
        store.close()
        with app.app_context():
            db.engine.dispose()
