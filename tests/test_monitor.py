"""The ``/monitor`` namespace over the wire: real servers, real clients.

Each test starts ``tests.servers.app`` with ``--extra tests.servers.monitoring`` in
each async mode against PostgreSQL, and talks to it with real python-socketio
clients over WebSocket. ``/mon:grab`` holds a pooled connection until
``/_mon/release`` lets it go; ``/_mon/monitor`` shows the monitor from inside the
server (subscribers, whether its push loop runs, payloads built so far).
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
import socketio
from conftest import POOL_KEYS, ServerProcess, wait_for
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from monitor_client import MONITOR, POOL_STATUS, RATE, MonitorClient, is_busy

from socketio_dbctx import DBContext, MonitorNamespace

pytestmark = [pytest.mark.server, pytest.mark.postgres]

TOKEN = "tok-5e3c7a91d2"
EXTRA = ["tests.servers.monitoring"]
INTERVAL = 0.3
# Must match tests/servers/monitoring.py (not imported here: the server side may patch).
CALLABLE_TOKEN = "cb-ok"

EVENT_KEYS = {"count", "errors", "retries", "busy", "in_flight", "p50_ms", "p95_ms", "p99_ms"}
#: pool statuses, from best to worst
SEVERITY = ["healthy", "unknown", "warning", "exhausted", "unhealthy", "draining"]
STATUSES = set(SEVERITY)

ServerFactory = Callable[..., ServerProcess]


def start(server_factory: ServerFactory, async_mode: str, **config: Any) -> ServerProcess:
    """A test server with the monitoring extras, a monitor token and a short interval."""
    settings = {"DBCTX_MONITOR_AUTH": TOKEN, "DBCTX_MONITOR_INTERVAL": INTERVAL, **config}
    settings = {key: value for key, value in settings.items() if value is not None}
    return server_factory(async_mode, config=settings, extra=EXTRA)


_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", re.MULTILINE)


def log_records(server: ServerProcess, needle: str) -> list[str]:
    """The server's log records (each with its continuation lines) containing ``needle``."""
    log = server.log()
    starts = [m.start() for m in _RECORD_START.finditer(log)] + [len(log)]
    return [log[a:b] for a, b in zip(starts, starts[1:]) if needle in log[a:b]]


def monitor_state(server: ServerProcess) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(server.get("/_mon/monitor"))
    return state


class Net:
    """The real clients of one test; see the ``net`` fixture."""

    def __init__(self) -> None:
        self.clients: list[socketio.Client] = []
        self.servers: list[ServerProcess] = []

    def _track(self, client: socketio.Client, server: ServerProcess) -> None:
        self.clients.append(client)
        if server not in self.servers:
            self.servers.append(server)

    def subscribe(
        self, server: ServerProcess, auth: Any = None, *, expect_refusal: bool = False
    ) -> MonitorClient:
        """A :class:`MonitorClient` of ``server``; with ``expect_refusal=True`` its
        connect must fail (it is returned so the test can see nothing reached it)."""
        subscriber = MonitorClient(repr(server), server.log)
        self._track(subscriber.client, server)
        if expect_refusal:
            with pytest.raises(socketio.exceptions.ConnectionError):
                subscriber.connect(server.url, auth)
        else:
            subscriber.connect(server.url, auth)
        return subscriber

    def refusals(self, server: ServerProcess, auths: list[Any]) -> list[MonitorClient]:
        """Try every ``auth`` at once; each connect must be refused."""
        with ThreadPoolExecutor(len(auths)) as pool:
            futures = [
                pool.submit(self.subscribe, server, auth, expect_refusal=True) for auth in auths
            ]
            return [future.result(timeout=60) for future in futures]

    def connect(
        self, server: ServerProcess, namespace: str = "/t", client: socketio.Client | None = None
    ) -> socketio.Client:
        """A connected client of ``namespace`` (``client``: one with handlers set up)."""
        client = client or socketio.Client(reconnection=False)
        self._track(client, server)
        client.connect(
            server.url, namespaces=[namespace], transports=["websocket"], wait_timeout=10
        )
        return client

    def disconnect(self, *clients: socketio.Client) -> None:
        """Disconnect ``clients`` at once (a WebSocket close may wait for the server)."""
        with ThreadPoolExecutor(len(clients)) as pool:
            for future in [pool.submit(client.disconnect) for client in clients]:
                future.result(timeout=30)


