"""Admission as pure logic, with real threads and no server: slots per client and per
process, first come first served, a timeout that leaves nothing behind."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from socketio_dbctx.admission import Admission, ProcessLimit
from socketio_dbctx.errors import BusyError

DEADLINE = 5.0


class Gate:
    """A call that holds its slot until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.open = threading.Event()

    def __call__(self) -> str:
        self.entered.set()
        assert self.open.wait(DEADLINE), "the test never opened the gate"
        return "done"


def in_thread(admission: Admission, sid: str, call: Any, results: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            results.append(admission.run(sid, call))
        except BusyError as exc:
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_until(predicate: Any) -> None:
    done = threading.Event()
    for _ in range(int(DEADLINE / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    pytest.fail("condition not reached in time")


def test_unlimited_runs_at_once() -> None:
    admission = Admission(ProcessLimit(None, None), 0, 1.0)
    assert admission.unlimited
    assert admission.run("a", lambda x: x + 1, 1) == 2


def test_a_client_waits_for_its_own_slot_not_for_others() -> None:
    process = ProcessLimit(None, 10)
    admission = Admission(process, 1, DEADLINE)
    gate, results = Gate(), []
    holder = in_thread(admission, "a", gate, results)
    assert gate.entered.wait(DEADLINE)
    assert admission.run("b", lambda: "b ran") == "b ran"  # another client is not held up
    waiter = in_thread(admission, "a", lambda: "a again", results)
    wait_until(lambda: process.waiting == 1)
    gate.open.set()
    holder.join(DEADLINE)
    waiter.join(DEADLINE)
    assert results == ["done", "a again"]
    assert process.running == 0 and process.waiting == 0


def test_waiters_are_served_first_come_first_served() -> None:
    process = ProcessLimit(None, 1)
    admission = Admission(process, 0, DEADLINE)
    gate, order = Gate(), []
    holder = in_thread(admission, "h", gate, order)
    assert gate.entered.wait(DEADLINE)
    waiters = []
    for count, name in enumerate(("first", "second", "third"), 1):
        waiters.append(in_thread(admission, name, lambda name=name: name, order))
        wait_until(lambda count=count: process.waiting == count)
    gate.open.set()
    for thread in [holder, *waiters]:
        thread.join(DEADLINE)
    assert order == ["done", "first", "second", "third"]


def test_a_timed_out_waiter_gets_busy_and_leaves_the_queue() -> None:
    process = ProcessLimit(None, 1)
    admission = Admission(process, 0, 0.2)
    gate, results = Gate(), []
    holder = in_thread(admission, "h", gate, results)
    assert gate.entered.wait(DEADLINE)
    with pytest.raises(BusyError, match=r"waited 0.2s for a database slot"):
        admission.run("w", lambda: "never")
    assert process.waiting == 0
    gate.open.set()
    holder.join(DEADLINE)
    assert process.running == 0
    assert admission.run("w", lambda: "later") == "later"


def test_namespaces_share_the_process_limit() -> None:
    process = ProcessLimit(None, 1)
    chat, trade = Admission(process, 0, 0.2), Admission(process, 0, 0.2)
    gate, results = Gate(), []
    holder = in_thread(chat, "a", gate, results)
    assert gate.entered.wait(DEADLINE)
    with pytest.raises(BusyError):
        trade.run("b", lambda: "never")
    gate.open.set()
    holder.join(DEADLINE)
    assert trade.run("b", lambda: "now") == "now"


def test_a_failing_call_gives_its_slot_back() -> None:
    process = ProcessLimit(None, 1)
    admission = Admission(process, 1, 0.2)

    def fail() -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        admission.run("a", fail)
    assert process.running == 0
    assert admission.run("a", lambda: "ok") == "ok"


# -- drain ------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [None, 1], ids=["unlimited", "limited"])
def test_drain_refuses_new_and_waiting_events_and_waits_for_running_ones(
    limit: int | None,
) -> None:
    process = ProcessLimit(None, limit)
    admission = Admission(process, 0, DEADLINE)
    gate, results = Gate(), []
    holder = in_thread(admission, "h", gate, results)
    assert gate.entered.wait(DEADLINE)
    waiter = None
    if limit:  # a second event waits for the one slot
        waiter = in_thread(admission, "w", lambda: "never", results)
        wait_until(lambda: process.waiting == 1)
    assert process.drain(0.05) is False  # one is still running
    with pytest.raises(BusyError, match="shutting down") as refused:
        admission.run("n", lambda: "never")
    assert refused.value.retry_after == 1.0
    if waiter is not None:
        waiter.join(DEADLINE)
        assert isinstance(results.pop(), BusyError) and process.waiting == 0
    finished = []
    drainer = threading.Thread(target=lambda: finished.append(process.drain(DEADLINE)))
    drainer.start()
    gate.open.set()
    holder.join(DEADLINE)
    drainer.join(DEADLINE)
    assert results == ["done"] and finished == [True] and process.running == 0
    assert process.drain(0) is True  # idle: at once


def test_a_drain_with_nothing_in_flight_returns_at_once() -> None:
    process = ProcessLimit(None, 5)
    assert process.drain(0) is True and process.draining
