"""Behaviour parity: the same app, registered each way, behaves as plain Flask-SocketIO.

``tests/parity_ways.py`` holds one set of handler bodies and registers them each way
(plain ``Namespace``, plain ``@socketio.on`` functions, ``DBContextNamespace``,
``@dbctx.on`` functions, and plain functions / a plain ``Namespace`` under
``DBCTX_WRAP_ALL_HANDLERS``). Each parity test runs one scenario on a way and on the
plain way, through Flask-SocketIO's test client, and compares what a client observes:
every packet the server sends, in order and to whom (events, acks, connect, connect
errors, disconnects), the acks the test client returns, and what the handlers saw
(``request.sid``, ``request.namespace``, ``request.event``, ``auth``, query string).

The only differences are the ones the README lists under "Differences from a plain
Namespace"; each is pinned by a ``test_difference_*`` test that asserts both
behaviours. Strict ``xfail`` tests mark differences that are bugs.

The concurrency-relevant parts run against real servers in the three async modes
(``tests/servers/parity.py``): concurrent events from several clients, rooms and
broadcasts reaching other clients, refusal, disconnect reasons, python-socketio's
per-client ``session(sid)``.
"""

from __future__ import annotations

import contextlib
import re
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import parity_ways as pw
import pytest
import socketio as python_socketio
from conftest import (
    ASYNC_MODES,
    REPO_ROOT,
    SERVER_START_TIMEOUT,
    ServerProcess,
    create_schema,
    drop_schema,
    free_port,
    schema_url,
)
from flask import Flask, g
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from server_launch import server_command, wait_ready
from socketio import packet as sio_packet

from socketio_dbctx import DBContext

NS = pw.NS
PIPED_WAYS = tuple(way for way in pw.WAYS if pw.piped(way))
PIPED_CLASS_WAYS = tuple(way for way in pw.CLASS_WAYS if pw.piped(way))
PACKET_NAMES = {
    sio_packet.CONNECT: "CONNECT",
    sio_packet.DISCONNECT: "DISCONNECT",
    sio_packet.EVENT: "EVENT",
    sio_packet.ACK: "ACK",
    sio_packet.CONNECT_ERROR: "CONNECT_ERROR",
    sio_packet.BINARY_EVENT: "BINARY_EVENT",
    sio_packet.BINARY_ACK: "BINARY_ACK",
}
INTERNAL_ERROR = {
    "error": "internal_error",
    "message": "The server could not process this event.",
    "retryable": False,
}


# -- in-process harness ------------------------------------------------------------------


class Harness:
    """One app with the parity handlers registered one way, and Flask-SocketIO test
    clients whose traffic is recorded in order.

    Session ids are random: everything observed is normalized, with each sid replaced
    by ``<label>`` (``<label@namespace>`` outside :data:`NS`) and WSGI environs by
    ``<environ>``.
    """

    def __init__(
        self,
        way: str,
        *,
        error: Callable[[Exception], Any] | None = None,
        on_error: Callable[[Exception], Any] | None = None,
        on_error_default: Callable[[Exception], Any] | None = None,
        catch_all: bool = False,
        legacy_events: dict[str, Callable[..., Any]] | None = None,
    ) -> None:
        self.way = way
        app = Flask(f"parity_{way}")
        app.config.update(SECRET_KEY="parity", SQLALCHEMY_DATABASE_URI="sqlite://")
        if way in pw.WRAP_ALL_WAYS:
            app.config["DBCTX_WRAP_ALL_HANDLERS"] = True
        self.db = SQLAlchemy(app)
        socketio = SocketIO(app, async_mode="threading")
        self.app, self.socketio = app, socketio
        dbctx = None
        # wrap-all covers handlers registered before DBContext and after it
        if pw.piped(way) and way != "wrap_all_functions":
            dbctx = DBContext(app, socketio, self.db)
        self.owner = pw.register(way, app, socketio, dbctx, error=error, catch_all=catch_all)
        pw.register(
            way,
            app,
            socketio,
            dbctx,
            pw.LEGACY_NS,
            events=legacy_events or pw.LEGACY_EVENTS,
            error=error,
        )
        if way == "wrap_all_functions":
            dbctx = DBContext(app, socketio, self.db)
        if on_error is not None:
            socketio.on_error(NS)(on_error)
        if on_error_default is not None:
            socketio.on_error_default(on_error_default)
        self.dbctx = dbctx
        self.labels: dict[str, str] = {}
        self.trace: list[Any] = []
        self.clients: dict[str, Any] = {}

    @property
    def env(self) -> pw.Env:
        env: pw.Env = self.app.extensions["parity"]
        return env

    # -- recording

    def _record(self, eio_sid: str, pkt: Any) -> None:
        kind = PACKET_NAMES.get(pkt.packet_type, pkt.packet_type)
        self.trace.append(
            [self.labels.get(eio_sid, eio_sid), kind, pkt.namespace or "/", pkt.data]
        )

    def _spy(self) -> None:
        """Record every packet the server sends: acks and connects go through
        ``_send_packet``, emits (encoded once for all recipients) through
        ``_send_eio_packet``. Each new test client replaces both, so call after one."""
        server = self.socketio.server
        send_packet, send_eio_packet = server._send_packet, server._send_eio_packet

        def spy_packet(eio_sid: str, pkt: Any) -> None:
            self._record(eio_sid, pkt)
            send_packet(eio_sid, pkt)

        def spy_eio_packet(eio_sid: str, eio_pkt: Any) -> None:
            if isinstance(eio_pkt.data, str):
                self._record(eio_sid, sio_packet.Packet(encoded_packet=eio_pkt.data))
            else:  # a binary attachment
                self.trace.append([self.labels.get(eio_sid, eio_sid), "ATTACHMENT", eio_pkt.data])
            send_eio_packet(eio_sid, eio_pkt)

        server._send_packet = spy_packet
        server._send_eio_packet = spy_eio_packet
        manager = server.manager
        if not getattr(manager, "_parity_labels", False):
            pre_connect = manager.pre_connect

            def labelled_pre_connect(eio_sid: str, namespace: str) -> Any:
                # learn each sid as it is made: refused connections' sids too
                sid = pre_connect(eio_sid, namespace)
                label = self.labels.get(eio_sid)
                if label is not None and namespace != "/":
                    self.labels[sid] = label if namespace == NS else f"{label}@{namespace}"
                return sid

            manager.pre_connect = labelled_pre_connect
            manager._parity_labels = True

    def client(self, label: str, namespace: str = NS, **kwargs: Any) -> Any:
        """A test client called ``label``, connected to ``namespace`` (``auth``,
        ``query_string``, ... as for ``socketio.test_client``)."""
        client = self.socketio.test_client(self.app)  # "/" first: not recorded
        self.labels[client.eio_sid] = label
        self.clients[label] = client
        self._spy()
        client.connect(namespace=namespace, **kwargs)
        return client

    def connect(self, label: str, namespace: str, **kwargs: Any) -> None:
        self.clients[label].connect(namespace=namespace, **kwargs)

    def norm(self, value: Any) -> Any:
        if isinstance(value, str):
            return f"<{self.labels[value]}>" if value in self.labels else value
        if isinstance(value, (list, tuple)):
            return [self.norm(item) for item in value]
        if isinstance(value, dict):
            if "REQUEST_METHOD" in value:
                return "<environ>"
            return {self.norm(key): self.norm(item) for key, item in value.items()}
        return value

    def call(self, label: str, event: str, *args: Any, namespace: str = NS, **kw: Any) -> Any:
        """Emit from client ``label`` and return what the test client returned, or
        the exception it raised as ``{"raised": [type, *args]}``."""
        kw.setdefault("callback", True)
        try:
            return {
                "ack": self.norm(self.clients[label].emit(event, *args, namespace=namespace, **kw))
            }
        except Exception as exc:
            return {"raised": [type(exc).__name__, *map(str, exc.args)]}

    def take(self) -> dict[str, Any]:
        """The packets sent and the handlers' notes since the last call."""
        trace, self.trace = self.trace, []
        notes = list(self.env.notes)
        self.env.notes.clear()
        return {"trace": self.norm(trace), "notes": self.norm(notes)}

    def step(self, label: str, event: str, *args: Any, **kw: Any) -> dict[str, Any]:
        """:meth:`call`, then :meth:`take`."""
        return {
            "call": [event, *self.norm(list(args))],
            **self.call(label, event, *args, **kw),
            **self.take(),
        }

    def sid(self, label: str, namespace: str = NS) -> str:
        client = self.clients[label]
        sid: str = self.socketio.server.manager.sid_from_eio_sid(client.eio_sid, namespace)
        return sid


