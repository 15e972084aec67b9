"""Transactional emits (DESIGN section 3, "Emits are transactional"; issue 12).

Two halves:

* real servers (``tests.servers.app --extra tests.servers.emits``, namespace ``/e``)
  in the three async modes, with real python-socketio clients over WebSocket, on
  PostgreSQL, and two workers on a Redis message queue;
* in-process, with Flask-SocketIO's test client, on SQLite and PostgreSQL.

"After the commit" is checked by order: a session ``before_commit`` hook sends a
``committing`` marker and an ``after_commit`` hook a ``committed`` marker, both with
``immediate_emits()``; a held emit must come after ``committed``, and after a failed
COMMIT nothing but ``committing`` may come. Every client records what it receives in
arrival order, acks included, so "before the ack" is an index comparison. Absence is
proven by a later marker: a ``ping`` ack (or, across workers, a ``mark`` sent through
the same queue) arrives after everything sent to that client before it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import engineio
import pytest
import socketio as socketio_client
import sqlalchemy as sa
from conftest import ServerProcess, stored_names, wait_for
from eventkit import new_token
from flask import Flask, g, request
from flask_socketio import SocketIO, emit, join_room, leave_room, rooms, send
from flask_sqlalchemy import SQLAlchemy
from socketio.packet import ACK, EVENT, Packet

from socketio_dbctx import DBContext, DBContextNamespace, immediate_emits
from socketio_dbctx.state import app_state

EXTRA = ["tests.servers.emits"]
NS = "/e"
#: Waits for something that is expected within milliseconds (two shared CPU cores).
WAIT = 15.0
INTERNAL_ERROR = {
    "error": "internal_error",
    "message": "The server could not process this event.",
    "retryable": False,
}

ServerFactory = Callable[..., ServerProcess]
Entry = tuple[str, Any]


def seq(token: str, *steps: int, name: str = "seq") -> list[Entry]:
    return [(name, [token, step]) for step in steps]


def decode(pkt: Packet) -> Entry | None:
    """``(event name, argument)`` of an EVENT, ``("ack", value)`` of an ACK, else None."""
    if pkt.packet_type == EVENT:
        name, *args = pkt.data
        return name, args[0] if len(args) == 1 else args
    if pkt.packet_type == ACK:
        return "ack", pkt.data[0] if len(pkt.data) == 1 else pkt.data
    return None


# == real servers ========================================================================


class Listener:
    """A real python-socketio client that records every event and ack of its namespace
    in arrival order.

    Recording happens in the Engine.IO read loop, one packet after the other, before
    python-socketio hands each message to a thread of its own (where handlers could run
    out of order). The client answers the server's ``question`` call with
    ``["answer", token]``.
    """

    def __init__(self, server: ServerProcess, namespace: str, auth: Any = None) -> None:
        self.server = server
        self.namespace = namespace
        self.entries: list[Entry] = []
        #: entries up to here were returned by a call or a sync
        self._seen = 0
        self._cond = threading.Condition()
        self.client = socketio_client.Client(reconnection=False)
        receive = self.client.eio._receive_packet

        def record(pkt: Any) -> None:
            if pkt.packet_type == engineio.packet.MESSAGE and isinstance(pkt.data, str):
                decoded = Packet(encoded_packet=pkt.data)
                entry = decode(decoded)
                if entry is not None and (decoded.namespace or "/") == namespace:
                    with self._cond:
                        self.entries.append(entry)
                        self._cond.notify_all()
            receive(pkt)

        self.client.eio._receive_packet = record
        self.client.on("question", lambda token: ["answer", token], namespace=namespace)
        self.client.connect(
            server.url,
            namespaces=[namespace],
            transports=["websocket"],
            auth=auth,
            wait_timeout=10,
        )
        self.sid = self.client.get_sid(namespace)

    def mark(self) -> int:
        with self._cond:
            return len(self.entries)

    def until(self, predicate: Callable[[list[Entry]], bool], mark: int, what: str) -> list[Entry]:
        """Wait until ``predicate(entries since mark)``; return those entries."""
        deadline = time.monotonic() + WAIT
        with self._cond:
            while not predicate(self.entries[mark:]):
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(
                        f"{what}: not within {WAIT}s; got {self.entries[mark:]}\n"
                        f"--- server log ---\n{self.server.log()[-4000:]}"
                    )
                self._cond.wait(left)
            return list(self.entries[mark:])

    def start(self, event: str, *args: Any) -> int:
        """Send ``event`` asking for an ack, without waiting; returns the mark."""
        mark = self.mark()
        data = args[0] if len(args) == 1 else tuple(args)
        self.client.emit(event, data, namespace=self.namespace, callback=lambda *a: None)
        return mark

    def finish(self, mark: int, event: str) -> tuple[Any, list[Entry]]:
        """The ack of the event started at ``mark``, and what arrived before it."""
        entries = self.until(lambda e: any(n == "ack" for n, _ in e), mark, f"ack of {event}")
        index = next(i for i, (n, _) in enumerate(entries) if n == "ack")
        self._seen = mark + index + 1
        return entries[index][1], entries[:index]

    def call(self, event: str, *args: Any) -> tuple[Any, list[Entry]]:
        """Call ``event``; its ack, and everything that arrived between the call and it."""
        return self.finish(self.start(event, *args), event)

    def sync(self) -> list[Entry]:
        """What arrived after the last ack this client waited for (or since it
        connected), once a ``ping`` ack shows that nothing sent before it is still on
        its way."""
        start, token = self._seen, new_token()
        ack, _ = self.call("ping", token)
        assert ack == ["pong", token]
        with self._cond:
            return list(self.entries[start : self._seen - 1])  # up to the ping's ack


def events(entries: list[Entry]) -> list[Entry]:
    return [entry for entry in entries if entry[0] != "ack"]


Listen = Callable[..., Listener]


@pytest.fixture
def listen(server_factory: ServerFactory) -> Iterator[Listen]:
    """``listen(server, namespace=NS, auth=None)``: a connected :class:`Listener`.

    At teardown the servers stop first and the clients see their connections drop: a
    client-side WebSocket close would wait up to 3 s for each server's close frame.
    """
    made: list[Listener] = []

    def connect(server: ServerProcess, namespace: str = NS, auth: Any = None) -> Listener:
        listener = Listener(server, namespace, auth)
        made.append(listener)
        return listener

    yield connect
    for server in {id(x.server): x.server for x in made}.values():
        server.stop()
    deadline = time.monotonic() + 10
    for listener in made:
        while listener.client.connected and time.monotonic() < deadline:
            time.sleep(0.02)


def stored_keys(server: ServerProcess, like: str) -> list[str]:
    engine = sa.create_engine(server.database_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return sorted(
                conn.execute(
                    sa.text("SELECT key FROM emit_rows WHERE key LIKE :like"), {"like": like}
                ).scalars()
            )
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_only_a_successful_attempt_sends(
    async_mode: str, server_factory: ServerFactory, listen: Listen
) -> None:
    """A failing handler sends nothing, to the caller or to its room; a failing COMMIT
    (a deferred unique constraint) sends nothing after ``committing``; a retried event
    (its backend killed on the first run) sends the second run's emits once."""
    server = server_factory(async_mode, extra=EXTRA)
    caller, member = listen(server), listen(server)
    room = f"room-{new_token()}"
    member.call("join", room)

    failed = new_token()
    ack, before = caller.call("fail", failed, room)
    assert (ack, before) == (INTERNAL_ERROR, [])

    failed_commit = new_token()
    ack, before = caller.call("fail_commit", failed_commit, room)
    assert ack == INTERNAL_ERROR
    assert before == [("committing", failed_commit)]  # the COMMIT ran, and failed
    assert "UniqueViolation" in server.log()

    retried = new_token()
    ack, before = caller.call("retried", retried, room)
    assert ack == {"run": 2}
    assert before == [
        ("committing", retried),
        ("committed", retried),
        ("attempt", [retried, 2]),
        ("after", [retried, 2]),
    ]

    assert caller.sync() == []  # nothing came after the acks either
    assert member.sync() == [("room_attempt", [retried, 2])]
    assert stored_keys(server, f"{failed}%") == []
    assert stored_keys(server, f"{failed_commit}%") == []
    assert stored_keys(server, f"{retried}%") == [f"{retried}-2"]


