"""The pure rules, as tables: build the situation by hand, assert the decision.

No app, no server, no database, no sleep: each row is one situation and what the
rule decides for it. The rules are imported here, once, so that a move of a module
changes one line:

* ``should_retry``: may a failed event run again (``socketio_dbctx.retry``)?
* ``check_auth``: may a client subscribe to ``/monitor`` (``socketio_dbctx.monitor``)?
* ``fleet_totals``: the fleet's pool figures in ``cluster_status``
  (``socketio_dbctx.cluster``).

The same rules over the wire: ``test_faults.py``, ``test_monitor.py``,
``test_cluster.py``.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any, Callable

import pytest
import sqlalchemy as sa

from socketio_dbctx.cluster import fleet_totals
from socketio_dbctx.monitor import check_auth
from socketio_dbctx.retry import should_retry

# -- should_retry ----------------------------------------------------------------------


def _driver_error(statement: str, sqlstate: str) -> sa.exc.DBAPIError:
    """What SQLAlchemy raises for a psycopg2 error with this SQLSTATE."""
    orig = Exception(f"SQLSTATE {sqlstate}")
    orig.pgcode = sqlstate  # type: ignore[attr-defined]
    return sa.exc.DBAPIError(statement, {}, orig)


#: Failure kinds, each made the way SQLAlchemy raises it.
FAILURES: dict[str, Callable[[], BaseException]] = {
    # the connection is gone (invalidated by SQLAlchemy): transient
    "connection lost": lambda: sa.exc.OperationalError(
        "SELECT 1", {}, Exception("server closed the connection"), connection_invalidated=True
    ),
    # a connect that failed: no statement attached; transient
    "connect refused": lambda: sa.exc.OperationalError(None, None, Exception("refused")),
    # the server rolled the whole transaction back: transient, and safe at COMMIT
    "serialization failure": lambda: _driver_error("COMMIT", "40001"),
    "deadlock": lambda: _driver_error("UPDATE t SET v = 1", "40P01"),
    # not transient: running again cannot help, or may apply something twice
    "outcome unknown (08007)": lambda: _driver_error("COMMIT", "08007"),
    "pool timeout": lambda: sa.exc.TimeoutError("QueuePool limit of size 5 overflow 0 reached"),
    "unique violation": lambda: sa.exc.IntegrityError("INSERT", {}, Exception("duplicate")),
    "handler bug": lambda: ValueError("bad input"),
}
NOT_TRANSIENT = ["outcome unknown (08007)", "pool timeout", "unique violation", "handler bug"]
PHASES = ["admission", "handler", "commit"]

# failure, phase, idempotent, committed (an earlier COMMIT of the attempt went through)
SHOULD_RETRY_TABLE: list[tuple[str, str, bool, bool, bool]] = [
    # a lost connection before COMMIT: nothing was applied, run again
    ("connection lost", "admission", False, False, True),
    ("connection lost", "handler", False, False, True),
    ("connect refused", "admission", False, False, True),
    ("connect refused", "handler", False, False, True),
    # lost during COMMIT: the outcome is unknown, only an idempotent handler runs again
    ("connection lost", "commit", False, False, False),
    ("connection lost", "commit", True, False, True),
    ("connect refused", "commit", False, False, False),
    # rolled back by the server: safe at any phase, COMMIT included
    ("serialization failure", "handler", False, False, True),
    ("serialization failure", "commit", False, False, True),
    ("deadlock", "handler", False, False, True),
    ("deadlock", "commit", False, False, True),
    # ... unless an earlier COMMIT of the same attempt went through: a rerun repeats it
    ("serialization failure", "commit", False, True, False),
    ("deadlock", "handler", False, True, False),
    ("connection lost", "handler", False, True, False),
    # an idempotent handler may always run again after a transient failure
    ("serialization failure", "commit", True, True, True),
    ("connection lost", "handler", True, True, True),
    ("connection lost", "commit", True, True, True),
]


@pytest.mark.parametrize(
    ("failure", "phase", "idempotent", "committed", "retry"),
    SHOULD_RETRY_TABLE,
    ids=[
        f"{failure}-{phase}{'-idempotent' if idem else ''}{'-after-commit' if done else ''}"
        for failure, phase, idem, done, _ in SHOULD_RETRY_TABLE
    ],
)
def test_should_retry_table(
    failure: str, phase: str, idempotent: bool, committed: bool, retry: bool
) -> None:
    decision = should_retry(
        FAILURES[failure](), phase=phase, idempotent=idempotent, committed=committed
    )
    assert decision is retry


@pytest.mark.parametrize(
    ("failure", "phase", "idempotent", "committed"),
    list(itertools.product(NOT_TRANSIENT, PHASES, [False, True], [False, True])),
)
def test_should_retry_never_for_a_failure_that_is_not_transient(
    failure: str, phase: str, idempotent: bool, committed: bool
) -> None:
    """Not even an idempotent handler: another run cannot help (or, for 08007 at
    COMMIT, is not known to be safe)."""
    decision = should_retry(
        FAILURES[failure](), phase=phase, idempotent=idempotent, committed=committed
    )
    assert decision is False


def test_should_retry_committed_defaults_to_false() -> None:
    lost = FAILURES["connection lost"]()
    assert should_retry(lost, phase="handler", idempotent=False) is True


# -- check_auth ------------------------------------------------------------------------

TOKEN = "s3cret-tøken"  # not ASCII: compared as UTF-8 bytes

# setting (DBCTX_MONITOR_AUTH), the client's auth payload, admitted?
CHECK_AUTH_TABLE: list[tuple[str, Any, Any, bool]] = [
    ("token", TOKEN, {"token": TOKEN}, True),
    ("token", TOKEN, {"token": TOKEN, "user": "ops"}, True),  # other keys do not matter
    ("token", TOKEN, {"token": TOKEN.upper()}, False),
    ("token", TOKEN, {"token": TOKEN[:-1]}, False),
    ("token", TOKEN, {"token": TOKEN + "x"}, False),
    ("token", TOKEN, {"token": ""}, False),
    ("token", TOKEN, {"token": None}, False),
    ("token", TOKEN, {"token": TOKEN.encode()}, False),  # bytes are not a token
    ("token", TOKEN, {"token": [TOKEN]}, False),
    ("token", TOKEN, {"Token": TOKEN}, False),
    ("token", TOKEN, {}, False),
    ("token", TOKEN, None, False),
    ("token", TOKEN, TOKEN, False),  # the bare token, not in a dict
    ("token", TOKEN, [TOKEN], False),
    # False: open to anyone, whatever they send
    ("open", False, None, True),
    ("open", False, {}, True),
    ("open", False, {"token": "anything"}, True),
    ("open", False, "junk", True),
    # None: no monitor; a list (rejected at init_app) fails closed too
    ("unset", None, None, False),
    ("unset", None, {"token": TOKEN}, False),
    ("list", [TOKEN], {"token": TOKEN}, False),
    ("list", [TOKEN], [TOKEN], False),
]


@pytest.mark.parametrize(
    ("kind", "setting", "auth", "admitted"),
    CHECK_AUTH_TABLE,
    ids=[f"{kind}-{auth!r}" for kind, _, auth, _ in CHECK_AUTH_TABLE],
)
def test_check_auth_table(kind: str, setting: Any, auth: Any, admitted: bool) -> None:
    assert check_auth(setting, auth) is admitted


@pytest.mark.parametrize(
    ("auth", "given", "admitted"),
    [
        ({"token": "ok"}, {"token": "ok"}, True),
        ({"token": "no"}, {"token": "no"}, False),
        ({}, {}, False),
        (None, {}, False),  # not a dict: the callable is given {}
        ("ok", {}, False),
        (["ok"], {}, False),
    ],
)
def test_check_auth_callable_decides_on_a_dict(auth: Any, given: Any, admitted: bool) -> None:
    seen: list[Any] = []

    def decide(payload: Any) -> bool:
        seen.append(payload)
        return isinstance(payload, dict) and payload.get("token") == "ok"

    assert check_auth(decide, auth) is admitted
    assert seen == [given]


@pytest.mark.parametrize(
    ("returned", "admitted"), [(1, True), ("yes", True), (0, False), (None, False)]
)
def test_check_auth_callable_result_counts_by_truth(returned: Any, admitted: bool) -> None:
    assert check_auth(lambda _: returned, {"token": "x"}) is admitted


def test_check_auth_callable_that_raises_refuses_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(_: Any) -> bool:
        raise ConnectionError("the auth backend is down")

    with caplog.at_level(logging.ERROR, logger="socketio_dbctx"):
        assert check_auth(broken, {"token": "x"}) is False
    [record] = caplog.records
    assert "DBCTX_MONITOR_AUTH callable raised" in record.getMessage()
    assert record.exc_info is not None and "auth backend is down" in str(record.exc_info[1])


# -- fleet_totals ----------------------------------------------------------------------


def worker(checked_out: Any, capacity: Any, **pool: Any) -> dict[str, Any]:
    """A worker's ``pool_status`` payload with only what the totals read."""
    return {"pools": {"default": {"checked_out": checked_out, "capacity": capacity, **pool}}}