# -- scenarios: each returns what a client observed ---------------------------------------


def scenario_acks(h: Harness) -> list[Any]:
    h.client("a")
    h.take()
    steps = [
        h.step("a", "echo", {"x": [1, 2]}),
        h.step("a", "echo", [1, "two"]),
        h.step("a", "echo", "text"),
        h.step("a", "echo", 0),
        h.step("a", "echo", None),
        h.step("a", "echo", b"\x00binary"),
        h.step("a", "pair", 1, "two"),  # a tuple: two ack arguments
        h.step("a", "nothing"),  # None: an ack without arguments
        h.step("a", "spread", 1, 2, 3),
        h.step("a", "optional", 1),
        h.step("a", "optional", 1, 2),
        h.step("a", "echo", "no ack asked", callback=False),
    ]
    return steps


def scenario_unknown_event(h: Harness) -> list[Any]:
    # a Namespace answers an event it has no method for (an empty ack); functions don't
    h.client("a")
    h.take()
    return [h.step("a", "no_such_event", 1)]


def scenario_emits(h: Harness) -> list[Any]:
    for label in ("a", "b", "c"):
        h.client(label)
    h.connect("c", pw.LEGACY_NS)
    h.step("a", "join", "lobby")
    h.step("b", "join", "lobby")
    h.take()
    hows = [
        "emit",
        "emit_two_args",
        "send",
        "send_json",
        "room",
        "room_exclude_self",
        "broadcast",
        "broadcast_exclude_self",
        "send_room_exclude_self",
        "server_emit",
        "server_emit_room",
        "owner_emit",
        "owner_emit_room",
        "other_namespace",
    ]
    return [h.step("a", "talk", how, f"hi-{how}") for how in hows]


def scenario_rooms(h: Harness) -> list[Any]:
    h.client("a")
    h.client("b")
    h.take()
    return [
        h.step("a", "join", "lobby"),
        h.step("a", "join", "kitchen"),
        h.step("b", "join", "lobby"),
        h.step("a", "talk", "room", "both"),
        h.step("a", "leave", "lobby"),
        h.step("b", "talk", "room", "only-b"),
        h.step("a", "join", "lobby"),
        h.step("b", "close", "lobby"),  # everyone leaves the room
        h.step("a", "talk", "room", "nobody"),
        h.step("a", "join", "lobby"),
    ]


def scenario_request_context(h: Harness) -> list[Any]:
    h.client("a", query_string="q=query-value", auth={"token": "t"})
    connected = h.take()
    return [
        connected,
        h.step("a", "whoami"),
        {"send": h.norm(h.clients["a"].send("text", callback=True, namespace=NS)), **h.take()},
        {
            "send_json": h.norm(
                h.clients["a"].send({"k": 1}, json=True, callback=True, namespace=NS)
            ),
            **h.take(),
        },
    ]