@pytest.mark.postgres
def test_order_is_kept_and_held_emits_arrive_before_the_ack(
    async_mode: str, server_factory: ServerFactory, listen: Listen
) -> None:
    """Every emit API in call order, after ``committed`` and before the ack;
    ``immediate_emits()`` sends at once (even from an event that then fails);
    ``socketio.call()`` inside an event is not held (it would wait for ever)."""
    server = server_factory(async_mode, extra=EXTRA)
    client = listen(server)

    token = new_token()
    ack, before = client.call("ordered", token)
    assert ack == {"ok": token}
    assert before == [
        ("now", [token, 0]),
        ("committing", token),
        ("committed", token),
        *seq(token, 1),
        ("message", [token, 2]),
        *seq(token, 3),
        ("message", [token, 4]),
        *seq(token, 5),
        ("message", [token, 6]),
        *seq(token, 7, 8),
    ]

    token = new_token()
    ack, before = client.call("progress", token, False)
    assert ack == "done"
    progress = seq(token, 1, 2, 3, name="progress")
    assert before == [*progress, ("committing", token), ("committed", token), ("done", token)]

    token = new_token()
    ack, before = client.call("progress", token, True)
    assert ack == INTERNAL_ERROR
    assert before == seq(token, 1, 2, 3, name="progress")

    token = new_token()
    ack, before = client.call("ask", token)
    assert ack == {"answer": ["answer", token]}
    assert before == [("question", token)]

    assert client.sync() == []


