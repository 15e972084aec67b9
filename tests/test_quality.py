"""Lint, format and type checks run as part of the suite, so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.tools
@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_tool_is_clean(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_all_is_sorted_and_resolves() -> None:
    import socketio_dbctx

    names = socketio_dbctx.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(socketio_dbctx, name), name


def test_package_is_typed() -> None:
    assert (ROOT / "socketio_dbctx" / "py.typed").is_file()
