"""One set of handler bodies, registered each way an app can register them.

The parity tests (``tests/test_parity.py``) and the real-server module
(``tests/servers/parity.py``) run the very same functions below under each *way*:

``plain_namespace``
    a ``flask_socketio.Namespace`` subclass, no socketio_dbctx: the reference.
``plain_functions``
    ``@socketio.on`` / ``socketio.on_event`` functions, no socketio_dbctx: the
    reference for what only functions can do (catch-all events and namespaces).
``dbctx_namespace``
    a :class:`~socketio_dbctx.DBContextNamespace` subclass.
``dbctx_on``
    ``@dbctx.on`` / ``dbctx.on_event`` functions.
``wrap_all_functions`` / ``wrap_all_namespace``
    ``@socketio.on`` functions / a plain ``Namespace`` subclass, unchanged, with
    ``DBCTX_WRAP_ALL_HANDLERS = True``.

The bodies are plain functions with the client's arguments as parameters. A class
way turns each into an ``on_<event>`` method with the same signature (see
:func:`as_method`); a function way registers the function itself. What a body needs
from "its namespace object" (python-socketio's ``session(sid)``, ``get_session``,
``save_session``, ``emit``) it takes from :func:`owner`: the namespace instance in a
class way, a :class:`FunctionOwner` with the same methods in a function way.

Nothing here imports eventlet or gevent: the server process patches first.
"""

from __future__ import annotations

import inspect
import threading
import time
from typing import Any, Callable

import flask
from flask import current_app, g, has_request_context, request
from flask_socketio import (
    ConnectionRefusedError as SocketIORefused,
)
from flask_socketio import (
    Namespace,
    SocketIO,
    close_room,
    disconnect,
    emit,
    join_room,
    leave_room,
    rooms,
    send,
)

#: The namespace every way's handlers are registered on (in-process tests).
NS = "/p"
#: Connect and disconnect handlers without arguments (Flask-SocketIO's legacy forms).
LEGACY_NS = "/legacy"
#: A catch-all event handler (``"*"``) lives here (function ways only).
ANY_NS = "/any"
#: The room the disconnect handler reports to.
WATCHERS = "watchers"

PLAIN_WAYS = ("plain_namespace", "plain_functions")
CLASS_WAYS = ("plain_namespace", "dbctx_namespace", "wrap_all_namespace")
FUNCTION_WAYS = ("plain_functions", "dbctx_on", "wrap_all_functions")
WAYS = (
    "plain_namespace",
    "plain_functions",
    "dbctx_namespace",
    "dbctx_on",
    "wrap_all_functions",
    "wrap_all_namespace",
)
#: Ways that need ``DBCTX_WRAP_ALL_HANDLERS = True`` on the app.
WRAP_ALL_WAYS = ("wrap_all_functions", "wrap_all_namespace")


def reference(way: str) -> str:
    """The plain way ``way`` is compared with: same kind (class or functions)."""
    return "plain_namespace" if way in CLASS_WAYS else "plain_functions"


def piped(way: str) -> bool:
    """Whether handlers registered ``way`` run through socketio_dbctx's pipeline."""
    return way not in PLAIN_WAYS


# -- where a body finds its app's state -----------------------------------------------


class FunctionOwner:
    """What a namespace object gives its methods, for function handlers: the same
    python-socketio calls, on the server, for one namespace."""

    def __init__(self, socketio: SocketIO, namespace: str) -> None:
        self.socketio = socketio
        self.namespace = namespace

    def session(self, sid: str) -> Any:
        return self.socketio.server.session(sid, namespace=self.namespace)

    def get_session(self, sid: str) -> Any:
        return self.socketio.server.get_session(sid, namespace=self.namespace)

    def save_session(self, sid: str, session: Any) -> None:
        self.socketio.server.save_session(sid, session, namespace=self.namespace)

    def emit(self, event: str, data: Any = None, room: str | None = None) -> None:
        # as flask_socketio.Namespace.emit: no room means everyone in the namespace
        self.socketio.emit(event, data, room=room, namespace=self.namespace)


class Env:
    """Per-app state of the bodies: the namespace objects and what the bodies noted."""

    def __init__(self, socketio: SocketIO) -> None:
        self.socketio = socketio
        self.owners: dict[str, Any] = {}
        self.notes: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()
        self.arrived: dict[str, int] = {}


