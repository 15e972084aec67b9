"""Extra handlers for the parity tests: ``--extra tests.servers.parity``.

The bodies of ``tests/parity_ways.py`` registered each way, one namespace per way
(``/plain_namespace``, ``/plain_functions``, ``/dbctx_namespace``, ``/dbctx_on``; with
``DBCTX_WRAP_ALL_HANDLERS`` set, ``/wrap_all_functions`` and ``/wrap_all_namespace``
instead, since wrap-all applies to the whole app). Function ways get their own copies
of the body functions: socketio_dbctx pipes a function object, so one object shared by
a plain and a piped registration would be piped in both.
"""

from __future__ import annotations

import argparse
import types
from typing import Any, Callable

from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from tests import parity_ways


def _copy(func: Callable[..., Any]) -> Callable[..., Any]:
    """A new function object with ``func``'s code, defaults and name."""
    assert isinstance(func, types.FunctionType)
    clone = types.FunctionType(
        func.__code__, func.__globals__, func.__name__, func.__defaults__, func.__closure__
    )
    clone.__kwdefaults__ = func.__kwdefaults__
    return clone


def setup(
    app: Flask, socketio: SocketIO, db: SQLAlchemy, dbctx: Any, args: argparse.Namespace
) -> None:
    if app.config.get("DBCTX_WRAP_ALL_HANDLERS"):
        ways: tuple[str, ...] = parity_ways.WRAP_ALL_WAYS
    else:
        ways = ("plain_namespace", "plain_functions", "dbctx_namespace", "dbctx_on")
    for way in ways:
        events = {name: _copy(body) for name, body in parity_ways.EVENTS.items()}
        parity_ways.register(way, app, socketio, dbctx, f"/{way}", events=events)