@pytest.mark.postgres
def test_room_and_broadcast_targets_are_taken_at_call_time(
    async_mode: str, server_factory: ServerFactory, listen: Listen
) -> None:
    """A room emit reaches who was in the room when the handler emitted: a member who
    leaves before the commit still gets it, a client who joins does not. A broadcast
    reaches who was connected then, not a client that connects before the commit.
    ``join_room``/``leave_room`` take effect at once."""
    server = server_factory(async_mode, extra=EXTRA)
    caller, leaver, joiner = listen(server), listen(server), listen(server)
    room, token = f"room-{new_token()}", new_token()
    caller.call("join", room)
    leaver.call("join", room)

    mark = caller.start(
        "capture",
        {
            "room": room,
            "token": token,
            "join": joiner.sid,
            "leave": leaver.sid,
            "wait_late": True,
        },
    )
    late = listen(server, auth={"late": token})  # connects while the handler waits
    ack, before = caller.finish(mark, "capture")
    assert ack == {"joined": True, "left": True}
    assert before == [("room_msg", token), ("bcast", token)]

    assert leaver.sync() == [("room_msg", token), ("bcast", token)]
    assert joiner.sync() == [("bcast", token)]
    assert late.sync() == []


@pytest.mark.postgres
def test_a_background_tasks_emits_wait_for_its_commit(
    async_mode: str, server_factory: ServerFactory, listen: Listen
) -> None:
    """``dbctx.start_background_task``: the task's emits come after its own commit,
    whenever that is (before or after the spawning event's ack)."""
    server = server_factory(async_mode, extra=EXTRA)
    client = listen(server)
    token = new_token()
    mark = client.mark()
    ack, _ = client.call("spawn", token)
    assert ack == "spawned"
    entries = client.until(
        lambda e: ("bg", [token, 2]) in e, mark, "the background task's second emit"
    )
    assert events(entries) == [
        ("committing", token),
        ("committed", token),
        *seq(token, 1, 2, name="bg"),
    ]
    assert stored_keys(server, f"{token}%") == [f"{token}-bg"]


@pytest.mark.postgres
def test_the_off_switch_sends_at_call_time(
    async_mode: str, server_factory: ServerFactory, listen: Listen
) -> None:
    """``DBCTX_DEFER_EMITS=False``: emits go out when made, before the COMMIT, and
    even from a failing handler; ``dbctx.after_commit`` still waits for the commit."""
    server = server_factory(async_mode, extra=EXTRA, config={"DBCTX_DEFER_EMITS": False})
    client = listen(server)

    token = new_token()
    ack, before = client.call("ordered", token)
    assert ack == {"ok": token}
    assert before == [
        ("now", [token, 0]),
        *seq(token, 1),
        ("message", [token, 2]),
        *seq(token, 3),
        ("message", [token, 4]),
        *seq(token, 5),
        ("message", [token, 6]),
        *seq(token, 8),
        ("committing", token),
        ("committed", token),
        *seq(token, 7),  # the after_commit callback
    ]

    token = new_token()
    ack, before = client.call("fail", token)
    assert (ack, before) == (INTERNAL_ERROR, seq(token, 1))
    assert client.sync() == []


@pytest.mark.postgres
@pytest.mark.redis
def test_held_emits_go_through_the_message_queue_after_the_commit(
    async_mode: str, server_factory: ServerFactory, listen: Listen, redis_url: str
) -> None:
    """Two workers on one Redis queue: a client on worker B in a room gets, from
    events handled on worker A, nothing of a failing handler or a failing COMMIT, one
    copy of a retried event's emits, and the rest in call order after A's commit."""
    namespace = f"/e_{new_token()}"  # Socket.IO's Redis channel is global
    config = {"EMITS_NAMESPACE": namespace}
    a = server_factory(async_mode, extra=EXTRA, config=config, message_queue=redis_url)
    b = server_factory(
        async_mode, extra=EXTRA, config=config, message_queue=redis_url, share_schema_with=a
    )
    on_a, on_b = listen(a, namespace), listen(b, namespace)
    room = f"room-{new_token()}"
    on_a.call("join", room)
    on_b.call("join", room)
    mark = on_b.mark()

    token = new_token()
    ack, before = on_a.call("fail", token, room)
    assert (ack, before) == (INTERNAL_ERROR, [])
    ack, before = on_a.call("fail_commit", token, room)
    assert (ack, before) == (INTERNAL_ERROR, [("committing", token)])

    retried = new_token()
    ack, before = on_a.call("retried", retried, room)
    assert ack == {"run": 2}
    assert before == [
        ("committing", retried),
        ("committed", retried),
        ("attempt", [retried, 2]),
        ("room_attempt", [retried, 2]),
        ("after", [retried, 2]),
    ]

    ordered = new_token()
    expected = [("committing", ordered), ("committed", ordered), *seq(ordered, 1, 2, 3, 4)]
    ack, before = on_a.call("room_seq", ordered, room)
    assert (ack, before) == ("sent", expected)  # A's own copies, before its ack

    last = new_token()
    assert on_a.call("mark", last, room) == ("marked", [("mark", last)])
    got = on_b.until(lambda e: ("mark", last) in e, mark, "worker B to receive the mark")
    assert got == [("room_attempt", [retried, 2]), *expected, ("mark", last)]