def scenario_connect(h: Harness) -> list[Any]:
    observed = []
    h.client("greeted", auth={"mode": "greet"})  # emits and joins a room in connect
    observed.append(h.take())
    h.client("anonymous")  # no auth at all
    observed.append(h.take())
    h.connect("anonymous", pw.LEGACY_NS)  # connect() without the auth argument
    observed.append(h.take())
    observed.append(h.step("anonymous", "talk", "server_emit_room", "x"))  # not in "lobby"
    observed.append({"connected": [h.clients[x].is_connected(NS) for x in h.clients]})
    return observed


def scenario_refusal(h: Harness) -> list[Any]:
    observed = []
    for mode in ("false", "refuse", "refuse_bare"):
        client = h.client(mode, auth={"mode": mode})
        observed.append({"mode": mode, "connected": client.is_connected(NS), **h.take()})
    return observed


def scenario_disconnect(h: Harness) -> list[Any]:
    h.client("watcher", auth={"mode": "watch"})
    h.client("leaver")
    h.client("kicked")
    h.connect("leaver", pw.LEGACY_NS)
    h.take()
    observed = []
    h.clients["leaver"].disconnect(namespace=NS)  # the client's own disconnect
    observed.append(h.take())
    h.clients["leaver"].disconnect(namespace=pw.LEGACY_NS)  # a disconnect() without reason
    observed.append(h.take())
    observed.append(h.step("kicked", "kick"))  # the server's disconnect()
    observed.append({"connected": {x: c.is_connected(NS) for x, c in h.clients.items()}})
    return observed


def scenario_app_error_handlers(h: Harness) -> list[Any]:
    h.client("a")
    h.take()
    return [h.step("a", "fail", "bad input"), h.step("a", "echo", "fine")]


def scenario_namespace_error(h: Harness) -> list[Any]:
    return scenario_app_error_handlers(h)


def scenario_catch_all(h: Harness) -> list[Any]:
    h.client("a")
    h.connect("a", pw.ANY_NS)
    h.take()
    return [
        h.step("a", "anything", 1, {"two": 2}, namespace=pw.ANY_NS),
        h.step("a", "where", "x", namespace=pw.ANY_NS),  # "*" in /any wins over namespace "*"
        h.step("a", "where", "y"),  # namespace "*" handler, called from /p
        h.step("a", "echo", "specific handlers still win"),
    ]


def scenario_flask_session(h: Harness) -> list[Any]:
    h.client("a")
    h.client("b")
    h.take()
    return [h.step("a", "count"), h.step("a", "count"), h.step("b", "count")]


def scenario_test_client(h: Harness) -> list[Any]:
    """What the test client's own API returns (not the recorded packets)."""
    a, b = h.client("a", auth={"mode": "greet"}), h.client("b")
    observed: list[Any] = [h.norm(a.get_received(NS))]
    a.emit("join", "lobby", namespace=NS)
    b.emit("join", "lobby", namespace=NS)
    observed.append(h.norm(a.emit("talk", "room", "hello", namespace=NS, callback=True)))
    observed.append(h.norm(a.emit("talk", "send", "plain text", namespace=NS)))
    observed.append(h.norm(a.send({"k": "v"}, json=True, namespace=NS, callback=True)))
    observed.append(h.norm(a.get_received(NS)))
    observed.append(h.norm(b.get_received(NS)))
    observed.append(h.norm(a.emit("kick", namespace=NS, callback=True)))
    observed.append([a.is_connected(NS), b.is_connected(NS)])
    b.disconnect(namespace=NS)
    observed.append([a.is_connected(NS), b.is_connected(NS), a.is_connected("/")])
    return observed


#: name -> (scenario, Harness options, which ways, the reference: "plain_namespace" for
#: what every way must do alike, "kind" for the plain way of the same kind)
SCENARIOS: dict[str, tuple[Callable[[Harness], Any], dict[str, Any], tuple[str, ...], str]] = {
    "acks": (scenario_acks, {}, pw.WAYS, "plain_namespace"),
    "unknown_event": (scenario_unknown_event, {}, pw.WAYS, "kind"),
    "emits": (scenario_emits, {}, pw.WAYS, "plain_namespace"),
    "rooms": (scenario_rooms, {}, pw.WAYS, "plain_namespace"),
    "request_context": (scenario_request_context, {}, pw.WAYS, "plain_namespace"),
    "connect": (scenario_connect, {}, pw.WAYS, "plain_namespace"),
    "refusal": (scenario_refusal, {}, pw.WAYS, "plain_namespace"),
    "disconnect": (scenario_disconnect, {}, pw.WAYS, "plain_namespace"),
    "on_error": (
        scenario_app_error_handlers,
        {"on_error": pw.error_handler("on_error")},
        pw.WAYS,
        "plain_namespace",
    ),
    "on_error_default": (
        scenario_app_error_handlers,
        {"on_error_default": pw.error_handler("default")},
        pw.WAYS,
        "plain_namespace",
    ),
    "on_error_wins_over_default": (
        scenario_app_error_handlers,
        {
            "on_error": pw.error_handler("on_error"),
            "on_error_default": pw.error_handler("default"),
        },
        pw.WAYS,
        "plain_namespace",
    ),
    "error_handler_without_value": (
        scenario_app_error_handlers,
        {"on_error_default": pw.silent_error_handler},
        pw.WAYS,
        "plain_namespace",
    ),
    "error_handler_tuple": (
        scenario_app_error_handlers,
        {"on_error": pw.pair_error_handler},
        pw.WAYS,
        "plain_namespace",
    ),
    "namespace_error": (
        scenario_namespace_error,
        # what the request looks like inside error() is a pinned difference
        {"error": pw.error_handler("namespace", show_request=False)},
        pw.CLASS_WAYS,
        "kind",
    ),
    "catch_all": (scenario_catch_all, {"catch_all": True}, pw.FUNCTION_WAYS, "kind"),
    "flask_session": (scenario_flask_session, {}, pw.WAYS, "plain_namespace"),
    "test_client": (scenario_test_client, {}, pw.WAYS, "plain_namespace"),
}