@pytest.fixture
def net(server_factory: ServerFactory) -> Iterator[Net]:
    """Real python-socketio clients over WebSocket.

    At teardown the servers they talk to are stopped first, and only then are the
    clients disconnected: a client's WebSocket close otherwise often waits 3 s for the
    server's close frame, which would be most of this module's running time.
    """
    net = Net()
    yield net
    for server in net.servers:
        server.stop()
    connected = [client for client in net.clients if client.connected]
    if connected:
        net.disconnect(*connected)


class Grabber:
    """A client of ``/mon`` whose ``grab`` events each hold a pooled connection."""

    def __init__(self, client: socketio.Client) -> None:
        self.client = client
        self.acks: dict[str, Any] = {}
        self._lock = threading.Lock()

    def grab(self, key: str) -> None:
        def done(*args: Any) -> None:
            with self._lock:
                self.acks[key] = args[0] if len(args) == 1 else args

        self.client.emit("grab", key, namespace="/mon", callback=done)

    def acked(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.acks)


def release_all(server: ServerProcess, grabber: Grabber, count: int) -> None:
    """Release grabs until ``count`` of them have acked (waiting ones run after)."""

    def all_acked() -> bool:
        server.get("/_mon/release")
        return len(grabber.acked()) >= count

    wait_for(all_acked, 20, f"{count} grab acks after releasing", interval=0.1)
    assert set(grabber.acked().values()) == {True}, grabber.acked()


def hold(server: ServerProcess, grabber: Grabber, keys: list[str], held: int) -> dict[str, Any]:
    """Grab ``keys`` and wait until ``held`` connections are held server-side."""
    for key in keys:
        grabber.grab(key)
    return wait_for(
        lambda: (s := monitor_state(server))["held"] == held and s,
        15,
        f"{held} grabs holding a connection",
    )


def check_pool_dict(pool: dict[str, Any], *, bind: str = "default") -> None:
    """The pool dict of DESIGN section 5: exactly its keys, each of the right type."""
    assert set(pool) == POOL_KEYS, sorted(set(pool) ^ POOL_KEYS)
    assert pool["bind"] == bind
    assert pool["pool_class"] == "QueuePool"
    for key in ("size", "max_overflow", "checked_in", "checked_out", "overflow", "waiting"):
        assert type(pool[key]) is int, (key, pool[key])
    assert type(pool["long_held"]) is int
    assert pool["capacity"] == pool["size"] + pool["max_overflow"]
    assert isinstance(pool["utilization"], (int, float)) and 0 <= pool["utilization"] <= 1
    assert pool["utilization"] == pytest.approx(pool["checked_out"] / pool["capacity"], abs=1e-4)
    assert isinstance(pool["timeout"], (int, float)) and not isinstance(pool["timeout"], bool)
    assert pool["overflow"] >= 0
    assert pool["status"] in STATUSES


def check_payload(payload: dict[str, Any], server: ServerProcess) -> None:
    """The monitor payload of DESIGN section 6."""
    assert set(payload) == {"worker", "timestamp", "status", "pools", "events", "leaks"}
    assert payload["worker"] == f"{socket.gethostname()}:{server.proc.pid}"
    assert isinstance(payload["timestamp"], float)
    assert abs(payload["timestamp"] - time.time()) < 60
    assert isinstance(payload["pools"], dict) and "default" in payload["pools"]
    for name, pool in payload["pools"].items():
        check_pool_dict(pool, bind=name)
    # the worst of the pools'
    worst = max((p["status"] for p in payload["pools"].values()), key=SEVERITY.index)
    assert payload["status"] == worst, payload
    assert isinstance(payload["events"], dict)
    for key, stats in payload["events"].items():
        assert key.startswith("/") and ":" in key, key
        assert set(stats) == EVENT_KEYS, (key, stats)
    assert isinstance(payload["leaks"], list)