# == in process: Flask-SocketIO's test client ================================================

DB_WAIT = 10.0


class Wire:
    """Test clients whose every received packet is recorded, in the order the server
    sent them, acks included (the test client keeps acks apart from events)."""

    def __init__(self, app: Flask, socketio: SocketIO) -> None:
        self.app = app
        self.socketio = socketio
        self.entries: list[tuple[str, Entry]] = []
        self._names: dict[str, str] = {}
        self._lock = threading.Lock()

    def connect(self, name: str, namespace: str = NS) -> Any:
        client = self.socketio.test_client(self.app, namespace=namespace)
        assert client.is_connected(namespace)
        self._names[client.eio_sid] = name
        self._spy()  # each test client replaces the server's send functions
        return client

    def sid(self, client: Any, namespace: str = NS) -> str:
        return str(self.socketio.server.manager.sid_from_eio_sid(client.eio_sid, namespace))

    def _record(self, eio_sid: str, pkt: Packet) -> None:
        entry = decode(pkt)
        if entry is not None and eio_sid in self._names:
            with self._lock:
                self.entries.append((self._names[eio_sid], entry))

    def _spy(self) -> None:
        server = self.socketio.server
        send_packet, send_eio_packet = server._send_packet, server._send_eio_packet

        def spy_packet(eio_sid: str, pkt: Packet) -> None:
            self._record(eio_sid, pkt)
            send_packet(eio_sid, pkt)

        def spy_eio_packet(eio_sid: str, eio_pkt: Any) -> None:
            self._record(eio_sid, Packet(encoded_packet=eio_pkt.data))
            send_eio_packet(eio_sid, eio_pkt)

        server._send_packet, server._send_eio_packet = spy_packet, spy_eio_packet

    def mark(self) -> int:
        with self._lock:
            return len(self.entries)

    def of(self, name: str, mark: int = 0) -> list[Entry]:
        """What ``name`` received since ``mark``, acks included."""
        with self._lock:
            return [entry for who, entry in self.entries[mark:] if who == name]

    def call(self, name: str, client: Any, event: str, *args: Any) -> tuple[Any, list[Entry]]:
        """Call ``event``; its ack, and what ``name`` received before it."""
        mark = self.mark()
        ack = client.emit(event, *args, namespace=NS, callback=True)
        got = self.of(name, mark)
        assert ("ack", ack) in got, got
        return ack, got[: got.index(("ack", ack))]


@pytest.fixture
def wire(app: Flask, socketio: SocketIO) -> Wire:
    return Wire(app, socketio)


@pytest.fixture
def dbctx(app: Flask, db: SQLAlchemy, socketio: SocketIO) -> DBContext:
    return DBContext(app, socketio, db, retry_delay=0)


def install_markers(db: SQLAlchemy, socketio: SocketIO) -> None:
    """``committing`` / ``committed`` sent at once to ``g.announce = (token, sid)``."""

    def marker(name: str) -> Callable[[Any], None]:
        def listener(session: Any) -> None:
            target = g.get("announce")
            if target is not None:
                with immediate_emits():
                    socketio.emit(name, target[0], to=target[1], namespace=NS)

        return listener

    sa.event.listen(db.session, "before_commit", marker("committing"))
    sa.event.listen(db.session, "after_commit", marker("committed"))


@pytest.fixture
def markers(db: SQLAlchemy, socketio: SocketIO) -> None:
    install_markers(db, socketio)


def committed(token: str) -> list[Entry]:
    return [("committing", token), ("committed", token)]


