"""Several workers on one Redis message queue, with a cluster-wide monitor.

Real worker processes (``tests.servers.app --extra tests.servers.cluster``) share one
PostgreSQL schema and one Redis message queue; real python-socketio clients talk to
them over WebSocket. Every test claims a Redis database of its own (1-15, by a lock
key), because the cluster keys (``socketio_dbctx:worker:*``) are global per Redis
database; the trade namespace is unique per test, because Socket.IO's pub/sub
channel is global per Redis server.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import socketio
import sqlalchemy as sa
from conftest import REPO_ROOT, ServerProcess, free_port, schema_url, wait_for
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from tcp_proxy import TcpProxy

from socketio_dbctx import ContextSetupError, DBContext
from socketio_dbctx.cluster import KEY_PREFIX

pytestmark = [pytest.mark.server, pytest.mark.postgres, pytest.mark.redis]

TOKEN = "cluster-test-token"
MONITOR = "/monitor"
#: DBCTX_MONITOR_INTERVAL of every worker; a key lives three of them.
INTERVAL = 1.0
#: How long anything the cluster view promises "within an interval or three" may take
#: here (two shared CPU cores, other test runs at the same time): generous.
SLACK = 15.0
LOCK_KEY = "socketio_dbctx_tests:cluster-lock"
LOCK_SECONDS = 900
CAPACITY_WARNING = "more than PostgreSQL's max_connections"
REDIS_DOWN = "cluster view: Redis unavailable"
REDIS_BACK = "cluster view: Redis is back"

ServerFactory = Callable[..., ServerProcess]
ClientFactory = Callable[..., socketio.Client]


def worker_of(server: ServerProcess) -> str:
    """The ``host:pid`` a server reports itself as (it is the Popen'ed process)."""
    return f"{socket.gethostname()}:{server.proc.pid}"


# -- Redis: a database of our own, and a proxy we can cut -------------------------------


@pytest.fixture
def cluster_redis(redis_url: str) -> Iterator[str]:
    """A Redis URL on a database (1-15) no other cluster test uses right now."""
    parts = urlsplit(redis_url)
    owner = uuid.uuid4().hex
    for index in range(15, 0, -1):  # database 0 is everybody's default
        url = urlunsplit((parts.scheme, parts.netloc, f"/{index}", "", ""))
        client = redis.Redis.from_url(url)
        if client.set(LOCK_KEY, owner, nx=True, ex=LOCK_SECONDS):
            break
        client.close()
    else:
        pytest.fail("every Redis database 1-15 is locked by another cluster test run")

    def clear() -> None:
        stale = list(client.scan_iter(match=f"{KEY_PREFIX}worker:*"))
        if stale:
            client.delete(*stale)

    clear()  # keys a killed run left behind
    try:
        yield url
    finally:
        clear()
        if client.get(LOCK_KEY) == owner.encode():
            client.delete(LOCK_KEY)
        client.close()


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


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    event: str
    data: dict[str, Any]


def _workers(data: dict[str, Any]) -> set[str]:
    return set(data.get("workers", {}))


class Subscriber:
    """A real ``/monitor`` client recording every ``pool_status`` and ``cluster_status``."""

    def __init__(self, url: str, describe: str, log: Callable[[], str]) -> None:
        self.describe = describe
        self.log = log
        self.client = socketio.Client(reconnection=False)
        self.received: list[Received] = []
        self._lock = threading.Lock()
        for event in ("pool_status", "cluster_status"):
            self.client.on(event, self._recorder(event), namespace=MONITOR)
        self.client.connect(
            url,
            namespaces=[MONITOR],
            transports=["websocket"],
            auth={"token": TOKEN},
            wait_timeout=10,
        )

    def _recorder(self, event: str) -> Callable[[dict[str, Any]], None]:
        def record(data: dict[str, Any]) -> None:
            with self._lock:
                self.received.append(Received(time.monotonic(), event, data))

        return record

    def mark(self) -> int:
        with self._lock:
            return len(self.received)

    def since(self, mark: int, event: str | None = None) -> list[Received]:
        with self._lock:
            return [r for r in self.received[mark:] if event is None or r.event == event]

    def wait(
        self,
        event: str,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
        message: str,
        since: int = 0,
    ) -> Received:
        """The first ``event`` received after ``since`` that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            seen = self.since(since, event)
            for item in seen:
                if predicate(item.data):
                    return item
            if time.monotonic() >= deadline:
                last = seen[-1].data if seen else None
                summary = (
                    {k: last.get(k) for k in ("status", "totals", "error", "worker")}
                    | {"workers": sorted(_workers(last))}
                    if last
                    else None
                )
                pytest.fail(
                    f"timed out after {timeout}s on {self.describe}: {message}; "
                    f"{len(seen)} {event} received, the last: {summary}\n--- server log ---\n"
                    + self.log()[-4000:]
                )
            time.sleep(0.05)

    def wait_count(self, event: str, count: int, timeout: float, since: int) -> list[Received]:
        wait_for(
            lambda: len(self.since(since, event)) >= count,
            timeout,
            f"{count} {event} pushes from {self.describe}",
        )
        return self.since(since, event)[:count]

    def get_status(self, *data: Any, timeout: float = 30.0) -> Any:
        """``get_status`` acked, waiting out the monitor's own rate limit if need be."""
        deadline = time.monotonic() + timeout
        while True:
            ack = self.client.call("get_status", *data, namespace=MONITOR, timeout=timeout)
            busy = isinstance(ack, dict) and ack.get("error") == "busy"
            if not busy or time.monotonic() >= deadline:
                return ack
            time.sleep(0.25)


@pytest.fixture
def subscribe(fleet: Fleet) -> Iterator[Callable[..., Subscriber]]:
    """``subscribe(server)`` (or ``subscribe(url, describe, log)``): a connected
    Subscriber, disconnected before the servers stop."""
    subscribers: list[Subscriber] = []

    def make(server: ServerProcess | str, *more: Any) -> Subscriber:
        if isinstance(server, ServerProcess):
            subscriber = Subscriber(server.url, repr(server), server.log)
        else:
            subscriber = Subscriber(server, *more)
        subscribers.append(subscriber)
        return subscriber

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
    subscribe: Callable[..., Subscriber],
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

    acked = sub_a.get_status({"scope": "cluster"})
    assert both(acked), acked
    assert write_count(acked["workers"][worker_of(b)]) == writes
    assert set(acked) >= {"timestamp", "status", "workers", "totals"}
    # B's own view is the same fleet
    assert both(sub_b.get_status({"scope": "cluster"}))
    # the plain get_status is still this worker only
    assert sub_a.get_status()["worker"] == worker_of(a)
    assert sub_b.get_status({"scope": "local"})["worker"] == worker_of(b)

    # cadence: six pool_status pushes on A, and the cluster_status pushes in between
    mark = sub_a.mark()
    pools = sub_a.wait_count("pool_status", 6, 6 * INTERVAL + SLACK, since=mark)
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


def test_killed_worker_leaves_the_cluster_view(
    fleet: Fleet, subscribe: Callable[..., Subscriber]
) -> None:
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
    assert has_workers(a, c)(subscribe(c).get_status({"scope": "cluster"}))
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
    subscribe: Callable[..., Subscriber],
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
    pools = sub_a.wait_count("pool_status", 3, 3 * INTERVAL + SLACK, since=mark_a)
    assert {p.data["worker"] for p in pools} == {worker_of(a)}
    assert sub_a.get_status()["worker"] == worker_of(a)
    health = sub_a.client.call("health", namespace=MONITOR, timeout=30)
    assert health["healthy"] is True, health
    degraded = sub_a.get_status({"scope": "cluster"})
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
    assert has_workers(a, b)(sub_a.get_status({"scope": "cluster"}))
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
    fleet: Fleet, subscribe: Callable[..., Subscriber], max_connections: int
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
    sub_a.wait_count("cluster_status", 3, 3 * INTERVAL + SLACK, since=sub_a.mark())
    assert a.log().count(CAPACITY_WARNING) == 1


# -- bad input -------------------------------------------------------------------------------


def test_get_status_rejects_bad_scopes(
    fleet: Fleet,
    subscribe: Callable[..., Subscriber],
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
        ack = sub.get_status(data)
        if not (isinstance(ack, dict) and ack.get("error") == "invalid_request"):
            wrong[repr(data)] = sorted(ack) if isinstance(ack, dict) else ack
        elif not (ack["retryable"] is False and ack["message"]):
            wrong[repr(data)] = ack
    # the good ones, for contrast
    assert "error" not in sub.get_status({"scope": "local"})
    assert has_workers(clustered)(sub.get_status({"scope": "cluster"}))

    alone = server_factory(
        "threading", config={"DBCTX_MONITOR_AUTH": TOKEN, "DBCTX_MONITOR_INTERVAL": INTERVAL}
    )
    lone = subscribe(alone)
    ack = lone.get_status({"scope": "cluster"})
    assert ack["error"] == "invalid_request" and "redis" in ack["message"].lower(), ack
    lone.wait_count("pool_status", 3, 3 * INTERVAL + SLACK, since=0)
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


# -- the sample app's launcher: python -m sample_app.workers ------------------------------

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


def test_sample_app_workers_launcher_runs_a_fleet_and_forwards_ctrl_c(
    launch: Callable[..., Launched],
    cluster_redis: str,
    postgres_url: str,
    pg_schema: str,
    subscribe: Callable[..., Subscriber],
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
    ids = {f"{socket.gethostname()}:{pid}" for _, pid in workers.values()}

    monitor = subscribe(workers[1][0], "sample worker 1", launched.output)
    monitor.wait(
        "cluster_status",
        lambda d: _workers(d) == ids and "error" not in d,
        SLACK,
        "worker 1's view to list both sample workers",
    )
    clients = []
    heard: list[dict[str, Any]] = []
    for url, _ in workers.values():
        client = socketio.Client(reconnection=False)
        client.on("order_placed", heard.append, namespace="/trading")
        client.connect(url, namespaces=["/trading"], transports=["websocket"], wait_timeout=10)
        clients.append(client)
    try:
        order = {"symbol": "CLUSTER", "side": "buy", "qty": 2, "price": 101.5}
        ack = clients[0].call("place_order", order, namespace="/trading", timeout=15)
        assert ack.get("ok") is True, ack
        wait_for(
            lambda: any(o.get("id") == ack["order"]["id"] for o in heard),
            SLACK,
            "worker 0's order_placed on worker 1",
        )
    finally:
        for client in clients:
            client.disconnect()

    launched.proc.send_signal(signal.SIGINT)
    assert launched.proc.wait(45) == 0, launched.output()
    assert "stopped 2 worker(s)" in launched.output()
    for _, pid in workers.values():
        assert pid_gone(pid), f"worker pid {pid} still runs after Ctrl-C"


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
    from sample_app.workers import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(argv, environ={})
    assert info.value.code == 2
    assert complaint in capsys.readouterr().err


def test_sample_app_workers_launcher_defaults() -> None:
    from sample_app.workers import DEFAULT_MESSAGE_QUEUE, parse_args

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