def _parity_cases() -> Iterator[Any]:
    for name, (_, _, ways, ref) in SCENARIOS.items():
        for way in ways:
            reference = pw.reference(way) if ref == "kind" else ref
            if way != reference:
                yield pytest.param(name, way, reference, id=f"{name}-{way}")


def observe(scenario: str, way: str) -> Any:
    run, options, _, _ = SCENARIOS[scenario]
    return run(Harness(way, **options))


@pytest.mark.parametrize(("scenario", "way", "reference"), list(_parity_cases()))
def test_same_as_plain_flask_socketio(scenario: str, way: str, reference: str) -> None:
    expected = observe(scenario, reference)
    assert observe(scenario, way) == expected


def test_the_scenarios_observe_something() -> None:
    """The parity comparison is only as good as what the scenarios see: spot-check
    the plain way's observations against Flask-SocketIO's documented behaviour."""
    acks = observe("acks", "plain_namespace")
    assert acks[0]["ack"] == {"x": [1, 2]}
    assert acks[6]["trace"] == [["a", "ACK", NS, [1, "two"]]]
    assert acks[7]["trace"] == [["a", "ACK", NS, []]]
    assert acks[-1]["trace"] == [] and acks[-1]["ack"] is None
    emits = {step["call"][1]: step["trace"] for step in observe("emits", "plain_namespace")}
    assert emits["room_exclude_self"] == [
        ["b", "EVENT", NS, ["said", "hi-room_exclude_self"]],
        ["a", "ACK", NS, ["said"]],
    ]
    assert [who for who, *_ in emits["broadcast"]] == ["a", "b", "c", "a"]
    context = observe("request_context", "plain_namespace")
    assert context[1]["ack"] == {
        "sid": "<a>",
        "namespace": NS,
        "event": {"message": "whoami", "args": []},
    }
    connect_note = context[0]["notes"][0][2]
    assert connect_note["auth"] == {"token": "t"} and connect_note["q"] == "query-value"
    refusal = observe("refusal", "plain_namespace")
    assert refusal[1]["trace"] == [
        ["refuse", "CONNECT_ERROR", NS, {"message": "go away", "data": {"code": 7}}]
    ]
    disconnect = observe("disconnect", "plain_namespace")
    assert disconnect[0]["trace"] == [
        ["watcher", "EVENT", NS, ["left", {"sid": "<leaver>", "reason": "client disconnect"}]]
    ]
    catch_all = observe("catch_all", "plain_functions")
    assert catch_all[0]["ack"]["event"] == "anything"
    assert catch_all[2]["ack"]["request"]["namespace"] == NS


# -- the documented differences, pinned ----------------------------------------------------


@pytest.mark.parametrize("way", PIPED_WAYS)
def test_difference_failing_handler_is_acked(way: str) -> None:
    """Plain: a handler that raises (or whose error handler raises) sends no ack and the
    test client raises; a connect handler that raises escapes too. Piped: an error
    payload is the ack, and a crashed connect refuses the client."""
    observed: dict[str, Any] = {}
    for current in (pw.reference(way), way):
        h = Harness(current)
        h.client("a")
        h.take()
        failed = h.step("a", "fail", "bad")
        try:
            crashed: Any = h.client("crash", auth={"mode": "crash"}).is_connected(NS)
        except RuntimeError as exc:
            crashed = ["raised", str(exc)]
        crash_trace = h.take()["trace"]
        broken = Harness(current, on_error_default=pw.broken_error_handler)
        broken.client("a")
        observed[current] = (failed, crashed, crash_trace, broken.call("a", "fail", "bad"))

    failed, crashed, crash_trace, broken_ack = observed[pw.reference(way)]
    assert failed["raised"] == ["ValueError", "bad"] and failed["trace"] == []
    assert crashed == ["raised", "connect crashed"] and crash_trace == []
    assert broken_ack == {"raised": ["KeyError", "the error handler broke"]}

    failed, crashed, crash_trace, broken_ack = observed[way]
    assert failed["ack"] == INTERNAL_ERROR
    assert failed["trace"] == [["a", "ACK", NS, [INTERNAL_ERROR]]]
    assert crashed is False
    assert crash_trace == [
        ["crash", "CONNECT_ERROR", NS, {"message": "internal_error", "data": INTERNAL_ERROR}]
    ]
    assert broken_ack == {"ack": INTERNAL_ERROR}


@pytest.mark.parametrize("way", PIPED_WAYS)
def test_difference_arity_check(way: str) -> None:
    """Plain: the handler is called with the wrong arguments, and its ``TypeError``
    escapes (or reaches the error handler). Piped: the handler is not called; the ack
    is ``invalid_request`` (or the error handler's answer to an ``InvalidRequestError``)."""
    plain, piped = pw.reference(way), way
    results = {}
    for current in (plain, piped):
        h = Harness(current)
        h.client("a")
        h.take()
        with_handler = Harness(current, on_error_default=pw.error_handler("default"))
        with_handler.client("a")
        results[current] = (
            h.step("a", "nothing", "unexpected"),
            with_handler.call("a", "nothing", "unexpected"),
        )

    bare, handled = results[plain]
    assert bare["raised"][0] == "TypeError"
    assert bare["notes"] == []  # raised before the body ran: Python's own check
    assert handled["ack"]["exc"][0] == "TypeError"

    bare, handled = results[piped]
    assert bare["ack"] == {
        "error": "invalid_request",
        "message": "nothing takes 0 argument(s), got 1",
        "retryable": False,
    }
    assert bare["notes"] == []  # the handler was not called
    assert handled["ack"]["exc"] == ["InvalidRequestError", "nothing takes 0 argument(s), got 1"]
    assert handled["ack"]["request"]["event"] == {"message": "nothing", "args": ["unexpected"]}