FLEET_TOTALS_TABLE: list[tuple[str, dict[str, dict[str, Any]], dict[str, Any]]] = [
    (
        "no workers",
        {},
        {"checked_out": 0, "capacity": 0, "utilization": 0.0, "workers": 0},
    ),
    (
        "one",
        {"a:1": worker(2, 5)},
        {"checked_out": 2, "capacity": 5, "utilization": 0.4, "workers": 1},
    ),
    (
        "two add up",
        {"a:1": worker(1, 5), "b:2": worker(4, 10)},
        {"checked_out": 5, "capacity": 15, "utilization": 0.3333, "workers": 2},
    ),
    (
        "rounded to 4 places",
        {"a:1": worker(2, 3)},
        {"checked_out": 2, "capacity": 3, "utilization": 0.6667, "workers": 1},
    ),
    (
        "one unbounded pool: no fleet capacity",
        {"a:1": worker(3, 5), "b:2": worker(2, None)},
        {"checked_out": 5, "capacity": None, "utilization": 0.0, "workers": 2},
    ),
    (
        "zero capacity",
        {"a:1": worker(0, 0)},
        {"checked_out": 0, "capacity": 0, "utilization": 0.0, "workers": 1},
    ),
    (
        "only the default pool counts",
        {
            "a:1": {
                "pools": {
                    "default": worker(1, 5)["pools"]["default"],
                    "reports": worker(9, 9)["pools"]["default"],
                }
            }
        },
        {"checked_out": 1, "capacity": 5, "utilization": 0.2, "workers": 1},
    ),
    (
        "unknown checked_out counts as 0",
        {"a:1": worker(None, 5)},
        {"checked_out": 0, "capacity": 5, "utilization": 0.0, "workers": 1},
    ),
    (
        "a worker without pools: counted, unbounded",
        {"a:1": worker(1, 5), "b:2": {"worker": "b:2"}},
        {"checked_out": 1, "capacity": None, "utilization": 0.0, "workers": 2},
    ),
]


@pytest.mark.parametrize(
    ("workers", "totals"),
    [(workers, totals) for _, workers, totals in FLEET_TOTALS_TABLE],
    ids=[name for name, _, _ in FLEET_TOTALS_TABLE],
)
def test_fleet_totals_table(workers: dict[str, dict[str, Any]], totals: dict[str, Any]) -> None:
    assert fleet_totals(workers) == totals