class Api:
    """Every emit API of Flask-SocketIO, from a namespace method or a function."""

    def __init__(self, socketio: SocketIO, namespace: Any = None) -> None:
        self.socketio = socketio
        self.namespace = namespace

    def emit_all(self, token: str) -> None:
        """``seq`` 1-8 to the caller (``message`` for a send) and ``all`` 9 to everyone
        but the caller, each API once; the namespace's own when there is one."""
        sid = request.sid
        emit("seq", [token, 1])
        send([token, 2])
        self.socketio.emit("seq", [token, 3], to=sid, namespace=NS)
        self.socketio.send([token, 4], to=sid, namespace=NS)
        if self.namespace is not None:
            self.namespace.emit("seq", [token, 5], room=sid)
            self.namespace.send([token, 6], room=sid)
        else:
            emit("seq", [token, 5], to=sid)
            send([token, 6], to=sid)
        emit("seq", [token, 7], namespace=NS, to=sid)
        self.socketio.emit("seq", [token, 8], namespace=NS, to=sid)
        emit("all", [token, 9], broadcast=True, include_self=False)


@pytest.mark.parametrize("kind", ["namespace", "function"])
def test_every_emit_api_is_held_and_sent_in_call_order_after_the_commit(
    app, db, socketio, dbctx, Item, url, wire, markers, kind
):
    """From a ``DBContextNamespace`` and from ``@dbctx.on``: every emit and send,
    an ``after_commit`` callback and an immediate emit, in call order; the held ones
    after the COMMIT (the row is visible on another connection), before the ack."""
    seen: list[list[str]] = []

    def body(api: Api, token: str) -> dict[str, str]:
        g.announce = (token, request.sid)
        with immediate_emits():
            emit("now", [token, 0])
        db.session.add(Item(name=token))
        api.emit_all(token)
        dbctx.after_commit(lambda: seen.append(stored_names(url)))
        emit("seq", [token, 10])
        return {"ok": token}

    if kind == "namespace":

        class Ns(DBContextNamespace):
            def on_go(self, token: str) -> dict[str, str]:
                return body(Api(socketio, self), token)

        socketio.on_namespace(Ns(NS))
    else:

        @dbctx.on("go", namespace=NS)
        def go(token: str) -> dict[str, str]:
            return body(Api(socketio), token)

    caller = wire.connect("caller")
    wire.connect("other")
    token = new_token()
    ack, before = wire.call("caller", caller, "go", token)
    assert ack == {"ok": token}
    assert before == [
        ("now", [token, 0]),
        *committed(token),
        *seq(token, 1),
        ("message", [token, 2]),
        *seq(token, 3),
        ("message", [token, 4]),
        *seq(token, 5),
        ("message", [token, 6]),
        *seq(token, 7, 8),
        *seq(token, 10),
    ]
    assert seen == [[token]]  # the callback ran after the commit, in call order
    assert wire.of("other") == [("all", [token, 9])]


def test_rollback_drops_held_emits_and_callbacks(
    app, db, socketio, dbctx, Item, url, wire, markers
):
    """A handler that raises, and one whose COMMIT fails: nothing they emitted is
    sent, to the caller or to anyone else, and no ``after_commit`` callback runs."""
    ran: list[str] = []

    class Ns(DBContextNamespace):
        def on_fail(self, token: str, where: str) -> str:
            g.announce = (token, request.sid)
            g.fail_commit = where == "commit"
            emit("seq", [token, 1])
            self.emit("all", [token, 2])  # everybody
            dbctx.after_commit(ran.append, token)
            db.session.add(Item(name=token))
            if where == "handler":
                raise RuntimeError("failed on purpose")
            return "committed?"

        def on_ping(self, token: str) -> str:
            emit("pong", token)
            return token

    def refuse(session: Any) -> None:
        if g.get("fail_commit"):
            raise RuntimeError("COMMIT refused by the test")

    sa.event.listen(db.session, "before_commit", refuse)
    socketio.on_namespace(Ns(NS))
    caller = wire.connect("caller")
    wire.connect("other")

    failed = new_token()
    assert wire.call("caller", caller, "fail", failed, "handler") == (INTERNAL_ERROR, [])
    failed_commit = new_token()
    ack, before = wire.call("caller", caller, "fail", failed_commit, "commit")
    assert ack == INTERNAL_ERROR
    assert before == [("committing", failed_commit)]

    token = new_token()
    assert wire.call("caller", caller, "ping", token) == (token, [("pong", token)])
    assert wire.of("other") == []
    assert ran == []
    assert stored_names(url) == []


def test_a_retried_event_sends_only_its_last_attempt(
    app, db, socketio, dbctx, Item, url, wire, markers
):
    runs: list[int] = []

    @dbctx.on("flaky", namespace=NS)
    def flaky(token: str) -> int:
        runs.append(len(runs) + 1)
        g.announce = (token, request.sid)
        emit("attempt", [token, runs[-1]])
        emit("all", [token, runs[-1]], broadcast=True, include_self=False)
        dbctx.after_commit(emit, "after", [token, runs[-1]], to=request.sid, namespace=NS)
        db.session.add(Item(name=f"{token}-{runs[-1]}"))
        db.session.flush()
        if runs[-1] < 3:
            raise sa.exc.OperationalError(
                "SELECT 1", {}, Exception("connection lost"), connection_invalidated=True
            )
        return runs[-1]

    caller = wire.connect("caller")
    wire.connect("other")
    token = new_token()
    ack, before = wire.call("caller", caller, "flaky", token)
    assert ack == 3 and runs == [1, 2, 3]
    assert before == [
        *committed(token),
        ("attempt", [token, 3]),
        ("after", [token, 3]),
    ]
    assert wire.of("other") == [("all", [token, 3])]
    assert stored_names(url) == [f"{token}-3"]


