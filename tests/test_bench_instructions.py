"""Smoke test of ``benchmarks/instructions.py``: each child once, without valgrind.

The valgrind runs themselves take minutes; here each (side, handler) child runs a few
events natively, proving the apps build, the handlers answer alike on both sides and
no session is left behind. Plus the parsing of a callgrind out file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "instructions.py"


def _load_script() -> Any:
    spec = importlib.util.spec_from_file_location("bench_instructions", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


instructions = _load_script()


def _child(side: str, handler: str) -> dict[str, Any]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, str(SCRIPT), "--child", "--side", side, "--handler", handler]
    result = subprocess.run(
        [*command, "--events", "5", "--warmup", "2"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return data


@pytest.mark.parametrize("handler", sorted(instructions.HANDLERS))
def test_child_runs_both_sides_alike(handler: str) -> None:
    plain, ours = (_child(side, handler) for side in instructions.SIDES)
    assert plain["events"] == ours["events"] == 5
    assert plain["ack"] == ours["ack"]


def test_reads_main_thread_total(tmp_path: Path) -> None:
    out = tmp_path / "callgrind.out"
    body = "events: Ir\n\nfn=(1) main\n0 7\n\ntotals: {}\n"
    Path(f"{out}-01").write_text("version: 1\ncmd: python\npart: 1\n\n" + body.format(1234))
    Path(f"{out}-02").write_text(body.format(99))
    assert instructions.main_thread_instructions(out) == 1234
