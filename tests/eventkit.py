"""Client-side helpers for the tests that drive real servers with an ``--extra``
module (``tests/servers/faults.py``, ``db_faults.py``, ``across.py``,
``timeouts.py``, ``reliability.py``).

* :class:`ExtraModule`: one module's namespace and HTTP state route, and the calls
  a test makes through them (``call``, ``runs``, ``event_stats``, ``retry_lines``).
* :func:`new_token`, :func:`assert_error_ack`, :func:`engine_options`,
  :func:`proxied` (a database URL through a ``tests/tcp_proxy.py`` proxy),
  :func:`direct_connection` (the test's own connection to a server's database).
* :func:`servers_stop_first`: the body of a module's ``connect_client`` fixture
  whose servers stop before its clients disconnect.
* :class:`InProcess`: the same ``call`` for Flask-SocketIO test clients (semantics
  tests, no server process).
* :class:`RawClient` and :func:`malformed_frames`: Socket.IO frames sent as they are,
  over a raw WebSocket (malformed packets).

The fixtures these tests share (``db_check``, ``pg_proxy``, ``mysql_proxy``) are in
``tests/conftest.py``.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

import pytest
import socketio
import sqlalchemy as sa
import websocket
from conftest import ServerProcess
from tcp_proxy import TcpProxy

ServerFactory = Callable[..., ServerProcess]
ClientFactory = Callable[..., socketio.Client]

#: What a client may see of a failure: no SQL, no exception names, no driver text
#: (``fault-secret-detail`` is the text ``tests/servers/faults.py``'s ``buggy`` raises).
LEAKY_WORDS = (
    "fault-secret-detail",
    "SELECT",
    "INSERT",
    "UPDATE",
    "fault_",
    "Error:",
    "psycopg2",
    "duplicate key",
    "division by zero",
    "Traceback",
    "terminating connection",
)


def new_token() -> str:
    """A fresh token for one request (16 hex digits)."""
    return uuid.uuid4().hex[:16]


class ExtraModule:
    """What a test sees of one ``--extra`` server module: its namespace and the route
    ``state_path`` that answers ``{"events": dbctx.metrics(), "calls": {...}}``.

    ``runs_by_namespace``: the module counts runs under ``"<namespace>:<event>:<token>"``
    (else ``"<event>:<token>"``). ``timeout``: how long :meth:`call` waits for an ack.
    """

    def __init__(
        self,
        namespace: str,
        state_path: str,
        *,
        timeout: float = 30.0,
        runs_by_namespace: bool = False,
    ) -> None:
        self.namespace = namespace
        self.state_path = state_path
        self.timeout = timeout
        self.runs_by_namespace = runs_by_namespace

    def call(
        self,
        client: socketio.Client,
        event: str,
        *args: Any,
        namespace: str | None = None,
        timeout: float | None = None,
    ) -> Any:
        """One call of ``event`` with ``args``; a missing ack fails the test (socketio's
        TimeoutError)."""
        data = None if not args else args[0] if len(args) == 1 else tuple(args)
        return client.call(
            event,
            data,
            namespace=namespace or self.namespace,
            timeout=self.timeout if timeout is None else timeout,
        )

    def state(self, server: ServerProcess) -> dict[str, Any]:
        """``GET state_path``: the events' metrics and the run counts, and whatever
        else the module adds."""
        data: dict[str, Any] = json.loads(server.get(self.state_path))
        return data

    def runs(
        self, server: ServerProcess, event: str, token: str, namespace: str | None = None
    ) -> int:
        """How many times the server ran handler ``event`` for ``token`` (retries
        included)."""
        key = f"{event}:{token}"
        if self.runs_by_namespace:
            key = f"{namespace or self.namespace}:{key}"
        return int(self.state(server)["calls"].get(key, 0))

    def event_stats(
        self, server: ServerProcess, event: str, namespace: str | None = None
    ) -> dict[str, Any]:
        """``dbctx.metrics()["<namespace>:<event>"]`` from inside the server ({} when
        the event has none)."""
        key = f"{namespace or self.namespace}:{event}"
        stats: dict[str, Any] = self.state(server)["events"].get(key, {})
        return stats

    def retry_lines(self, server: ServerProcess, event: str) -> list[tuple[int, int]]:
        """``(attempt, of)`` of every WARNING retry line the server logged for
        ``<namespace>:<event>``."""
        pattern = re.compile(
            rf"WARNING socketio_dbctx\.retry: retrying {re.escape(self.namespace)}:{event} "
            r"for sid \S+ \(attempt (\d+) of (\d+)\)"
        )
        return [(int(a), int(b)) for a, b in pattern.findall(server.log())]


class InProcess:
    """Flask-SocketIO test clients on one default namespace."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace

    def call(self, client: Any, event: str, *args: Any, namespace: str | None = None) -> Any:
        """Emit ``event`` with ``args``; the handler's ack."""
        return client.emit(event, *args, namespace=namespace or self.namespace, callback=True)

    def client_of(self, socketio: Any, app: Any, namespace: str | None = None) -> Any:
        """A test client connected to ``namespace``."""
        namespace = namespace or self.namespace
        client = socketio.test_client(app, namespace=namespace)
        assert client.is_connected(namespace)
        return client