def test_after_commit_runs_in_call_order_and_a_failure_is_logged_and_counted(
    app, db, socketio, dbctx, Item, url, wire, markers, caplog
):
    """Callbacks and held emits share one queue, in call order. A callback that raises
    and an emit that cannot be sent (its data is not JSON) fail after the commit: each
    is logged with its traceback and counted, the rest still run, and the event acks
    success. Outside any scope ``after_commit`` runs at once."""
    calls: list[Any] = []

    def boom() -> None:
        raise RuntimeError("callback failed on purpose")

    class Ns(DBContextNamespace):
        def on_go(self, token: str) -> dict[str, bool]:
            g.announce = (token, request.sid)
            dbctx.after_commit(calls.append, 1)
            emit("seq", [token, 2])
            dbctx.after_commit(boom)
            emit("bad", object())  # fails only when sent
            dbctx.after_commit(lambda *a, **k: calls.append((a, k)), 3, x=4)
            db.session.add(Item(name=token))
            emit("seq", [token, 5])
            return {"ok": True}

    socketio.on_namespace(Ns(NS))
    caller = wire.connect("caller")
    metrics = app_state(app).metrics
    assert metrics.after_commit_failures == 0

    token = new_token()
    with caplog.at_level(logging.ERROR, logger="socketio_dbctx"):
        ack, before = wire.call("caller", caller, "go", token)
    assert ack == {"ok": True}
    assert before == [*committed(token), *seq(token, 2, 5)]
    assert calls == [1, ((3,), {"x": 4})]
    assert metrics.after_commit_failures == 2
    failures = [r for r in caplog.records if "held until the commit failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info for r in failures)
    assert stored_names(url) == [token]
    assert dbctx.metrics()[f"{NS}:go"]["errors"] == 0

    dbctx.after_commit(calls.append, "outside")
    assert calls[-1] == "outside"


def test_immediate_emits_send_at_once_inside_a_scope(
    app, db, socketio, dbctx, Item, wire, markers
):
    """Inside the block emits go out when made (even from an event that then fails);
    after it, holding resumes."""

    @dbctx.on("go", namespace=NS)
    def go(token: str, fail: bool) -> str:
        g.announce = (token, request.sid)
        emit("held", [token, 1])
        with immediate_emits():
            emit("now", [token, 2])
            socketio.emit("now", [token, 3], to=request.sid, namespace=NS)
        emit("held", [token, 4])
        db.session.add(Item(name=token))
        if fail:
            raise RuntimeError("failed on purpose")
        return token

    caller = wire.connect("caller")
    token = new_token()
    ack, before = wire.call("caller", caller, "go", token, False)
    assert ack == token
    assert before == [
        *seq(token, 2, 3, name="now"),
        *committed(token),
        *seq(token, 1, 4, name="held"),
    ]
    token = new_token()
    ack, before = wire.call("caller", caller, "go", token, True)
    assert (ack, before) == (INTERNAL_ERROR, seq(token, 2, 3, name="now"))


def test_defer_emits_off_in_the_config_sends_at_call_time(app, db, socketio, Item, wire):
    """``DBCTX_DEFER_EMITS=False``: emits go out when made, even from a failing
    event; ``after_commit`` still waits for the commit and is dropped on failure."""
    app.config["DBCTX_DEFER_EMITS"] = False
    dbctx = DBContext(app, socketio, db, retry_delay=0)
    install_markers(db, socketio)

    class Ns(DBContextNamespace):
        def on_go(self, token: str, fail: bool) -> str:
            g.announce = (token, request.sid)
            emit("seq", [token, 1])
            dbctx.after_commit(emit, "seq", [token, 2], to=request.sid, namespace=NS)
            self.emit("seq", [token, 3], room=request.sid)
            db.session.add(Item(name=token))
            if fail:
                raise RuntimeError("failed on purpose")
            return token

    socketio.on_namespace(Ns(NS))
    caller = wire.connect("caller")
    token = new_token()
    ack, before = wire.call("caller", caller, "go", token, False)
    assert (ack, before) == (token, [*seq(token, 1, 3), *committed(token), *seq(token, 2)])
    token = new_token()
    ack, before = wire.call("caller", caller, "go", token, True)
    assert (ack, before) == (INTERNAL_ERROR, seq(token, 1, 3))


@pytest.mark.parametrize("config", [True, False])
def test_the_namespace_attribute_overrides_the_config(
    app, db, socketio, Item, wire, markers, config
):
    """``defer_emits`` on a namespace wins over ``DBCTX_DEFER_EMITS``, both ways."""
    app.config["DBCTX_DEFER_EMITS"] = config
    DBContext(app, socketio, db, retry_delay=0)

    class Ns(DBContextNamespace):
        defer_emits = not config

        def on_go(self, token: str) -> str:
            g.announce = (token, request.sid)
            emit("seq", [token, 1])
            db.session.add(Item(name=token))
            return token

    socketio.on_namespace(Ns(NS))
    caller = wire.connect("caller")
    token = new_token()
    ack, before = wire.call("caller", caller, "go", token)
    assert ack == token
    if config:  # held by the app, sent at once by this namespace
        assert before == [*seq(token, 1), *committed(token)]
    else:
        assert before == [*committed(token), *seq(token, 1)]


def test_session_scope_holds_emits_until_it_commits(
    app, db, socketio, dbctx, Item, url, wire, markers
):
    socketio.on_namespace(DBContextNamespace(NS))  # a namespace to listen on
    caller = wire.connect("caller")
    sid = wire.sid(caller)

    token = new_token()
    with dbctx.session_scope() as session:
        g.announce = (token, sid)
        socketio.emit("scoped", [token, 1], to=sid, namespace=NS)
        session.add(Item(name=token))
        socketio.emit("scoped", [token, 2], to=sid, namespace=NS)
        assert wire.of("caller") == []  # held
    assert wire.of("caller") == [*committed(token), *seq(token, 1, 2, name="scoped")]

    mark = wire.mark()
    with pytest.raises(RuntimeError, match="on purpose"), dbctx.session_scope() as session:
        socketio.emit("scoped", [token, 3], to=sid, namespace=NS)
        dbctx.after_commit(socketio.emit, "scoped", [token, 4], to=sid, namespace=NS)
        session.add(Item(name=f"{token}-lost"))
        raise RuntimeError("failed on purpose")
    assert wire.of("caller", mark) == []

    def nothing_to_commit() -> None:
        socketio.emit("scoped", [token, 5], to=sid, namespace=NS)
        assert wire.of("caller", mark) == []

    dbctx.run_in_context(nothing_to_commit)
    assert wire.of("caller", mark) == seq(token, 5, name="scoped")
    assert stored_names(url) == [token]


def test_background_and_periodic_tasks_hold_emits_until_their_commit(
    app, db, socketio, dbctx, Item, url, wire, markers, caplog
):
    """Each task run emits after its own commit; a run that fails sends nothing."""
    socketio.on_namespace(DBContextNamespace(NS))  # a namespace to listen on
    caller = wire.connect("caller")
    sid = wire.sid(caller)

    def task(token: str, fail: bool) -> None:
        g.announce = (token, sid)
        socketio.emit("bg", [token, 1], to=sid, namespace=NS)
        db.session.add(Item(name=token))
        socketio.emit("bg", [token, 2], to=sid, namespace=NS)
        if fail:
            raise RuntimeError("task failed on purpose")

    token, failing = new_token(), new_token()
    with caplog.at_level(logging.ERROR, logger="socketio_dbctx"):
        for args in ((failing, True), (token, False)):
            thread = dbctx.start_background_task(task, *args)
            thread.join(DB_WAIT)
            assert not thread.is_alive()
    assert "background task task failed" in caplog.text
    assert wire.of("caller") == [*committed(token), *seq(token, 1, 2, name="bg")]

    runs: list[int] = []

    def tick(name: str) -> None:
        runs.append(len(runs) + 1)
        n = runs[-1]
        if n > 3:
            return
        g.announce = (f"{name}-{n}", sid)
        socketio.emit("tick", [name, n], to=sid, namespace=NS)
        db.session.add(Item(name=f"{name}-{n}"))
        if n == 2:
            raise RuntimeError("tick failed on purpose")

    mark = wire.mark()
    name = new_token()
    handle = dbctx.start_periodic_task(tick, 0.01, name)
    wait_for(lambda: len(runs) >= 4, DB_WAIT, "four runs of the periodic task")
    assert handle.stop(DB_WAIT)
    assert handle.failures == 1
    assert wire.of("caller", mark) == [
        *committed(f"{name}-1"),
        *seq(name, 1, name="tick"),
        *committed(f"{name}-3"),
        *seq(name, 3, name="tick"),
    ]
    assert stored_names(url) == sorted([token, f"{name}-1", f"{name}-3"])


@pytest.mark.parametrize("kind", ["namespace", "app"])
def test_an_error_handler_sends_its_own_emits_after_its_own_commit(
    app, db, socketio, dbctx, Item, url, wire, markers, kind
):
    """The failed event's emits are dropped; the error handler (the namespace's
    ``error()``, or ``@socketio.on_error``) runs in a scope of its own whose emits go
    out after its own commit, before its ack."""

    def fail(token: str) -> None:
        g.announce = (token, request.sid)
        emit("lost", token)
        socketio.emit("lost", token, namespace=NS)
        db.session.add(Item(name=f"{token}-lost"))
        raise RuntimeError(token)

    def handle(exc: Exception) -> dict[str, str]:
        token = str(exc)
        g.announce = (f"{token}-error", request.sid)
        emit("sorry", token)
        db.session.add(Item(name=f"{token}-error"))
        return {"handled": token}

    if kind == "namespace":

        class Ns(DBContextNamespace):
            def on_fail(self, token: str) -> None:
                fail(token)

            def error(self, exc: Exception) -> dict[str, str]:
                return handle(exc)

        socketio.on_namespace(Ns(NS))
    else:
        dbctx.on_event("fail", fail, namespace=NS)
        socketio.on_error(NS)(handle)

    caller = wire.connect("caller")
    wire.connect("other")
    token = new_token()
    ack, before = wire.call("caller", caller, "fail", token)
    assert ack == {"handled": token}
    assert before == [*committed(f"{token}-error"), ("sorry", token)]
    assert wire.of("other") == []
    assert stored_names(url) == [f"{token}-error"]


def test_room_targets_are_taken_at_call_time_and_rooms_change_at_once(
    app, db, socketio, dbctx, Item, wire, markers
):
    class Ns(DBContextNamespace):
        def on_join(self, room: str) -> None:
            join_room(room)

        def on_go(self, room: str, joiner: str, leaver: str) -> list[bool]:
            g.announce = ("go", request.sid)
            emit("room_msg", 1, to=room)
            join_room(room, sid=joiner)
            leave_room(room, sid=leaver)
            changed = [room in rooms(sid=joiner), room not in rooms(sid=leaver)]
            emit("room_msg", 2, to=room)
            db.session.add(Item(name="go"))
            return changed

        def on_again(self, room: str) -> None:
            emit("room_msg", 3, to=room)

    socketio.on_namespace(Ns(NS))
    caller, leaver, joiner = wire.connect("caller"), wire.connect("leaver"), wire.connect("joiner")
    room = f"room-{new_token()}"
    for client in (caller, leaver):
        client.emit("join", room, namespace=NS)
    ack, before = wire.call("caller", caller, "go", room, wire.sid(joiner), wire.sid(leaver))
    assert ack == [True, True]
    assert before == [*committed("go"), ("room_msg", 1), ("room_msg", 2)]
    assert wire.of("leaver") == [("room_msg", 1)]
    assert wire.of("joiner") == [("room_msg", 2)]

    mark = wire.mark()
    caller.emit("again", room, namespace=NS)
    assert wire.of("joiner", mark) == [("room_msg", 3)]
    assert wire.of("leaver", mark) == []


@pytest.fixture
def manual_commits(app: Flask, db: SQLAlchemy, socketio: SocketIO, Item: Any) -> DBContext:
    """``DBCTX_COMMIT_ON_SUCCESS=False``; ``/e``'s ``write(token, commit)`` adds a row,
    emits ``seq`` and commits only when asked."""
    app.config["DBCTX_COMMIT_ON_SUCCESS"] = False
    dbctx = DBContext(app, socketio, db)
    install_markers(db, socketio)

    class Ns(DBContextNamespace):
        def on_write(self, token: str, commit: bool) -> str:
            g.announce = (token, request.sid)
            db.session.add(Item(name=token))
            db.session.flush()
            emit("seq", [token, 1])
            if commit:
                db.session.commit()
            return token

    socketio.on_namespace(Ns(NS))
    return dbctx


def test_without_commit_on_success_a_handler_that_commits_itself_sends(manual_commits, url, wire):
    caller = wire.connect("caller")
    token = new_token()
    ack, before = wire.call("caller", caller, "write", token, True)
    assert (ack, before) == (token, [*committed(token), *seq(token, 1)])
    assert stored_names(url) == [token]


def test_without_commit_on_success_uncommitted_writes_send_nothing(
    manual_commits, socketio, Item, url, wire
):
    caller = wire.connect("caller")
    sid = wire.sid(caller)
    token = new_token()
    ack, before = wire.call("caller", caller, "write", token, False)
    assert stored_names(url) == []  # rolled back when the session closed
    assert (ack, before) == (token, [])
    with manual_commits.session_scope() as session:
        session.add(Item(name="scoped"))
        session.flush()
        socketio.emit("scoped", 1, to=sid, namespace=NS)
    assert stored_names(url) == []
    assert wire.of("caller") == [("ack", token)]