def env() -> Env:
    """The :class:`Env` of the app the current event runs in."""
    found: Env = current_app.extensions["parity"]
    return found


def owner() -> Any:
    """The namespace object of the current event (a :class:`FunctionOwner` for
    function handlers)."""
    return env().owners[request.namespace]  # type: ignore[attr-defined]


def note(name: str, value: Any) -> None:
    env().notes.append((request.namespace, name, value))  # type: ignore[attr-defined]


def request_info() -> dict[str, Any] | None:
    """``request.sid``, ``request.namespace`` and ``request.event`` as the handler
    sees them; ``None`` outside a request context."""
    if not has_request_context():
        return None
    event = getattr(request, "event", None)
    return {
        "sid": getattr(request, "sid", None),
        "namespace": getattr(request, "namespace", None),
        "event": None if event is None else {"message": event["message"], "args": event["args"]},
    }


# -- the handler bodies (client arguments only) ----------------------------------------


def connect(auth: Any) -> Any:
    """Refuses or greets as ``auth["mode"]`` says."""
    note("connect", {"auth": auth, "q": request.args.get("q"), "request": request_info()})
    mode = auth.get("mode") if isinstance(auth, dict) else None
    if mode == "false":
        return False
    if mode == "refuse":
        raise SocketIORefused("go away", {"code": 7})
    if mode == "refuse_bare":
        raise SocketIORefused()
    if mode == "builtin":
        raise ConnectionRefusedError("builtin go away")
    if mode == "crash":
        raise RuntimeError("connect crashed")
    if mode == "greet":
        emit("welcome", {"sid": request.sid})  # type: ignore[attr-defined]
        join_room("greeted")
    if mode == "watch":
        join_room(WATCHERS)
    return None


def disconnect_handler(reason: Any) -> None:
    note("disconnect", {"reason": reason, "sid": request.sid})  # type: ignore[attr-defined]
    env().socketio.emit(
        "left",
        {"sid": request.sid, "reason": reason},  # type: ignore[attr-defined]
        to=WATCHERS,
        namespace=request.namespace,  # type: ignore[attr-defined]
    )


def legacy_connect() -> None:
    note("legacy_connect", request_info())


def legacy_disconnect() -> None:
    note("legacy_disconnect", {"sid": request.sid})  # type: ignore[attr-defined]


def legacy_disconnect_event() -> None:
    """A disconnect handler without the reason: what ``request.event`` says."""
    note("legacy_disconnect_event", request_info())


def echo(data: Any) -> Any:
    return data


def pair(first: Any, second: Any) -> tuple[Any, Any]:
    return first, second  # a tuple: the ack has two arguments


def nothing() -> None:
    note("nothing", request_info())


def spread(first: Any, *rest: Any) -> dict[str, Any]:
    return {"first": first, "rest": list(rest)}


def optional(first: Any, second: Any = "default") -> list[Any]:
    return [first, second]


def whoami() -> dict[str, Any] | None:
    return request_info()


def talk(how: str, text: Any) -> str:
    """Emit ``text`` in the way ``how`` names; the ack says it was done."""
    socketio = env().socketio
    if how == "emit":
        emit("said", text)
    elif how == "emit_two_args":
        emit("said", (text, "second"))  # a tuple: two arguments
    elif how == "send":
        send(text)
    elif how == "send_json":
        send({"text": text}, json=True)
    elif how == "room":
        emit("said", text, to="lobby")
    elif how == "room_exclude_self":
        emit("said", text, to="lobby", include_self=False)
    elif how == "broadcast":
        emit("said", text, broadcast=True)
    elif how == "broadcast_exclude_self":
        emit("said", text, broadcast=True, include_self=False)
    elif how == "send_room_exclude_self":
        send(text, to="lobby", include_self=False)
    elif how == "server_emit":
        socketio.emit("said", text, namespace=request.namespace)  # type: ignore[attr-defined]
    elif how == "server_emit_room":
        socketio.emit("said", text, to="lobby", namespace=request.namespace)  # type: ignore[attr-defined]
    elif how == "owner_emit":
        owner().emit("said", text)
    elif how == "owner_emit_room":
        owner().emit("said", text, room="lobby")
    elif how == "other_namespace":
        emit("said", text, namespace=LEGACY_NS, broadcast=True)
    else:
        raise ValueError(f"unknown how {how!r}")
    return "said"