@pytest.mark.parametrize("way", PIPED_WAYS)
def test_difference_fresh_app_context(way: str) -> None:
    """Plain (Flask <= 3.1): an event runs in the app context active around it, so an
    outer ``g`` is visible, and an error handler shares the failed handler's ``g``.
    Piped: every event and every error handler gets an app context of its own."""
    results = {}
    for current in (pw.reference(way), way):
        h = Harness(current, on_error_default=pw.error_handler("default", show_g=True))
        with h.app.app_context():
            g.outer = "outer value"
            h.client("a")
            inside = h.call("a", "probe_g")
        outside = h.call("a", "probe_g")
        failed = h.call("a", "fail", "set by the handler")
        results[current] = (inside, outside, failed["ack"]["g_failed_with"])
    name = f"parity_{pw.reference(way)}"
    assert results[pw.reference(way)] == (
        {"ack": {"outer": "outer value", "app": name}},
        {"ack": {"outer": None, "app": name}},
        "set by the handler",
    )
    name = f"parity_{way}"
    assert results[way] == (
        {"ack": {"outer": None, "app": name}},
        {"ack": {"outer": None, "app": name}},
        None,
    )


@pytest.mark.parametrize("way", PIPED_CLASS_WAYS)
def test_difference_namespace_error_comes_first(way: str) -> None:
    """With both a namespace ``error()`` and ``@socketio.on_error(namespace)``, plain
    Flask-SocketIO answers with the app's handler (its ``_handle_event`` runs before
    ``Namespace.trigger_event`` sees the exception); socketio_dbctx asks the
    namespace's ``error()`` first."""
    answers = {}
    for current in ("plain_namespace", way):
        h = Harness(
            current,
            error=pw.error_handler("namespace", show_request=False),
            on_error=pw.error_handler("on_error", show_request=False),
        )
        h.client("a")
        answers[current] = h.call("a", "fail", "bad")["ack"]
    assert answers["plain_namespace"] == {"by": "on_error", "exc": ["ValueError", "bad"]}
    assert answers[way] == {"by": "namespace", "exc": ["ValueError", "bad"]}


@pytest.mark.parametrize("way", PIPED_CLASS_WAYS)
def test_difference_namespace_error_sees_the_request(way: str) -> None:
    """Plain ``Namespace.error()`` runs after Flask-SocketIO popped the event's request
    context (no ``request.sid`` there); socketio_dbctx runs it inside it, as the app's
    error handlers run."""
    answers = {}
    for current in ("plain_namespace", way):
        h = Harness(current, error=pw.error_handler("namespace"))
        h.client("a")
        answers[current] = h.call("a", "fail", "bad")["ack"]["request"]
    assert answers["plain_namespace"] is None
    assert answers[way] == {
        "sid": "<a>",
        "namespace": NS,
        "event": {"message": "fail", "args": ["bad"]},
    }


@pytest.mark.parametrize(
    ("way", "handlers"),
    [
        pytest.param(way, handlers, id=f"{way}-{handlers}")
        for handlers in ("namespace_error", "on_error", "on_error_default")
        for way in PIPED_WAYS
        if handlers != "namespace_error" or way == "dbctx_namespace"
    ],
)
def test_difference_connect_refusal_is_never_swallowed(way: str, handlers: str) -> None:
    """Plain: an error handler that takes a connect handler's exception lets the client
    in: ``Namespace.error()`` takes even ``ConnectionRefusedError``, the app's handlers
    take the built-in one and any crash. Piped: refused, always."""
    options: dict[str, Any] = {
        "namespace_error": {"error": pw.error_handler("namespace")},
        "on_error": {"on_error": pw.error_handler("on_error")},
        "on_error_default": {"on_error_default": pw.error_handler("default")},
    }[handlers]
    modes = (
        ("refuse", "builtin", "crash") if handlers == "namespace_error" else ("builtin", "crash")
    )
    connected = {}
    for current in (pw.reference(way), way):
        h = Harness(current, **options)
        connected[pw.piped(current)] = [
            h.client(m, auth={"mode": m}).is_connected(NS) for m in modes
        ]
    assert connected[False] == [True] * len(modes)
    assert connected[True] == [False] * len(modes)


