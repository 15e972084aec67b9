"""Transactional-emit handlers for ``tests.servers.app`` (``--extra tests.servers.emits``).

Namespace ``/e`` (``--set EMITS_NAMESPACE="/x"`` for another: Socket.IO's Redis
channel is global, so each several-workers test takes its own), a
``DBContextNamespace``. Each handler takes a ``token`` and puts it in everything it
emits, so a client can tell one call's messages from another's.

Commit markers: a handler (or background task) that calls ``announce(token, to)``
gets a ``committing`` emit when its session's COMMIT starts (SQLAlchemy
``before_commit``) and a ``committed`` emit once it went through (``after_commit``),
both sent at once with ``immediate_emits()``, to ``to`` (default: the caller). A
held emit that arrives after ``committed`` was held until the COMMIT; one that
arrives after ``committing`` and never ``committed`` was sent by a failed commit.

* ``join(room)``: ``join_room(room)``; acks the caller's sid. ``ping(token)``: acks
  ``["pong", token]``, a marker: it arrives after everything sent to this client
  before it.
* ``ordered(token)``: an immediate ``now``, then ``seq`` 1-8 through every emit API
  (``flask_socketio.emit``/``send``, ``Namespace.emit``/``send``,
  ``socketio.emit``/``send``, ``dbctx.after_commit``), a row written in between.
* ``progress(token, fail)``: three immediate ``progress`` emits, a row, a held
  ``done``; raises when ``fail``.
* ``fail(token, room)``: held emits to the caller and ``room``, an ``after_commit``
  emit and a row, then raises.
* ``fail_commit(token, room)``: the same, but the handler returns; two rows with one
  key break the DEFERRABLE INITIALLY DEFERRED unique constraint of ``emit_rows.key``,
  so only the COMMIT fails.
* ``retried(token, room)``: emits ``attempt`` (run number) to the caller and
  ``room_attempt`` to ``room``, writes a row and, on its first run only, kills its
  own backend (``pg_terminate_backend``): the pipeline retries it.
* ``capture(data)``: ``room_msg`` to ``data["room"]`` and ``bcast`` to the whole
  namespace, then ``join_room``/``leave_room`` of ``data["join"]``/``data["leave"]``;
  with ``data["wait_late"]`` it then waits until a client connected with auth
  ``{"late": token}``. Acks whether the join and leave took effect at once.
* ``spawn(token)``: ``dbctx.start_background_task`` of a task that emits ``bg`` 1,
  writes a row, emits ``bg`` 2 (to the caller, announced).
* ``ask(token)``: ``socketio.call("question", token)`` to the caller inside the
  event; acks the client's answer.
* ``room_seq(token, room)``: ``seq`` 1-4 to ``room`` through several APIs, a row in
  between, markers announced to ``room``. ``mark(token, room)``: a held ``mark`` to
  ``room`` with nothing to commit.
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import sqlalchemy as sa
from flask import Flask, g, has_app_context, request
from flask_socketio import SocketIO, emit, join_room, leave_room, rooms, send
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace, immediate_emits

#: How long ``capture`` waits for the late client.
LATE_WAIT = 10.0

_runs: dict[str, int] = {}
_late: set[str] = set()
_lock = threading.Lock()


def _count(token: str) -> int:
    with _lock:
        _runs[token] = _runs.get(token, 0) + 1
        return _runs[token]


def announce(token: str, to: str | None = None) -> None:
    """Send ``committing`` / ``committed`` markers for this scope's COMMIT to ``to``."""
    g.emits_announce = (token, to or request.sid)


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: DBContext, args: argparse.Namespace
) -> None:
    ns = str(app.config.get("EMITS_NAMESPACE", "/e"))

    class EmitRow(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "emit_rows"
        __table_args__ = (
            sa.UniqueConstraint(
                "key", name="emit_rows_key", deferrable=True, initially="DEFERRED"
            ),
        )
        id = sa.Column(sa.Integer, primary_key=True)
        key = sa.Column(sa.String(100), nullable=False)

    def add_row(key: str) -> None:
        db.session.add(EmitRow(key=key))
        db.session.flush()

    def marker(name: str) -> Any:
        def listener(session: Any) -> None:
            target = g.get("emits_announce") if has_app_context() else None
            if target is not None:
                token, to = target
                with immediate_emits():
                    socketio.emit(name, token, to=to, namespace=ns)

        return listener

    sa.event.listen(db.session, "before_commit", marker("committing"))
    sa.event.listen(db.session, "after_commit", marker("committed"))

    def background(sid: str, token: str) -> None:
        g.emits_announce = (token, sid)
        socketio.emit("bg", [token, 1], to=sid, namespace=ns)
        add_row(f"{token}-bg")
        socketio.emit("bg", [token, 2], to=sid, namespace=ns)

    class Emits(DBContextNamespace):
        def on_connect(self, auth: Any = None) -> None:
            if isinstance(auth, dict) and isinstance(auth.get("late"), str):
                with _lock:
                    _late.add(auth["late"])

        def on_join(self, room: str) -> str:
            join_room(room)
            return str(request.sid)

        def on_ping(self, token: str) -> list[str]:
            return ["pong", token]

        def on_ordered(self, token: str) -> dict[str, str]:
            sid = str(request.sid)
            announce(token)
            with immediate_emits():
                emit("now", [token, 0])
            emit("seq", [token, 1])
            add_row(f"{token}-ordered")
            send([token, 2])
            self.emit("seq", [token, 3], room=sid)
            self.send([token, 4], room=sid)
            socketio.emit("seq", [token, 5], to=sid, namespace=ns)
            socketio.send([token, 6], to=sid, namespace=ns)
            dbctx.after_commit(socketio.emit, "seq", [token, 7], to=sid, namespace=ns)
            emit("seq", [token, 8])
            return {"ok": token}

        def on_progress(self, token: str, fail: bool = False) -> str:
            announce(token)
            for step in (1, 2, 3):
                with immediate_emits():
                    emit("progress", [token, step])
            add_row(f"{token}-progress")
            emit("done", token)
            if fail:
                raise RuntimeError("progress failed on purpose")
            return "done"

        def on_fail(self, token: str, room: str | None = None) -> None:
            announce(token)
            emit("seq", [token, 1])
            if room is not None:
                self.emit("room_msg", token, room=room)
            dbctx.after_commit(socketio.emit, "seq", [token, 2], to=request.sid, namespace=ns)
            add_row(f"{token}-fail")
            raise RuntimeError("failed on purpose")

        def on_fail_commit(self, token: str, room: str | None = None) -> str:
            announce(token)
            emit("seq", [token, 1])
            if room is not None:
                self.emit("room_msg", token, room=room)
            dbctx.after_commit(socketio.emit, "seq", [token, 2], to=request.sid, namespace=ns)
            add_row(token)
            add_row(token)  # the deferred unique constraint fails at COMMIT, not here
            return "committed?"

        def on_retried(self, token: str, room: str | None = None) -> dict[str, int]:
            run = _count(token)
            announce(token)
            emit("attempt", [token, run])
            if room is not None:
                self.emit("room_attempt", [token, run], room=room)
            dbctx.after_commit(socketio.emit, "after", [token, run], to=request.sid, namespace=ns)
            add_row(f"{token}-{run}")
            if run == 1:  # the backend really dies: a transient failure, retried
                db.session.execute(sa.text("SELECT pg_terminate_backend(pg_backend_pid())"))
            return {"run": run}

        def on_capture(self, data: dict[str, Any]) -> dict[str, bool]:
            room, token = data["room"], data["token"]
            self.emit("room_msg", token, room=room)
            self.emit("bcast", token)
            join_room(room, sid=data["join"])
            leave_room(room, sid=data["leave"])
            took_effect = {
                "joined": room in rooms(sid=data["join"]),
                "left": room not in rooms(sid=data["leave"]),
            }
            if data.get("wait_late"):
                deadline = time.monotonic() + LATE_WAIT
                while token not in _late:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the late client never connected")
                    socketio.sleep(0.01)
            return took_effect

        def on_spawn(self, token: str) -> str:
            dbctx.start_background_task(background, str(request.sid), token)
            return "spawned"

        def on_ask(self, token: str) -> dict[str, Any]:
            add_row(f"{token}-ask")
            answer = socketio.call("question", token, to=request.sid, namespace=ns, timeout=10)
            return {"answer": answer}

        def on_room_seq(self, token: str, room: str) -> str:
            announce(token, room)
            self.emit("seq", [token, 1], room=room)
            add_row(f"{token}-room")
            socketio.emit("seq", [token, 2], to=room, namespace=ns)
            dbctx.after_commit(socketio.emit, "seq", [token, 3], to=room, namespace=ns)
            emit("seq", [token, 4], to=room)
            return "sent"

        def on_mark(self, token: str, room: str) -> str:
            emit("mark", token, to=room)
            return "marked"

    socketio.on_namespace(Emits(ns))