def my_rooms() -> dict[str, Any]:
    """``rooms()`` of the current client: its own sid's room and the others, sorted."""
    sid = request.sid  # type: ignore[attr-defined]
    current = rooms()
    return {"own": sid in current, "rooms": sorted(room for room in current if room != sid)}


def join(room: str) -> dict[str, Any]:
    join_room(room)
    return my_rooms()


def leave(room: str) -> dict[str, Any]:
    leave_room(room)
    return my_rooms()


def close(room: str) -> dict[str, Any]:
    close_room(room)
    return my_rooms()


def count() -> int:
    """Flask's user session (``flask.session``), as Flask-SocketIO manages it."""
    flask.session["count"] = flask.session.get("count", 0) + 1
    return int(flask.session["count"])


def remember(value: Any) -> dict[str, Any]:
    """python-socketio's per-client session (``owner().session(sid)``) and Flask's."""
    sid = request.sid  # type: ignore[attr-defined]
    with owner().session(sid) as session:
        session["value"] = value
        session["events"] = session.get("events", 0) + 1
    flask.session["count"] = flask.session.get("count", 0) + 1
    return {"flask_count": flask.session["count"]}


def save(value: Any) -> None:
    sid = request.sid  # type: ignore[attr-defined]
    session = owner().get_session(sid)
    session["saved"] = value
    owner().save_session(sid, session)


def recall() -> dict[str, Any]:
    return {
        "socketio_session": dict(owner().get_session(request.sid)),  # type: ignore[attr-defined]
        "flask_count": flask.session.get("count"),
    }


def fail(text: str) -> None:
    g.failed_with = text  # visible to an error handler that shares the event's app context
    raise ValueError(text)


def kick() -> str:
    disconnect()
    return "kicked"


def probe_g() -> dict[str, Any]:
    return {"outer": g.get("outer"), "app": current_app.name}


def message(data: Any) -> dict[str, Any]:
    return {"message": data, "request": request_info()}


def json_message(data: Any) -> dict[str, Any]:
    return {"json": data}


def any_event(event: str, *args: Any) -> dict[str, Any]:
    """Registered as ``"*"``: every event of its namespace without its own handler."""
    return {"event": event, "args": list(args), "request": request_info()}


def where(*args: Any) -> dict[str, Any]:
    """Registered on namespace ``"*"``: the ``where`` event of every namespace."""
    return {"args": list(args), "request": request_info()}


def rendezvous(group: str, count: int, tag: str) -> dict[str, Any]:
    """Real servers only: a database round trip, then wait (polling, with a deadline)
    until ``count`` events of ``group`` are inside their handlers at once, then check
    the event kept its own client, user session and database session throughout."""
    sid = request.sid  # type: ignore[attr-defined]
    db = current_app.extensions["sqlalchemy"]
    session = db.session()
    pid = db.session.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with owner().session(sid) as user_session:
        user_session["tag"] = tag
    state = env()
    with state.lock:
        state.arrived[group] = state.arrived.get(group, 0) + 1
    deadline = time.monotonic() + 15
    while state.arrived[group] < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {state.arrived[group]} of {count} arrived")
        state.socketio.sleep(0.01)
    return {
        "tag": tag,
        "sid": request.sid,  # type: ignore[attr-defined]
        "user_session_tag": owner().get_session(sid)["tag"],
        "db_session": id(session),
        "same_db_session": db.session() is session,
        "backend_pid": pid,
    }


#: event name -> body, registered on ``NS`` by every way
EVENTS: dict[str, Callable[..., Any]] = {
    "connect": connect,
    "disconnect": disconnect_handler,
    "echo": echo,
    "pair": pair,
    "nothing": nothing,
    "spread": spread,
    "optional": optional,
    "whoami": whoami,
    "talk": talk,
    "join": join,
    "leave": leave,
    "close": close,
    "remember": remember,
    "save": save,
    "recall": recall,
    "count": count,
    "fail": fail,
    "kick": kick,
    "probe_g": probe_g,
    "message": message,
    "json": json_message,
    "rendezvous": rendezvous,
}
LEGACY_EVENTS: dict[str, Callable[..., Any]] = {
    "connect": legacy_connect,
    "disconnect": legacy_disconnect,
    "echo": echo,
}