# -- auth ------------------------------------------------------------------------------

BAD_AUTHS: list[tuple[str, Any]] = [
    ("no auth", None),
    ("empty dict", {}),
    ("wrong token", {"token": "tok-wrong-0000"}),
    ("a prefix of the token", {"token": TOKEN[:-1]}),
    ("the token plus more", {"token": TOKEN + "x"}),
    ("the token in another key", {"password": TOKEN}),
    ("a number as token", {"token": 12345}),
    ("null token", {"token": None}),
    ("the token as a bare string", TOKEN),
    ("the token in a list", [TOKEN]),
]


def test_monitor_refuses_bad_auth_and_sends_nothing(
    async_mode: str, server_factory: ServerFactory, net: Net
) -> None:
    server = start(server_factory, async_mode)

    refused = net.refusals(server, [auth for _, auth in BAD_AUTHS])
    for (what, _), subscriber in zip(BAD_AUTHS, refused):
        assert not subscriber.client.connected, what
        assert subscriber.pushes() == [], f"{what}: a refused client got {subscriber.pushes()}"

    state = monitor_state(server)
    assert state["registered"] is True
    assert state["subscribers"] == 0, state
    assert state["loop_running"] is False, state
    assert state["snapshots"] == 0, "a payload was built for a refused client"
    assert server.log().count("monitor connection refused") == len(BAD_AUTHS)

    # the right token gets in, and its first pool_status comes at once
    good = net.subscribe(server, {"token": TOKEN})
    check_payload(good.wait_pushes(1)[0].data, server)
    assert monitor_state(server)["subscribers"] == 1


def test_monitor_auth_callable(async_mode: str, server_factory: ServerFactory, net: Net) -> None:
    """A callable decides; False and an exception both refuse (the latter is logged)."""
    server = start(
        server_factory,
        async_mode,
        DBCTX_MONITOR_AUTH="replaced-by-the-callable",
        MONITORING_AUTH_CALLABLE=True,
    )

    bad = [
        {"token": "nope"},
        {"token": "raise"},
        {"token": "replaced-by-the-callable"},
        CALLABLE_TOKEN,  # not a dict: the callable is given {}
    ]
    for auth, refused in zip(bad, net.refusals(server, bad)):
        assert refused.pushes() == [], auth
    assert monitor_state(server)["subscribers"] == 0

    good = net.subscribe(server, {"token": CALLABLE_TOKEN, "user": "ops"})
    check_payload(good.wait_pushes(1)[0].data, server)

    calls = json.loads(server.get("/_mon/auth_calls"))["calls"]
    expected = [
        {"token": "nope"},
        {"token": "raise"},
        {"token": "replaced-by-the-callable"},
        {},
        {"token": CALLABLE_TOKEN, "user": "ops"},
    ]
    key = json.dumps
    assert sorted(calls, key=key) == sorted(expected, key=key)
    log = server.log()
    assert "DBCTX_MONITOR_AUTH callable raised" in log
    assert "the auth backend is down" in log  # the traceback went to the log


def test_monitor_open_to_anyone_warns_at_start(
    async_mode: str, server_factory: ServerFactory, net: Net
) -> None:
    server = start(server_factory, async_mode, DBCTX_MONITOR_AUTH=False)

    warnings = log_records(server, "DBCTX_MONITOR_AUTH is False")
    assert len(warnings) == 1, server.log()[-3000:]
    assert "open to anyone" in warnings[0]
    assert " WARNING " in warnings[0] and "/monitor" in warnings[0]

    for auth in (None, {"token": "anything"}):
        subscriber = net.subscribe(server, auth)
        check_payload(subscriber.wait_pushes(1)[0].data, server)


