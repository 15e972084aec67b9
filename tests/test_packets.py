"""Malformed Socket.IO packets, sent as raw WebSocket frames to real servers in the
three async modes (``--extra tests.servers.ops``): each is dropped or acked
``invalid_request`` with one log line per kind of problem, no traceback, nothing stored,
nothing held, and the connection goes on working."""

from __future__ import annotations

import json
import re
import time
from typing import Any, Callable

import pytest
import sqlalchemy as sa
import websocket
from conftest import ServerProcess

ServerFactory = Callable[..., ServerProcess]

NS = "/ops"
DEEP = "[" * 10_000 + "]" * 10_000

#: (frame, what is wrong): events of the wrong shape, acked invalid_request
ACKED = [
    ("42/ops,1[123,{}]", "event name not a string"),
    ('42/ops,2{"quick":"x"}', "event payload not a list"),
    ("42/ops,3[]", "event without a name"),
]
#: (frame, what is wrong): packets that cannot be decoded, dropped
DROPPED: list[tuple[str | bytes, str]] = [
    (f'42/ops,4["quick",{DEEP}]', "nesting too deep"),
    ('42/ops,5["quick",' + "9" * 101 + "]", "integer too large"),
    (b"\x01\x02\x03 not a packet", "binary data where a packet was expected"),
    ('42/ops,6["quick","unterminated', "undecodable packet"),
    ("49", "unknown packet type"),
]


class RawClient:
    """A Socket.IO client speaking Engine.IO v4 over a raw WebSocket."""

    def __init__(self, server: ServerProcess) -> None:
        url = server.url.replace("http://", "ws://") + "/socket.io/?EIO=4&transport=websocket"
        self.ws = websocket.create_connection(url, timeout=10)
        assert self.ws.recv().startswith("0{")
        self.ws.send(f"40{NS},")
        assert self.recv_matching(rf"40{NS},\{{").startswith(f"40{NS},")

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
        message = self.recv_matching(rf"43{NS},{id}\[")
        return json.loads(message[len(f"43{NS},{id}") :])[0]

    def close(self) -> None:
        self.ws.close()


def stored(server: ServerProcess) -> set[str]:
    engine = sa.create_engine(server.database_url)
    try:
        with engine.connect() as conn:
            return {row[0] for row in conn.execute(sa.text("SELECT key FROM ops_rows"))}
    finally:
        engine.dispose()


def test_malformed_packets_are_dropped_or_acked_invalid_request(
    async_mode: str, server_factory: ServerFactory
) -> None:
    server = server_factory(async_mode, extra=["tests.servers.ops"])
    client = RawClient(server)
    try:
        for round_ in range(2):  # the second round logs nothing new
            for frame, _ in ACKED:
                client.send(frame)
            for id in (1, 2, 3):
                ack = client.ack(id)
                assert ack["error"] == "invalid_request" and ack["retryable"] is False, ack
            for frame, _ in DROPPED:
                client.send(frame)
            # the connection goes on: a good event after the bad ones is handled
            client.send(f'42/ops,7["quick","good{round_}"]')
            assert client.ack(7) == {"ok": True, "key": f"good{round_}"}
        # a binary event whose name is not a string: judged once its attachment is in
        client.send('451-/ops,10[123,{"_placeholder":true,"num":0}]')
        client.send(b"attached")
        ack = client.ack(10)
        assert ack["error"] == "invalid_request" and "event name not a string" in ack["message"]
        # without an ack id a malformed event is only dropped; the next one is answered
        client.send("42/ops,[456]")
        client.send('42/ops,11["quick","after-no-id"]')
        assert client.recv_matching(rf"43{NS},\d+\[").startswith(f"43{NS},11[")
        # a binary attachment that does not fit its placeholder
        client.send('451-/ops,8["quick",{"_placeholder":true,"num":5}]')
        client.send(b"some bytes")
        client.send('42/ops,9["quick","after-binary"]')
        assert client.ack(9) == {"ok": True, "key": "after-binary"}
    finally:
        client.close()

    assert stored(server) == {"good0", "good1", "after-no-id", "after-binary"}
    server.wait_checked_out(0)
    log = server.log()
    assert "Traceback" not in log, log[-6000:]
    for _, kind in [*ACKED, *DROPPED, (None, "bad binary attachment")]:
        lines = [
            line for line in log.splitlines() if "malformed packet from" in line and kind in line
        ]
        assert len(lines) == 1, (kind, lines, log[-4000:])