# -- error handlers ----------------------------------------------------------------------


def error_handler(
    label: str, *, show_request: bool = True, show_g: bool = False
) -> Callable[[Exception], Any]:
    """An error handler whose return value (the ack) tells who answered and for what
    and, if asked, what the request and ``g`` looked like."""

    def handle(exc: Exception) -> Any:
        answer: dict[str, Any] = {"by": label, "exc": [type(exc).__name__, *map(str, exc.args)]}
        if show_request:
            answer["request"] = request_info()
        if show_g:
            answer["g_failed_with"] = g.get("failed_with") if flask.has_app_context() else None
        return answer

    handle.__name__ = f"error_{label}"
    return handle


def broken_error_handler(exc: Exception) -> Any:
    raise KeyError("the error handler broke")


def silent_error_handler(exc: Exception) -> None:
    """Answers with no value: the ack has no arguments."""


def pair_error_handler(exc: Exception) -> tuple[str, str]:
    return "failed", type(exc).__name__


# -- registration ------------------------------------------------------------------------


def as_method(body: Callable[..., Any]) -> Callable[..., Any]:
    """``body`` as a method: the same parameters after ``self`` (the signature is what
    socketio_dbctx's arity check reads), calling ``body`` with the client's arguments."""

    def method(self: Any, *args: Any) -> Any:
        return body(*args)

    signature = inspect.signature(body)
    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[this, *signature.parameters.values()]
    )
    method.__name__ = getattr(body, "__name__", "method")
    return method


def namespace_class(
    base: type[Namespace],
    events: dict[str, Callable[..., Any]],
    error: Callable[[Exception], Any] | None = None,
) -> type[Namespace]:
    """A subclass of ``base`` with an ``on_<event>`` method per body (and ``error``)."""
    attrs: dict[str, Any] = {f"on_{name}": as_method(body) for name, body in events.items()}
    if error is not None:
        attrs["error"] = as_method(error)
    return type(f"Parity{base.__name__}", (base,), attrs)


def register(
    way: str,
    app: flask.Flask,
    socketio: SocketIO,
    dbctx: Any = None,
    namespace: str = NS,
    *,
    events: dict[str, Callable[..., Any]] | None = None,
    error: Callable[[Exception], Any] | None = None,
    catch_all: bool = False,
) -> Any:
    """Register ``events`` (default :data:`EVENTS`) on ``namespace`` the way ``way``
    says; return the namespace object (a :class:`FunctionOwner` for functions).

    :param app: the Flask app (its :class:`Env` is ``app.extensions["parity"]``).
    :param dbctx: the app's ``DBContext`` (needed by ``dbctx_on``).
    :param error: the namespace object's ``error(exc)`` (class ways only).
    :param catch_all: also register :func:`any_event` as ``"*"`` on :data:`ANY_NS`
        and :func:`where` on namespace ``"*"`` (function ways only).
    """
    from socketio_dbctx import DBContextNamespace  # the plain ways never import it

    events = EVENTS if events is None else events
    app_env: Env = app.extensions.setdefault("parity", Env(socketio))
    if way in CLASS_WAYS:
        base = DBContextNamespace if way == "dbctx_namespace" else Namespace
        ns_object = namespace_class(base, events, error)(namespace)
        socketio.on_namespace(ns_object)
        app_env.owners[namespace] = ns_object
        if catch_all:
            raise ValueError("catch-all handlers are for function ways")
        return ns_object
    if error is not None:
        raise ValueError("a namespace error() is for class ways")
    # dbctx.on / on_event take socketio.on / on_event's arguments: one registration
    registrar: Any = dbctx if way == "dbctx_on" else socketio
    # half through the decorator, half through the non-decorator form
    for index, (name, body) in enumerate(events.items()):
        if index % 2:
            registrar.on_event(name, body, namespace=namespace)
        else:
            registrar.on(name, namespace=namespace)(body)
    if catch_all:
        registrar.on("*", namespace=ANY_NS)(any_event)
        registrar.on_event("where", where, namespace="*")
    function_owner = FunctionOwner(socketio, namespace)
    app_env.owners[namespace] = function_owner
    if catch_all:
        app_env.owners[ANY_NS] = FunctionOwner(socketio, ANY_NS)
    return function_owner