def test_monitor_unset_is_not_registered(
    async_mode: str, server_factory: ServerFactory, net: Net
) -> None:
    server = start(server_factory, async_mode, DBCTX_MONITOR_AUTH=None)

    for refused in net.refusals(server, [None, {"token": TOKEN}]):
        assert refused.pushes() == []
    assert monitor_state(server)["registered"] is False
    assert "open to anyone" not in server.log()


# -- pushes ----------------------------------------------------------------------------


def min_gap(payloads: list[dict[str, Any]]) -> float:
    """The shortest time between two payloads' server timestamps."""
    stamps = [p["timestamp"] for p in payloads]
    assert len(stamps) >= 2, payloads
    return min(b - a for a, b in zip(stamps, stamps[1:]))


def test_push_cadence_and_no_work_without_subscribers(
    async_mode: str, server_factory: ServerFactory, net: Net
) -> None:
    server = start(server_factory, async_mode)
    assert monitor_state(server)["loop_running"] is False

    first = net.subscribe(server, {"token": TOKEN})
    first.wait_pushes(1, timeout=5)
    assert monitor_state(server)["loop_running"] is True

    window_start = time.monotonic()
    time.sleep(3.0)  # a measured window: how many pushes does it hold?
    window = time.monotonic() - window_start
    pushes = first.since(0, POOL_STATUS)
    in_window = [push for push in pushes[1:] if push.at >= window_start]
    assert len(in_window) >= 3, f"{len(in_window)} pushes in {window:.1f}s, every {INTERVAL}s"
    for push in pushes:
        check_payload(push.data, server)
    # one loop: the server stamps its payloads at least one interval apart (so no
    # more than window / interval + 1 of them fit in any window)
    assert min_gap(first.pushes()) >= INTERVAL * 0.9

    # a second subscriber: one push at once, then the same loop serves both
    second = net.subscribe(server, {"token": TOKEN})
    second.wait_pushes(4)
    later = {p["timestamp"] for p in second.pushes()[1:]}
    wait_for(
        lambda: later <= {p["timestamp"] for p in first.pushes()},
        5,
        "the second subscriber's pushes to be the first one's too (one loop for both)",
    )
    # still one loop: a second one would interleave its pushes with the first's
    assert min_gap(first.pushes()) >= INTERVAL * 0.9
    assert min_gap(second.pushes()[1:]) >= INTERVAL * 0.9
    assert monitor_state(server)["subscribers"] == 2

    # nobody listens: the loop ends and no payload is built any more
    net.disconnect(first.client, second.client)
    wait_for(lambda: not monitor_state(server)["loop_running"], 10, "the push loop to end")
    built = monitor_state(server)["snapshots"]
    time.sleep(6 * INTERVAL)  # a measured window of six intervals
    idle = monitor_state(server)
    assert idle["snapshots"] == built, "payloads were built while nobody listened"
    assert idle["loop_running"] is False and idle["subscribers"] == 0

    # a new subscriber starts it again
    third = net.subscribe(server, {"token": TOKEN})
    third.wait_pushes(3)
    assert monitor_state(server)["loop_running"] is True
    assert min_gap(third.pushes()) >= INTERVAL * 0.9


BAD_GET_STATUS_ARGS: list[Any] = [
    {"scope": "nope"},
    {"scope": "cluster"},  # no Redis message queue here
    {"scope": "local", "x": 1},
    {"scope": None},
    "cluster",
    ["x"],
    5,
    True,
]