def test_readme_lists_every_pinned_difference() -> None:
    """The README's "Differences from a plain Namespace" names exactly the
    ``test_difference_*`` tests of this module."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Differences from a plain Namespace", 1)[1].split("\n#", 1)[0]
    named = set(re.findall(r"`(test_difference_\w+)`", section))
    defined = {name for name in globals() if name.startswith("test_difference_")}
    assert named == defined


# -- differences that are bugs (strict xfail: they fail until socketio_dbctx is fixed) -----


@pytest.mark.parametrize("way", PIPED_WAYS)
def test_legacy_disconnect_handler_sees_the_same_request_event(way: str) -> None:
    observed = []
    for current in (pw.reference(way), way):
        h = Harness(current, legacy_events={"disconnect": pw.legacy_disconnect_event})
        h.client("a", namespace=pw.LEGACY_NS)
        h.take()
        h.clients["a"].disconnect(namespace=pw.LEGACY_NS)
        observed.append(h.take()["notes"])
    assert observed[0] == [
        [
            pw.LEGACY_NS,
            "legacy_disconnect_event",
            {
                "sid": "<a@/legacy>",
                "namespace": pw.LEGACY_NS,
                "event": {"message": "disconnect", "args": []},
            },
        ]
    ]
    assert observed[1] == observed[0]


@pytest.mark.parametrize("way", PIPED_WAYS)
def test_builtin_connection_refused_error_refuses_with_the_same_message(way: str) -> None:
    traces = []
    for current in (pw.reference(way), way):
        h = Harness(current)
        h.client("builtin", auth={"mode": "builtin"})
        traces.append(h.take()["trace"])
    assert traces[0] == [
        ["builtin", "CONNECT_ERROR", NS, {"message": "Connection refused by server"}]
    ]
    assert traces[1] == traces[0]


@pytest.mark.parametrize("mode", ["refuse", "builtin", "crash"])
def test_wrap_all_plain_namespace_error_does_not_let_refused_clients_in(mode: str) -> None:
    calls: list[str] = []

    def error(exc: Exception) -> Any:
        calls.append(type(exc).__name__)
        return {"handled": True}

    refused = {}
    for way in ("dbctx_namespace", "wrap_all_namespace"):
        calls.clear()
        h = Harness(way, error=error)
        refused[way] = (not h.client(mode, auth={"mode": mode}).is_connected(NS), len(calls))
    assert refused["dbctx_namespace"] == (True, 1 if mode == "crash" else 0)
    assert refused["wrap_all_namespace"] == refused["dbctx_namespace"]


def test_a_function_is_piped_only_where_dbctx_registered_it() -> None:
    h = Harness("plain_functions")
    dbctx = DBContext(h.app, h.socketio, h.db)
    dbctx.on("fail", namespace=pw.ANY_NS)(pw.fail)  # the same function, elsewhere
    h.client("a")
    h.connect("a", pw.ANY_NS)
    assert h.call("a", "fail", "bad", namespace=pw.ANY_NS) == {"ack": INTERNAL_ERROR}
    assert h.call("a", "fail", "bad") == {"raised": ["ValueError", "bad"]}


# -- real servers, real clients ----------------------------------------------------------
#
# One server per async mode with the four ways that can share an app (one namespace
# each, ``/<way>``), and one with DBCTX_WRAP_ALL_HANDLERS for the two wrap-all ways.
# Started once per mode for the module: starting 2 servers per test would cost more
# than the tests.

REAL_TIMEOUT = 20.0


@pytest.fixture(scope="module", params=ASYNC_MODES)
def real_servers(
    request: pytest.FixtureRequest, postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    """``{way: server URL}`` for every way, in one async mode."""
    mode = str(request.param)
    logs = tmp_path_factory.mktemp(f"parity-{mode}")
    schemas: list[str] = []
    servers: list[ServerProcess] = []

    def start(wrap_all: bool) -> ServerProcess:
        schema = create_schema(postgres_url)
        schemas.append(schema)
        for attempt in range(3):  # a free port can be taken before the server binds it
            port = free_port()
            command = server_command(
                mode,
                port,
                schema_url(postgres_url, schema),
                pool_size=5,
                config={"DBCTX_WRAP_ALL_HANDLERS": True} if wrap_all else None,
                extra=["tests.servers.parity"],
            )
            log_path = logs / f"server-wrap_all={wrap_all}-{attempt}.log"
            with log_path.open("wb") as log_file:
                proc = subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            server = ServerProcess(proc, port, log_path, mode, "", plain=False)
            servers.append(server)
            problem = wait_ready(proc, port, SERVER_START_TIMEOUT)
            if problem is None:
                return server
            server.stop()
            if "in use" not in server.log():
                break
        pytest.fail(f"parity server ({mode}) did not start: {problem}\n{server.log()[-5000:]}")

    try:
        shared, wrap_all = start(False), start(True)
        urls = {way: (wrap_all if way in pw.WRAP_ALL_WAYS else shared).url for way in pw.WAYS}
        yield urls
    finally:
        for server in servers:
            server.stop()
        for schema in schemas:
            drop_schema(postgres_url, schema)


class Inbox:
    """What one real client received, in order, with a wait that has a deadline."""

    def __init__(self) -> None:
        self.items: list[Any] = []
        self._changed = threading.Condition()

    def add(self, item: Any) -> None:
        with self._changed:
            self.items.append(item)
            self._changed.notify_all()

    def handler(self, name: str) -> Callable[..., None]:
        return lambda *args: self.add([name, *args])

    def wait(self, predicate: Callable[[list[Any]], bool], what: str) -> list[Any]:
        with self._changed:
            if not self._changed.wait_for(lambda: predicate(self.items), REAL_TIMEOUT):
                pytest.fail(f"timed out after {REAL_TIMEOUT}s waiting for {what}: {self.items}")
            return list(self.items)


class RealClients:
    """Real python-socketio clients over WebSocket, disconnected at the end."""

    def __init__(self) -> None:
        self.clients: list[python_socketio.Client] = []

    def connect(
        self, url: str, namespace: str, auth: Any = None, inbox: Inbox | None = None
    ) -> python_socketio.Client:
        client = python_socketio.Client(reconnection=False)
        if inbox is not None:
            for event in ("said", "message", "json", "left", "welcome", "connect_error"):
                client.on(event, inbox.handler(event), namespace=namespace)
            client.on("disconnect", inbox.handler("disconnect"), namespace=namespace)
        self.clients.append(client)
        client.connect(
            url, namespaces=[namespace], transports=["websocket"], auth=auth, wait_timeout=10
        )
        return client

    def close(self) -> None:
        """Drop every client still connected, and wait until each has noticed.

        ``Client.disconnect()`` waits up to 3 s for a WebSocket close frame the
        server does not send; the servers need no goodbye once a test is over."""
        open_clients = [client for client in self.clients if client.eio.state == "connected"]
        for client in open_clients:
            drop(client)
        deadline = time.monotonic() + REAL_TIMEOUT
        for client in open_clients:
            while client.eio.state == "connected":
                assert time.monotonic() < deadline, "a dropped client never noticed"
                time.sleep(0.01)
        for client in self.clients:
            ws = getattr(client.eio, "ws", None)
            if ws is not None:
                with contextlib.suppress(OSError):
                    ws.shutdown()  # closes the socket itself


def drop(client: python_socketio.Client) -> None:
    """Close ``client``'s WebSocket at once, without a close handshake: the server
    sees the transport close. (Shutting the socket down wakes the client's blocked
    read; closing it would not.) A client already on its way out is left alone."""
    sock = getattr(client.eio.ws, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # it closed in the meantime
            sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def real_clients() -> Iterator[RealClients]:
    clients = RealClients()
    yield clients
    clients.close()


def emit_together(
    calls: list[tuple[python_socketio.Client, str, str, tuple[Any, ...]]],
) -> list[Any]:
    """Send every ``(client, namespace, event, args)`` at once; wait for every ack."""
    acks: dict[int, Any] = {}
    done = threading.Event()
    lock = threading.Lock()

    def callback_for(index: int) -> Callable[..., None]:
        def callback(*args: Any) -> None:
            with lock:
                acks[index] = args[0] if len(args) == 1 else list(args)
                if len(acks) == len(calls):
                    done.set()

        return callback

    for index, (client, namespace, event, args) in enumerate(calls):
        client.emit(event, args, namespace=namespace, callback=callback_for(index))
    if not done.wait(REAL_TIMEOUT):
        pytest.fail(f"{len(calls) - len(acks)} of {len(calls)} calls got no ack: {acks}")
    return [acks[index] for index in range(len(calls))]


def real_observations(
    real_servers: dict[str, str], observe_way: Callable[[str, str], Any]
) -> dict[str, Any]:
    """``observe_way(namespace, url)`` for every way, as ``{way: observation}``."""
    return {way: observe_way(f"/{way}", url) for way, url in real_servers.items()}


def assert_all_like_plain(observed: dict[str, Any], expected: Any) -> None:
    """The plain way shows ``expected`` and every other way shows the same."""
    assert observed["plain_namespace"] == expected
    different = {way: value for way, value in observed.items() if value != expected}
    assert not different, f"ways that differ from plain Flask-SocketIO: {different}"


@pytest.mark.server
@pytest.mark.postgres
def test_real_concurrent_events_each_keep_their_client_and_sessions(
    real_servers: dict[str, str], real_clients: RealClients
) -> None:
    """4 clients' events inside their handlers at the same time (each waits for the
    others, with a deadline): each ack is its own client's, with its own
    python-socketio session and its own database session and connection."""

    def observe_way(namespace: str, url: str) -> Any:
        clients = [real_clients.connect(url, namespace) for _ in range(4)]
        group = uuid.uuid4().hex
        acks = emit_together(
            [(c, namespace, "rendezvous", (group, 4, f"tag{i}")) for i, c in enumerate(clients)]
        )
        return {
            "acks": [
                {
                    "tag": ack["tag"] == f"tag{i}",
                    "sid": ack["sid"] == client.get_sid(namespace),
                    "user_session": ack["user_session_tag"] == f"tag{i}",
                    "same_db_session_throughout": ack["same_db_session"],
                }
                for i, (client, ack) in enumerate(zip(clients, acks))
            ],
            "distinct_db_sessions": len({ack["db_session"] for ack in acks}),
            "distinct_connections": len({ack["backend_pid"] for ack in acks}),
        }

    everything = {
        "tag": True,
        "sid": True,
        "user_session": True,
        "same_db_session_throughout": True,
    }
    assert_all_like_plain(
        real_observations(real_servers, observe_way),
        {"acks": [everything] * 4, "distinct_db_sessions": 4, "distinct_connections": 4},
    )


#: (how, text) emitted by client "a", in order; "a" and "b" are in "lobby", "c" is not
ROOM_SEQUENCE = [
    ("room_exclude_self", "r1"),
    ("room", "r2"),
    ("broadcast_exclude_self", "b1"),
    ("server_emit_room", "s1"),
    ("send_room_exclude_self", "m1"),
    ("emit_two_args", "t1"),
    ("broadcast", "end"),  # the fence: every client gets it last
]


@pytest.mark.server
@pytest.mark.postgres
def test_real_rooms_and_broadcasts_reach_the_other_clients(
    real_servers: dict[str, str], real_clients: RealClients
) -> None:
    def observe_way(namespace: str, url: str) -> Any:
        inboxes = {label: Inbox() for label in "abc"}
        clients = {
            label: real_clients.connect(url, namespace, inbox=inbox)
            for label, inbox in inboxes.items()
        }
        joined = [clients[label].call("join", "lobby", namespace=namespace) for label in "ab"]
        for how, text in ROOM_SEQUENCE:
            assert clients["a"].call("talk", (how, text), namespace=namespace) == "said"
        received = {
            label: inbox.wait(lambda items: ["said", "end"] in items, f"{label}'s fence")
            for label, inbox in inboxes.items()
        }
        return {"joined": joined, "received": received}

    assert_all_like_plain(
        real_observations(real_servers, observe_way),
        {
            "joined": [{"own": True, "rooms": ["lobby"]}] * 2,
            "received": {
                "a": [["said", "r2"], ["said", "s1"], ["said", "t1", "second"], ["said", "end"]],
                "b": [
                    ["said", "r1"],
                    ["said", "r2"],
                    ["said", "b1"],
                    ["said", "s1"],
                    ["message", "m1"],
                    ["said", "end"],
                ],
                "c": [["said", "b1"], ["said", "end"]],
            },
        },
    )


@pytest.mark.server
@pytest.mark.postgres
def test_real_refusal(real_servers: dict[str, str], real_clients: RealClients) -> None:
    """Refused by ``return False`` and by ``ConnectionRefusedError`` (with and without
    a message and data): the client's connect fails with the same connect error."""

    def refused(namespace: str, url: str, mode: str) -> list[Any]:
        inbox = Inbox()
        with pytest.raises(python_socketio.exceptions.ConnectionError) as info:
            real_clients.connect(url, namespace, auth={"mode": mode}, inbox=inbox)
        # the namespace is in the message
        return [str(info.value).replace(namespace, "/plain_namespace"), inbox.items]

    modes = ("false", "refuse", "refuse_bare")
    # in parallel: a refused python-socketio client waits ~2 s closing its WebSocket
    with ThreadPoolExecutor(len(real_servers) * len(modes)) as pool:
        futures = {
            (way, mode): pool.submit(refused, f"/{way}", url, mode)
            for way, url in real_servers.items()
            for mode in modes
        }
        observed: dict[str, Any] = {way: {} for way in real_servers}
        for (way, mode), future in futures.items():
            observed[way][mode] = future.result(timeout=60)

    failed = "One or more namespaces failed to connect: /plain_namespace"
    rejected = ["connect_error", {"message": "Connection rejected by server"}]
    assert_all_like_plain(
        observed,
        {
            "false": [failed, [rejected]],
            "refuse": [failed, [["connect_error", {"message": "go away", "data": {"code": 7}}]]],
            "refuse_bare": [failed, [rejected]],
        },
    )


