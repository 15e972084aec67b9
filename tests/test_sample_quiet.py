"""``python -m sample_app`` starts quietly: its banner, then nothing alarming, through
trading, load, polite and abrupt disconnects, and its stop.

Each test starts the app as a subprocess (SQLite), trades with real python-socketio
clients, runs the load driver briefly, drops a raw WebSocket without a close frame,
stops the app, and checks that every line it printed is an expected one: no
Werkzeug production warning, no ``Bad request syntax ('\\x88\\x82...')`` on a
WebSocket close, no eventlet deprecation wall, no traceback.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import socketio
from conftest import REPO_ROOT

from sample_app.__main__ import default_async_mode
from sample_app.process import SampleAppProcess, StartError

pytestmark = pytest.mark.server

NS = "/trading"
#: Every line the app may print on a quiet run.
EXPECTED = [
    re.compile(r"socketio_dbctx sample app \((threading|gevent|eventlet)\) on sqlite"),
    re.compile(r"monitor token generated \(set DBCTX_MONITOR_AUTH to choose one\)"),
    re.compile(r"allowed hosts: [\w.:, -]+"),
    re.compile(r"dashboard: http://127\.0\.0\.1:\d+/\?token=[\w-]+"),
    re.compile(r"eventlet is deprecated upstream; .*"),  # one line, only when asked for
    # the drain on Ctrl-C / SIGTERM (issue 14): one line when it starts, one when it ends
    re.compile(r"SIG(INT|TERM): draining, then closing every connection and exiting"),
    re.compile(r"shutdown after [\d.]+s: drained, \d+ connection\(s\) closed; exiting"),
]


def unexpected_lines(log: str) -> list[str]:
    return [
        line
        for line in log.splitlines()
        if line.strip() and not any(p.fullmatch(line) for p in EXPECTED)
    ]


def test_the_default_async_mode_follows_upstream_advice() -> None:
    # simple-websocket is installed with Flask-SocketIO's threading support here
    assert default_async_mode() == "threading"


def _trade(url: str) -> None:
    clients = []
    for _ in range(3):
        client = socketio.Client(reconnection=False)
        client.connect(url, namespaces=[NS], transports=["websocket"], wait_timeout=10)
        clients.append(client)
    order = {"symbol": "Q.A", "side": "sell", "qty": "2", "price": "10"}
    placed = clients[0].call("place_order", order, namespace=NS, timeout=10)
    assert placed["ok"] is True, placed
    bought = clients[1].call(
        "place_order", {**order, "side": "buy", "qty": "2"}, namespace=NS, timeout=10
    )
    assert bought["order"]["status"] == "filled"
    late = clients[0].call("cancel_order", placed["order"]["id"], namespace=NS, timeout=10)
    assert late["ok"] is False
    clients[0].disconnect()  # politely: a close frame
    # abruptly: the process's socket goes away without a WebSocket close frame
    eio = clients[1].eio
    ws = getattr(eio, "ws", None)
    assert ws is not None, "the client is not on WebSocket"
    sock = ws.sock  # the client's reader thread sets ws.sock to None once it sees the end
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    clients[2].disconnect()
    for client in clients[1:]:
        with contextlib.suppress(Exception):  # the abruptly dropped one may complain
            client.disconnect()


def _raw_websocket_dropped(port: int) -> None:
    """A WebSocket that says hello, joins /trading and vanishes (TCP reset)."""
    import websocket

    ws = websocket.create_connection(
        f"ws://127.0.0.1:{port}/socket.io/?EIO=4&transport=websocket", timeout=10
    )
    assert ws.recv().startswith("0")  # the Engine.IO open packet
    ws.send("40/trading,")
    assert ws.recv().startswith("40/trading,")
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    ws.sock.close()  # RST, no close frame


def _load(url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sample_app.load", "--url", url, "--clients", "4",
         "--rate", "20", "--duration", "2", "--seed", "3"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("async_mode", "stop_signal"),
    [
        (None, signal.SIGINT),  # the default, stopped with Ctrl-C
        (None, signal.SIGTERM),
        ("gevent", signal.SIGINT),
        ("eventlet", signal.SIGINT),
    ],
    ids=["default-ctrl-c", "default-sigterm", "gevent", "eventlet"],
)
def test_a_quiet_run(async_mode: str | None, stop_signal: int, tmp_path: Path) -> None:
    app = SampleAppProcess(
        f"sqlite:///{tmp_path}/quiet.db", async_mode=async_mode, log_path=tmp_path / "app.log"
    )
    try:
        app.start()
    except StartError as exc:
        pytest.fail(str(exc))
    try:
        _trade(app.url)
        _raw_websocket_dropped(app.port)
        _load(app.url)
        _raw_websocket_dropped(app.port)
        assert app.get("/healthz")[0] == 200
        assert app.alive()
    finally:
        app.stop(stop_signal)
    assert app.proc is not None and app.proc.wait(10) is not None
    log = app.log()
    mode = async_mode or "threading"
    assert f"sample app ({mode})" in log
    assert unexpected_lines(log) == [], log


def test_gevent_is_the_default_without_simple_websocket(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    missing = {"simple_websocket"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in missing else real(name, *a)
    )
    assert default_async_mode() == "gevent"
    missing.add("gevent")
    assert default_async_mode() == "threading"  # long-polling, but never eventlet
