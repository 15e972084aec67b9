"""Failure logging that does not flood (acks.log_failure and its LogThrottle).

Decisions are tested with a clock of the test's own: no server, no sleep; then once
through a real server.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from typing import Any, Callable

import pytest
import socketio as socketio_client
from conftest import ServerProcess

from socketio_dbctx import acks
from socketio_dbctx.errors import BusyError
from socketio_dbctx.throttle import MAX_KEYS, LogThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_first_in_full_then_one_summary_per_interval() -> None:
    clock = Clock()
    throttle = LogThrottle(10.0, clock)
    assert throttle.occurred("a") == (True, True, 0, 0.0)
    for _ in range(5):
        clock.now += 1
        assert not throttle.occurred("a").log
    assert throttle.occurred("b").first  # another kind is its own
    assert throttle.pending() == {"a": 5}
    clock.now += 6  # 11 s after the first
    summary = throttle.occurred("a")
    assert summary.log and not summary.first
    assert summary.more == 6 and summary.seconds == pytest.approx(11.0)
    assert throttle.pending() == {}
    clock.now += 30  # quiet for a whole interval: the next one is logged in full again
    assert throttle.occurred("a").first


def test_kinds_are_bounded() -> None:
    clock = Clock()
    throttle = LogThrottle(10.0, clock)
    for i in range(MAX_KEYS):
        throttle.occurred(i)
        throttle.occurred(i)  # each has something pending: none can be forgotten
    assert throttle.occurred("new").first  # let through, not followed
    assert len(throttle._kinds) == MAX_KEYS
    clock.now += 20
    for i in range(MAX_KEYS):
        throttle.occurred(i)  # their summaries: nothing pending any more
    clock.now += 20
    assert throttle.occurred("newer").first
    assert "newer" in throttle._kinds  # quiet kinds were forgotten to make room


_SUMMARY = re.compile(r"and (\d+) more like it in the last (\d+) s")


def test_5000_failures_in_10_s_give_a_bounded_number_of_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    monkeypatch.setattr(acks, "_THROTTLE", LogThrottle(1.0, clock))
    caplog.set_level(logging.INFO, logger="socketio_dbctx.acks")
    kinds = [
        ("/t:save", RuntimeError("boom")),
        ("/t:save", KeyError("k")),
        ("/t:load", RuntimeError("boom")),
        ("/t:load", BusyError("full", retry_after=0.2)),
    ]
    for i in range(5000):  # 5000 failures over 10 s, four kinds
        clock.now += 10.0 / 5000
        key, exc = kinds[i % 4]
        acks.log_failure(key, f"sid{i}", exc)
    records = [r for r in caplog.records if r.name == "socketio_dbctx.acks"]
    # per kind: the first line plus at most one summary per interval (1 s here)
    assert len(records) <= 4 * (1 + 10 + 1), len(records)
    firsts = [r for r in records if not _SUMMARY.search(r.getMessage())]
    assert len(firsts) == 4
    tracebacks = [r for r in records if r.exc_info]
    assert len(tracebacks) == 3  # busy is a warning, without a traceback
    summed = sum(int(_SUMMARY.search(r.getMessage())[1]) for r in records if r not in firsts)
    pending = sum(acks._THROTTLE.pending().values())
    assert len(firsts) + summed + pending == 5000
    levels = {r.levelno for r in records if "load" in r.getMessage() and "Busy" in r.getMessage()}
    assert levels == {logging.WARNING}


def test_debug_logs_every_failure(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(acks, "_THROTTLE", LogThrottle(10.0, Clock()))
    caplog.set_level(logging.DEBUG, logger="socketio_dbctx.acks")
    for i in range(50):
        acks.log_failure("/t:save", f"sid{i}", RuntimeError("boom"))
    records = [r for r in caplog.records if r.name == "socketio_dbctx.acks"]
    assert len(records) == 50 and all(r.exc_info for r in records)


def test_a_real_server_logs_5000_failures_in_a_few_lines(
    server_factory: Callable[..., ServerProcess],
    connect_client: Callable[..., socketio_client.Client],
) -> None:
    """5000 failing events through a real server: every one acked ``internal_error``
    and counted in the metrics, one traceback in the log, the rest in summaries."""
    server = server_factory(
        "threading", extra=["tests.servers.ops"], config={"DBCTX_MAX_IN_FLIGHT_PER_CLIENT": 0}
    )
    client = connect_client(server, "/ops")
    acks: list[Any] = []
    done = threading.Event()
    count = 5000

    def on_ack(ack: Any) -> None:
        acks.append(ack)
        if len(acks) == count:
            done.set()

    started = time.monotonic()
    for i in range(count):
        client.emit("fail", str(i), namespace="/ops", callback=on_ack)
    assert done.wait(120), f"{count - len(acks)} of {count} got no ack"
    elapsed = time.monotonic() - started
    assert all(a["error"] == "internal_error" for a in acks)
    stats = json.loads(server.get("/_stats"))
    server.wait_checked_out(0)
    log = server.log()
    lines = [ln for ln in log.splitlines() if "socketio_dbctx.acks" in ln]
    assert log.count("Traceback") == 1, log[-3000:]
    # the first line, then at most one summary per started 10 s
    assert 1 <= len(lines) <= 2 + elapsed // 10, (elapsed, lines)
    summed = sum(int(m[1]) for ln in lines if (m := _SUMMARY.search(ln)))
    assert summed <= count - 1
    errors = json.loads(server.get("/_ops/metrics"))["/ops:fail"]["errors"]
    assert errors == count, stats