def test_payload_get_status_and_health(
    async_mode: str,
    server_factory: ServerFactory,
    net: Net,
) -> None:
    # a long interval: the one push that comes is the one sent at once on connect
    server = start(server_factory, async_mode, DBCTX_MONITOR_INTERVAL=60)
    writer = net.connect(server)
    for n in range(3):
        assert isinstance(writer.call("write", f"row-{n}", namespace="/t", timeout=10)["id"], int)

    subscriber = net.subscribe(server, {"token": TOKEN})
    subscriber.wait_pushes(1, timeout=5)
    pushed = subscriber.pushes()
    assert len(pushed) == 1
    check_payload(pushed[0], server)
    pool = pushed[0]["pools"]["default"]
    assert (pool["size"], pool["max_overflow"], pool["capacity"]) == (5, 0, 5)
    assert pool["checked_out"] == 0 and pool["status"] == "healthy"
    assert pushed[0]["status"] == "healthy" and pushed[0]["leaks"] == []
    write = pushed[0]["events"]["/t:write"]
    assert (write["count"], write["errors"], write["retries"], write["busy"]) == (3, 0, 0, 0)
    assert write["in_flight"] == 0
    assert 0 < write["p50_ms"] <= write["p95_ms"] <= write["p99_ms"]

    for args in ((), ({},), ({"scope": "local"},)):
        status = subscriber.call("get_status", *args)
        check_payload(status, server)
        assert status["events"]["/t:write"]["count"] == 3
        assert status["timestamp"] >= pushed[0]["timestamp"]

    health = subscriber.call("health")
    assert set(health) == {"healthy", "latency_ms", "error"}
    assert health["healthy"] is True and health["error"] is None
    assert isinstance(health["latency_ms"], float) and health["latency_ms"] > 0
    assert len(subscriber.pushes()) == 1  # acks are not pushes

    for data in BAD_GET_STATUS_ARGS:
        ack = subscriber.call("get_status", data)
        assert set(ack) == {"error", "message", "retryable"}, (data, ack)
        assert ack["error"] == "invalid_request" and ack["retryable"] is False, (data, ack)
        assert isinstance(ack["message"], str) and ack["message"]
    # the subscriber is still served
    check_payload(subscriber.call("get_status"), server)
    assert monitor_state(server)["subscribers"] == 1
    server.wait_checked_out(0)


# -- status under load -----------------------------------------------------------------


def test_status_thresholds_and_monitor_answers_on_a_full_pool(
    async_mode: str,
    server_factory: ServerFactory,
    net: Net,
) -> None:
    """Pool 5/0, warning from 0.6: 2 held is healthy, 3 warning, 5 exhausted; a 6th
    event waits for admission. The monitor answers all the while (it is never held
    back by admission, whose queue timeout here is far longer than the calls'). A health
    probe that cannot get a connection from the full pool fails, and from then on the
    status is ``unhealthy`` (never healthy while /healthz would say 503) until a probe
    succeeds again."""
    server = start(
        server_factory,
        async_mode,
        DBCTX_WARN_UTILIZATION=0.6,
        DBCTX_MAX_IN_FLIGHT_PER_CLIENT=0,
        DBCTX_QUEUE_TIMEOUT=60,
    )
    grabber = Grabber(net.connect(server, "/mon"))
    subscriber = net.subscribe(server, {"token": TOKEN})

    expectations = [
        (["a", "b"], 2, "healthy"),
        (["c"], 3, "warning"),
        (["d", "e"], 5, "exhausted"),
    ]
    for keys, held, status in expectations:
        hold(server, grabber, keys, held)
        payload = subscriber.call("get_status", timeout=8)
        pool = payload["pools"]["default"]
        assert pool["checked_out"] == held, pool
        assert pool["utilization"] == pytest.approx(held / 5)
        assert pool["status"] == payload["status"], payload
        # a full pool also fails the push loop's own probe once it has waited 2 s
        allowed = {status, "unhealthy"} if status == "exhausted" else {status}
        assert pool["status"] in allowed, pool

    # a 6th event waits for a slot: still exhausted, and it shows as waiting
    grabber.grab("f")
    wait_for(
        lambda: server.stats()["pool"]["waiting"] == 1, 15, "the 6th grab to wait for admission"
    )
    started = time.monotonic()
    payload = subscriber.call("get_status", timeout=8)
    pool = payload["pools"]["default"]
    assert (pool["checked_out"], pool["waiting"]) == (5, 1), pool
    assert pool["status"] in ("exhausted", "unhealthy"), pool
    health = subscriber.call("health", timeout=8)
    answered_in = time.monotonic() - started
    # no connection is free: the probe gives up after health_check's own timeout
    assert health["healthy"] is False and "timed out" in health["error"], health
    assert answered_in < 8
    payload = subscriber.call("get_status", timeout=8)
    assert (payload["status"], payload["pools"]["default"]["status"]) == ("unhealthy",) * 2
    # pushes go on, and show it
    wait_for(
        lambda: any(p["pools"]["default"]["waiting"] == 1 for p in subscriber.pushes()),
        10,
        "a push showing the waiting event",
    )
    assert grabber.acked() == {}

    release_all(server, grabber, 6)
    server.wait_checked_out(0, timeout=40)  # the health probe also gets its turn
    payload = subscriber.call("get_status")
    assert payload["status"] == "healthy" and payload["pools"]["default"]["waiting"] == 0
    assert payload["events"]["/mon:grab"]["count"] == 6