@pytest.mark.server
@pytest.mark.postgres
def test_real_disconnect_reasons(real_servers: dict[str, str], real_clients: RealClients) -> None:
    """The reason the disconnect handler gets (it tells a watching client): the
    client's own disconnect, the server's ``disconnect()``, a dropped transport."""

    def observe_way(namespace: str, url: str) -> Any:
        watcher = Inbox()
        real_clients.connect(url, namespace, auth={"mode": "watch"}, inbox=watcher)
        leaver = real_clients.connect(url, namespace)
        kicked_inbox = Inbox()
        kicked = real_clients.connect(url, namespace, inbox=kicked_inbox)
        dropped = real_clients.connect(url, namespace)
        labels = {
            c.get_sid(namespace): name
            for c, name in [(leaver, "leaver"), (kicked, "kicked"), (dropped, "dropped")]
        }
        # Client.disconnect() queues the DISCONNECT packet, then closes the WebSocket
        # at once: the server often sees the transport close first. Leave only the
        # namespace, as a socket.io client that keeps its connection does.
        leaver._send_packet(leaver.packet_class(sio_packet.DISCONNECT, namespace=namespace))
        watcher.wait(lambda items: len(items) == 1, "the leaver's disconnect")
        kicked.emit("kick", namespace=namespace)  # no ack: the server disconnects first
        watcher.wait(lambda items: len(items) == 2, "the kicked client's disconnect")
        drop(dropped)  # the WebSocket goes away without a goodbye
        left = watcher.wait(lambda items: len(items) == 3, "the dropped client's disconnect")
        kicked_saw = kicked_inbox.wait(lambda items: bool(items), "the kicked client's event")
        return {
            "left": [[name, labels[data["sid"]], data["reason"]] for name, data in left],
            "kicked_client_saw": kicked_saw,
        }

    assert_all_like_plain(
        real_observations(real_servers, observe_way),
        {
            "left": [
                ["left", "leaver", "client disconnect"],
                ["left", "kicked", "server disconnect"],
                ["left", "dropped", "transport close"],
            ],
            "kicked_client_saw": [["disconnect", "server disconnect"]],
        },
    )


