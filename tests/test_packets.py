"""Malformed Socket.IO packets, sent as raw WebSocket frames to real servers in the
three async modes (``--extra tests.servers.ops``): each is dropped or acked
``invalid_request`` with one log line per kind of problem, no traceback, nothing stored,
nothing held, and the connection goes on working."""

from __future__ import annotations

from typing import Callable

import sqlalchemy as sa
from conftest import ServerProcess
from eventkit import RawClient, malformed_frames

ServerFactory = Callable[..., ServerProcess]

NS = "/ops"
ACKED, DROPPED = malformed_frames(NS)


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
    client = RawClient(server.url, NS)
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
