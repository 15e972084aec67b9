"""What the ``--extra`` server modules share: a run counter, argument checks, and
the HTTP route through which a test reads the runs and ``dbctx.metrics()``, and a
table of rows keyed by a token.

Each module keeps one :class:`RunCounter` at module level (so its count outlives a
request and is read by the route), counts every run of a handler under a key such as
``"<event>:<token>"``, and registers its state route with :func:`add_state_route`.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import sqlalchemy as sa
from flask import Flask, jsonify
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, InvalidRequestError


class RunCounter:
    """How many times each handler ran, per key, in this server process.

    ``lock`` guards the counts; a module may guard state of its own with it too (the
    state route then reads all of it at once).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._runs: dict[str, int] = {}

    def count(self, *parts: str) -> int:
        """Record one run under ``":".join(parts)``; return how many runs so far."""
        key = ":".join(parts)
        with self.lock:
            self._runs[key] = self._runs.get(key, 0) + 1
            return self._runs[key]

    def snapshot(self) -> dict[str, int]:
        """The counts so far (the caller holds :attr:`lock`)."""
        return dict(self._runs)


def add_state_route(
    app: Flask,
    rule: str,
    dbctx: DBContext,
    runs: RunCounter,
    more: Callable[[], dict[str, Any]] | None = None,
) -> None:
    """``GET rule`` -> ``{"events": dbctx.metrics(), "calls": {...}, **more()}``;
    ``more`` runs under ``runs.lock``."""

    def state() -> Any:
        with runs.lock:
            calls = runs.snapshot()
            extra = more() if more is not None else {}
        return jsonify(events=dbctx.metrics(), calls=calls, **extra)

    app.add_url_rule(rule, endpoint=rule, view_func=state)


def token_rows(db: SQLAlchemy, name: str) -> Callable[[str], int]:
    """Declare the table ``name`` (``id``, a unique ``token`` of 1-60 characters) on
    ``db.metadata``; return ``add_row(token)``, which inserts a row in the event's
    session and returns its id."""
    rows = sa.Table(
        name,
        db.metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("token", sa.String(60), nullable=False, unique=True),
    )

    def add_row(token: str) -> int:
        result = db.session.execute(rows.insert().values(token=token))
        return int(result.inserted_primary_key[0])

    return add_row


def text(value: Any, what: str, longest: int = 60) -> str:
    """``value`` when it is a string of 1 to ``longest`` characters; else
    ``InvalidRequestError``."""
    if not isinstance(value, str) or not 1 <= len(value) <= longest:
        raise InvalidRequestError(f"{what} must be a string of 1-{longest} characters")
    return value