@pytest.mark.server
@pytest.mark.postgres
def test_real_acks_and_python_socketio_session(
    real_servers: dict[str, str], real_clients: RealClients
) -> None:
    """Acks (values, tuples, none) over a real connection, and python-socketio's
    per-client ``session(sid)`` / ``get_session`` / ``save_session`` (the namespace's
    own methods in the class ways), which the test client cannot show."""

    def observe_way(namespace: str, url: str) -> Any:
        client = real_clients.connect(url, namespace)
        other = real_clients.connect(url, namespace)

        def call(who: python_socketio.Client, event: str, *args: Any) -> Any:
            data = args if len(args) != 1 else args[0]
            return who.call(event, data if args else None, namespace=namespace, timeout=10)

        return [
            call(client, "echo", {"x": [1, 2]}),
            call(client, "pair", 1, "two"),
            call(client, "nothing"),
            call(client, "remember", "v1"),
            call(client, "remember", "v2"),
            call(client, "save", "saved"),
            call(client, "recall"),
            call(other, "recall"),
        ]

    assert_all_like_plain(
        real_observations(real_servers, observe_way),
        [
            {"x": [1, 2]},
            (1, "two"),
            None,
            {"flask_count": 1},
            {"flask_count": 2},
            None,
            {"socketio_session": {"value": "v2", "events": 2, "saved": "saved"}, "flask_count": 2},
            {"socketio_session": {}, "flask_count": None},
        ],
    )