def assert_error_ack(
    ack: Any, code: str, retryable: bool, leaks: tuple[str, ...] = LEAKY_WORDS
) -> None:
    """``ack`` is the contract's error payload, and none of ``leaks`` is in it."""
    assert isinstance(ack, dict), ack
    assert set(ack) == {"error", "message", "retryable"}, ack
    assert ack["error"] == code, ack
    assert ack["retryable"] is retryable, ack
    assert isinstance(ack["message"], str) and ack["message"], ack
    text = json.dumps(ack)
    leaked = [word for word in leaks if word in text]
    assert not leaked, f"the ack leaks {leaked}: {ack}"


def servers_stop_first(connect_client: ClientFactory, namespace: str) -> Iterator[ClientFactory]:
    """conftest's ``connect_client`` on ``namespace``, but at teardown the servers
    stop first; a module's ``connect_client`` fixture yields from this.

    A client-side WebSocket close waits up to 3 s for the server's close frame
    (websocket-client's close timeout), which the threading and gevent servers do
    not send in time; that alone would double a module's run time. The servers are
    of no further use once a test has checked them, so they are stopped and the
    clients see the connection drop.
    """
    used: list[tuple[socketio.Client, ServerProcess]] = []

    def connect(
        server: ServerProcess, namespace: str = namespace, **kwargs: Any
    ) -> socketio.Client:
        client = connect_client(server, namespace, **kwargs)
        used.append((client, server))
        return client

    yield connect
    for server in {id(server): server for _, server in used}.values():
        server.stop()
    deadline = time.monotonic() + 10
    for client, _ in used:
        while client.connected and time.monotonic() < deadline:
            time.sleep(0.02)


def engine_options(
    *, pool_size: int = 5, pool_timeout: float = 5.0, **connect_args: Any
) -> dict[str, Any]:
    """``SQLALCHEMY_ENGINE_OPTIONS`` for a server (the whole dict is replaced): no
    overflow, ``connect_args`` passed to the driver."""
    return {
        "pool_size": pool_size,
        "max_overflow": 0,
        "pool_timeout": pool_timeout,
        "connect_args": connect_args,
    }


@contextmanager
def direct_connection(server: ServerProcess, autocommit: bool = False) -> Iterator[sa.Connection]:
    """The test's own connection to ``server``'s database, outside its pool (it sees
    committed rows only); ``autocommit`` for named locks and ``KILL``."""
    engine = sa.create_engine(server.database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT") if autocommit else conn
    finally:
        engine.dispose()


def proxied(url: str, proxy: TcpProxy) -> str:
    """``url`` through ``proxy`` (PostgreSQL without TLS, so COMMITs are visible)."""
    parsed = sa.engine.make_url(url).set(host="127.0.0.1", port=proxy.port)
    if parsed.get_backend_name() == "postgresql":
        parsed = parsed.update_query_dict({"sslmode": "disable"})
    return parsed.render_as_string(hide_password=False)


# -- raw frames ---------------------------------------------------------------------------

#: a JSON array nested deeper than any decoder allows
DEEP = "[" * 10_000 + "]" * 10_000

Frames = list[tuple[Any, str]]


def malformed_frames(namespace: str) -> tuple[Frames, Frames]:
    """``(acked, dropped)``: raw frames to ``namespace``, each with what is wrong with it.
    The acked ones are events of the wrong shape with ack ids 1-3 (answered
    ``invalid_request``); the dropped ones cannot be decoded (ids 4-6, never answered)."""
    ns = namespace
    acked: Frames = [
        (f"42{ns},1[123,{{}}]", "event name not a string"),
        (f'42{ns},2{{"quick":"x"}}', "event payload not a list"),
        (f"42{ns},3[]", "event without a name"),
    ]
    dropped: Frames = [
        (f'42{ns},4["quick",{DEEP}]', "nesting too deep"),
        (f'42{ns},5["quick",' + "9" * 101 + "]", "integer too large"),
        (b"\x01\x02\x03 not a packet", "binary data where a packet was expected"),
        (f'42{ns},6["quick","unterminated', "undecodable packet"),
        ("49", "unknown packet type"),
    ]
    return acked, dropped


class RawClient:
    """A Socket.IO client speaking Engine.IO v4 over a raw WebSocket, connected to one
    namespace of the server at ``url``."""

    def __init__(self, url: str, namespace: str) -> None:
        self.namespace = namespace
        ws_url = url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        self.ws = websocket.create_connection(ws_url, timeout=10)
        assert self.ws.recv().startswith("0{")
        self.ws.send(f"40{namespace},")
        assert self.recv_matching(rf"40{namespace},\{{").startswith(f"40{namespace},")

    def send(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            self.ws.send_binary(frame)
        else:
            self.ws.send(frame)

    def recv_matching(self, pattern: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self.ws.recv()
            if message == "2":  # Engine.IO ping
                self.ws.send("3")
                continue
            if re.match(pattern, message):
                return str(message)
        pytest.fail(f"nothing matching {pattern!r} within {timeout}s")

    def ack(self, id: int) -> Any:
        message = self.recv_matching(rf"43{self.namespace},{id}\[")
        return json.loads(message[len(f"43{self.namespace},{id}") :])[0]

    def close(self) -> None:
        self.ws.close()