def test_leak_reported_then_cleared(
    async_mode: str,
    server_factory: ServerFactory,
    net: Net,
) -> None:
    server = start(server_factory, async_mode, DBCTX_LEAK_THRESHOLD=1.0)
    client = net.connect(server, "/mon")
    sid = client.get_sid("/mon")
    grabber = Grabber(client)
    subscriber = net.subscribe(server, {"token": TOKEN})

    hold(server, grabber, ["slow"], 1)
    # the watchdog reports it although nobody asked for a status
    warnings = wait_for(
        lambda: log_records(server, "apparent connection leak"), 15, "the leak WARNING"
    )
    warning = warnings[0]
    assert " WARNING " in warning
    assert "/mon:grab" in warning and sid in warning, warning
    assert "tests/servers/monitoring.py" in warning and "in on_grab" in warning, warning

    status = subscriber.call("get_status")
    assert [leak["event"] for leak in status["leaks"]] == ["/mon:grab"]
    leak = status["leaks"][0]
    assert set(leak) == {"age_s", "event", "sid"}
    assert leak["sid"] == sid and leak["age_s"] >= 1.0
    assert status["pools"]["default"]["long_held"] == 1
    wait_for(lambda: any(p["leaks"] for p in subscriber.pushes()), 10, "a push listing the leak")
    for _ in range(3):  # scanning again does not report it again
        subscriber.call("get_status")
    assert len(log_records(server, "apparent connection leak")) == 1
    metrics = server.get("/metrics")
    assert "socketio_dbctx_leaks_total 1.0" in metrics

    release_all(server, grabber, 1)
    returned = wait_for(
        lambda: log_records(server, "connection reported as leaked was returned"),
        10,
        "the INFO when the leaked connection came back",
    )[0]
    assert " INFO " in returned and "/mon:grab" in returned and sid in returned
    status = subscriber.call("get_status")
    assert status["leaks"] == [] and status["pools"]["default"]["long_held"] == 0
    assert len(log_records(server, "apparent connection leak")) == 1
    server.wait_checked_out(0)


def burst_calls(subscriber: MonitorClient, event: str, count: int) -> tuple[list[Any], float]:
    """Emit ``count`` calls of ``event`` at once; return the acks and the seconds taken."""
    acks: list[Any] = []
    lock = threading.Lock()
    done = threading.Event()

    def callback(ack: Any) -> None:
        with lock:
            acks.append(ack)
            if len(acks) == count:
                done.set()

    started = time.monotonic()
    for _ in range(count):
        subscriber.client.emit(event, namespace=MONITOR, callback=callback)
    assert done.wait(30), f"{count - len(acks)} of {count} {event} calls got no ack"
    return acks, time.monotonic() - started


