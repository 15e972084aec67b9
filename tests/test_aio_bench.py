"""Smoke test of the asyncio benchmarks: ``benchmarks/aio_overhead.py --quick`` and
``benchmarks/aio_saturation.py --quick`` run to the end on PostgreSQL and print their
tables. Their figures are not gated here (a shared 2-core machine), except what does
not depend on load: under saturation socketio_dbctx has no errors, no pool timeout and
never more than the pool's 5 connections out, while the plain namespace with the same
0.1 s ``pool_timeout`` does time out.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.server, pytest.mark.postgres]

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, postgres_url: str) -> str:
    pytest.importorskip("asyncpg", reason="the test extra installs asyncpg")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, "DBCTX_TEST_POSTGRES_URL": postgres_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def rows(output: str) -> dict[str, list[list[str]]]:
    """``{first cell: [cells, ...]}`` for every table row of ``output``."""
    found: dict[str, list[list[str]]] = {}
    for line in output.splitlines():
        if line.startswith("| ") and not line.startswith("| side ") and "---" not in line:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if cells[0] not in ("handler", "side"):
                found.setdefault(cells[0], []).append(cells)
    return found


def test_overhead_quick(postgres_url: str) -> None:
    output = run("aio_overhead.py", postgres_url)
    assert "## In-process" in output and "## End to end" in output
    table = rows(output)
    for handler in ("no-op", "PK lookup", "PK lookup, the plain handler commits too"):
        assert len(table[handler]) == 2, output  # one row per way of driving
        for cells in table[handler]:
            plain, ours, ratio = float(cells[1]), float(cells[2]), cells[3]
            assert plain > 0 and ours > 0 and re.fullmatch(r"\d+\.\d{3}x", ratio), cells


def test_saturation_quick(postgres_url: str) -> None:
    output = run("aio_saturation.py", postgres_url)
    table = rows(output)
    (ours,) = table["socketio_dbctx"]
    short, long = table["plain AsyncNamespace"]
    # side, pool_timeout, done/s, of 250/s, of bare, p50, p99, errors, timeouts, peak, CPU, CPU
    assert ours[1] == "0.1" and float(ours[2]) > 0, ours
    assert ours[7] == "0" and ours[8] == "0" and int(ours[9]) <= 5, ours
    assert short[1] == "0.1" and int(short[8]) > 0 and "pool_timeout" in short[7], short
    assert long[1] == "30" and int(long[9]) <= 5, long
    assert re.search(r"A bare loop .* does \d+ events/s", output), output
