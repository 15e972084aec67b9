"""``benchmarks/nothing_lost.py``: its checker, and a quick real run that must find
nothing lost, nothing doubled and every send answered.

The checker is tested on made-up answers and rows (each column, and each kind of
violation, must be counted: a checker that never complains would pass the real run
too). The real run starts the sample app behind a TCP proxy on PostgreSQL, once per
fault (backends killed, black-holed connections, COMMIT answers lost, a server frozen
past the statement timeout; then a lost COMMIT with the database down), with the
``--quick`` settings, and must exit 0.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

#: the whole module: the script imports the sample app and the server helpers, which the
#: lowest-versions CI run (``-m "not server ..."``) need not collect
pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "nothing_lost.py"


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("bench_nothing_lost", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


lost = _load_script()


def _request(n: int, *acks: Any, answered: bool = True) -> Any:
    """A request with quantity ``1.000n`` and one send per ack (the last unanswered
    when ``answered`` is False)."""
    qty = Decimal(1) + n * Decimal("0.0001")
    request = lost.Request(f"order-{n:04d}-id", qty, {})
    for i, ack in enumerate(acks):
        attempt = lost.Attempt(sent=0.0)
        if answered or i < len(acks) - 1:
            attempt.record(ack)
        request.attempts.append(attempt)
    return request


def _ok(order_id: int) -> dict[str, Any]:
    return {"ok": True, "order": {"id": order_id}}


def _error(code: str) -> dict[str, Any]:
    return {"error": code, "retryable": False, "message": "..."}


def _qty(n: int) -> Decimal:
    return Decimal(1) + n * Decimal("0.0001")


def test_a_clean_run_counts_ok_and_failed() -> None:
    requests = [
        _request(1, _ok(10)),
        _request(2, _error("busy"), _ok(11)),  # resent after busy
        _request(3, _error("db_unavailable")),
    ]
    out = lost.check("none", requests, [(10, _qty(1)), (11, _qty(2))])
    assert (out.requests, out.resends, out.ok_once, out.failed_not_stored) == (3, 1, 1 + 1, 1)
    assert (out.outcome_unknown, out.duplicates, out.no_ack, out.violations) == (0, 0, 0, 0)
    assert out.final_errors == {"db_unavailable": 1}
    assert not out.bad


@pytest.mark.parametrize(
    ("requests", "rows", "column"),
    [
        # answered ok, nothing stored
        ([_request(1, _ok(10))], [], "violations"),
        # answered ok with another order's id
        ([_request(1, _ok(10))], [(11, _qty(1))], "violations"),
        # told it failed, yet stored (a lost COMMIT answered db_unavailable)
        ([_request(1, _error("db_unavailable"))], [(10, _qty(1))], "violations"),
        # a row no request made
        ([_request(1, _ok(10))], [(10, _qty(1)), (12, _qty(7))], "violations"),
        # stored twice (a resend ran the handler again)
        ([_request(1, {"error": "timeout"}, _ok(11))], [(10, _qty(1)), (11, _qty(1))],
         "duplicates"),
        # the final answer is outcome_unknown
        ([_request(1, _error("outcome_unknown"))], [], "outcome_unknown"),
        # a send never answered, even though a resend was
        ([_request(1, None, _ok(10))], [(10, _qty(1))], "no_ack"),
    ],
)  # fmt: skip
def test_every_kind_of_loss_is_counted(
    requests: list[Any], rows: list[tuple[int, Decimal]], column: str
) -> None:
    if column == "no_ack":  # the first send's ack never came
        requests[0].attempts[0].answered.clear()
    out = lost.check("x", requests, rows)
    assert getattr(out, column) >= 1, out
    assert out.bad
    assert out.problems or column == "no_ack"


def test_unanswered_last_send_is_no_ack_not_ok() -> None:
    out = lost.check("x", [_request(1, _ok(10), answered=False)], [])
    assert (out.no_ack, out.ok_once, out.violations) == (1, 0, 0)
    assert out.bad


def test_bad_arguments_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--faults", "kill,melt"], ["--faults", ","], ["--clients", "0"],
                 ["--seconds", "-1"]):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            lost.parse_args(argv)
        assert info.value.code == 2
    capsys.readouterr()
    args = lost.parse_args(["--quick", "--faults", "kill, freeze"])
    assert (args.clients, args.seconds, args.faults) == (4, 3.0, ["kill", "freeze"])


def _run(postgres_url: str, *argv: str) -> tuple[int, str, dict[str, dict[str, str]]]:
    """Run the script; (exit status, everything it printed, its table's rows by fault)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, "DBCTX_TEST_POSTGRES_URL": postgres_url},
        capture_output=True,
        text=True,
        timeout=180,
    )
    report = f"exit {result.returncode}\n{result.stdout}\n--- stderr ---\n{result.stderr[-6000:]}"
    print(report)  # shown in full when the test fails
    rows = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in lost.FAULTS:
            rows[cells[0]] = dict(zip(lost.HEADERS, cells))
    return result.returncode, report, rows


def _assert_nothing_lost(fault: str, row: dict[str, str]) -> None:
    assert int(row["requests"]) > 0, fault
    for column in ("outcome_unknown", "duplicates", "no ack", "violations"):
        assert row[column] == "0", (fault, column, row)
    done = int(row["ok, stored once"]) + int(row["failed, not stored"])
    assert done == int(row["requests"]), (fault, row)
    if fault != "none":
        assert re.match(r"[1-9]", row["injected"]), (fault, row)


#: every fault but lost_commit_down (below)
#: The quick run's faults: the ones only this benchmark injects against the sample app
#: (none, refuse and freeze are test_faults' own, and the default run has them all).
QUICK_FAULTS = ["kill", "blackhole", "lost_commit", "long_freeze"]


@pytest.mark.postgres
def test_quick_run_loses_nothing(postgres_url: str) -> None:
    """The quick faults, ``--quick``: exit 0, one row per fault, the must-be-0 columns 0."""
    status, report, rows = _run(postgres_url, "--quick", "--faults", ",".join(QUICK_FAULTS))
    assert sorted(rows) == sorted(QUICK_FAULTS), report
    for fault, row in rows.items():
        _assert_nothing_lost(fault, row)
    assert status == 0, report


@pytest.mark.postgres
def test_lost_commit_with_the_database_down_is_never_told_failed(postgres_url: str) -> None:
    """The COMMIT of ``place_order`` (keyed by ``client_order_id``) is applied, its answer
    lost, and the database refuses connections for 5 s right after: the client may be
    told ``outcome_unknown`` (and resends), never that the order failed."""
    if "lost_commit_down" not in lost.default_faults():
        pytest.skip("tests/tcp_proxy.py has no cut_next_commit(after='refuse') yet")
    status, report, rows = _run(
        postgres_url, "--faults", "lost_commit_down", "--clients", "4", "--seconds", "4"
    )
    assert list(rows) == ["lost_commit_down"], report
    _assert_nothing_lost("lost_commit_down", rows["lost_commit_down"])
    assert status == 0, report