def test_rate_limit_of_get_status_and_health(
    async_mode: str, server_factory: ServerFactory, net: Net
) -> None:
    """MonitorNamespace.rate is 5 calls/s with a burst of 5, per budget: by default one
    budget per process, shared by every client of the token. Three connections with the
    same token bursting 30 calls at once get no more than one client would: ``busy``
    beyond what the bucket holds, and it refills; reconnecting does not refill it."""
    server = start(server_factory, async_mode)
    burst = 30
    rate = RATE
    assert MonitorNamespace.rate == rate

    for event in ("get_status", "health"):
        subscribers = [net.subscribe(server, {"token": TOKEN}) for _ in range(3)]
        # an empty budget to start from: drain it, then wait until it holds one token
        burst_calls(subscribers[0], event, burst)
        wait_for(
            lambda s=subscribers[0], e=event: not is_busy(s.call_once(e)),  # type: ignore[misc]
            5,
            f"{event} to answer again",
            interval=1.0 / rate,
        )
        started = time.monotonic()
        with ThreadPoolExecutor(len(subscribers)) as pool:
            futures = [pool.submit(burst_calls, s, event, burst // 3) for s in subscribers]
            results = [f.result(40) for f in futures]
        elapsed = time.monotonic() - started
        acks = [a for got, _ in results for a in got]
        assert len(acks) == burst

        busy = [a for a in acks if is_busy(a)]
        answered = [a for a in acks if not is_busy(a)]
        if event == "health":
            assert all(a["healthy"] is True for a in answered), answered
        else:
            assert all(
                set(a) == {"worker", "timestamp", "status", "pools", "events", "leaks"}
                for a in answered
            ), answered
        # what one client's bucket allows: what had refilled since the last call (at most
        # the burst), plus what refilled while the calls ran; never three buckets' worth
        assert len(answered) <= rate + rate * elapsed + 1, (len(answered), elapsed)
        assert busy, f"no busy ack among {burst} {event} calls in {elapsed:.2f}s"
        assert all(a == {**busy[0], "retryable": True} for a in busy), busy
        assert isinstance(busy[0]["message"], str) and busy[0]["message"]

        # a fresh connection does not bring a fresh budget
        subscribers[0].client.disconnect()
        late = net.subscribe(server, {"token": TOKEN})
        late_acks, late_elapsed = burst_calls(late, event, burst)
        late_answered = [a for a in late_acks if not is_busy(a)]
        assert len(late_answered) <= rate + rate * late_elapsed + 1, late_elapsed

        # the bucket refills
        wait_for(
            lambda s=late, e=event: not is_busy(s.call_once(e)),  # type: ignore[misc]
            5,
            f"{event} to answer again",
            interval=0.3,
        )
    server.wait_checked_out(0)


# -- secrets ---------------------------------------------------------------------------

SECRET = "s3cr3tpw"


class TestNoCredentialsAnywhere:
    """The server's database URL carries a password (trust auth ignores it)."""

    @pytest.fixture
    def postgres_url(self, postgres_url: str) -> str:
        parts = urlsplit(postgres_url)
        assert parts.password is None, "the test database URL already has a password"
        netloc = f"{parts.username or 'postgres'}:{SECRET}@{parts.hostname}:{parts.port or 5432}"
        return urlunsplit(parts._replace(netloc=netloc))

    def test_no_password_or_url_in_any_payload(
        self,
        async_mode: str,
        server_factory: ServerFactory,
        net: Net,
        postgres_url: str,
    ) -> None:
        server = start(
            server_factory,
            async_mode,
            DBCTX_LEAK_THRESHOLD=0.5,
            SQLALCHEMY_BINDS={"other": postgres_url},
        )
        assert SECRET in server.database_url
        writer = net.connect(server)
        writer.call("write", "x", namespace="/t", timeout=10)
        writer.call("boom", namespace="/t", timeout=10)
        grabber = Grabber(net.connect(server, "/mon"))
        hold(server, grabber, ["leaky"], 1)
        subscriber = net.subscribe(server, {"token": TOKEN})
        wait_for(lambda: any(p["leaks"] for p in subscriber.pushes()), 10, "a push with the leak")

        texts = {
            "pool_status": json.dumps(subscriber.pushes()),
            "get_status": json.dumps(subscriber.call("get_status")),
            "get_status cluster": json.dumps(subscriber.call("get_status", {"scope": "cluster"})),
            "health": json.dumps(subscriber.call("health")),
            "prometheus": server.get("/metrics"),
        }
        release_all(server, grabber, 1)

        host = urlsplit(postgres_url)
        needles = [
            SECRET,
            server.database_url,
            postgres_url,
            f"{host.scheme}://",
            f"@{host.hostname}:{host.port or 5432}",
            server.schema,
        ]
        for name, text in texts.items():
            for needle in needles:
                assert needle not in text, f"{needle!r} in the {name} payload: {text[:500]}"
        assert '"other"' in texts["get_status"]  # both binds were reported
        assert 'pool_name="other"' in texts["prometheus"]
        server.wait_checked_out(0)


def test_health_of_an_unreachable_database_names_no_credentials() -> None:
    """In-process (test client): a database that refuses connections makes ``health``
    unhealthy with a safe error; no payload carries the password or the URL."""
    url = f"postgresql+psycopg2://postgres:{SECRET}@127.0.0.1:1/test"
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 2, "max_overflow": 0, "pool_timeout": 2},
        DBCTX_MONITOR_AUTH=TOKEN,
    )
    db = SQLAlchemy()
    db.init_app(app)
    sio = SocketIO(app, async_mode="threading")
    DBContext(app, sio, db)
    client = sio.test_client(app, namespace=MONITOR, auth={"token": TOKEN})
    try:
        assert client.is_connected(MONITOR)
        pushed = [m["args"][0] for m in client.get_received(MONITOR) if m["name"] == "pool_status"]
        assert len(pushed) == 1
        health = client.emit("health", namespace=MONITOR, callback=True)
        status = client.emit("get_status", namespace=MONITOR, callback=True)
    finally:
        client.disconnect(namespace=MONITOR)
        with app.app_context():
            db.engine.dispose()

    assert health["healthy"] is False and isinstance(health["error"], str), health
    assert status["pools"]["default"]["checked_out"] == 0
    for text in (json.dumps(health), json.dumps(status), json.dumps(pushed)):
        for needle in (SECRET, url, "postgresql+psycopg2://", "127.0.0.1:1"):
            assert needle not in text, (needle, text)


# -- the Socket.IO Admin UI ------------------------------------------------------------


def test_admin_ui_works_beside_the_monitor(
    async_mode: str, server_factory: ServerFactory, net: Net
) -> None:
    server = start(server_factory, async_mode, MONITORING_ADMIN_UI=True)
    received: dict[str, list[Any]] = {}
    lock = threading.Lock()
    admin = socketio.Client(reconnection=False)

    def record(name: str) -> Callable[..., None]:
        def handler(*args: Any) -> None:
            with lock:
                received.setdefault(name, []).append(args)

        return handler

    for name in ("config", "all_sockets", "socket_connected", "event_sent", "server_stats"):
        admin.on(name, record(name), namespace="/admin")

    def got(name: str) -> list[Any]:
        with lock:
            return list(received.get(name, []))

    net.connect(server, "/admin", client=admin)
    wait_for(lambda: got("config"), 10, "the Admin UI's config event")
    features = got("config")[0][0]["supportedFeatures"]
    assert "ALL_EVENTS" in features

    subscriber = net.subscribe(server, {"token": TOKEN})
    subscriber.wait_pushes(3)  # /monitor still pushes
    sid = subscriber.sid
    wait_for(
        lambda: any(
            args[0]["nsp"] == MONITOR and args[0]["id"] == sid for args in got("socket_connected")
        ),
        10,
        "the Admin UI to see the /monitor subscriber connect",
    )
    wait_for(
        lambda: any(
            args[0] == MONITOR and args[1] == sid and args[2][0] == "pool_status"
            for args in got("event_sent")
        ),
        10,
        "the Admin UI to see a pool_status push",
    )
    # its own periodic stats go on too (every 2 s), counting both clients
    wait_for(
        lambda: any(args[0]["clientsCount"] >= 2 for args in got("server_stats")),
        10,
        "the Admin UI's server_stats with both clients",
    )
    check_payload(subscriber.call("get_status"), server)
