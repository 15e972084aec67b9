"""A bounded ``SELECT 1`` against an engine that never raises."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from .tasks import make_event, spawn

__all__ = ["health_check"]


def health_check(engine: Engine | None, timeout: float, socketio: Any = None) -> dict[str, Any]:
    """Check out a connection, run ``SELECT 1`` and give it back, within ``timeout``.

    The probe runs in the async mode's own kind of thread, so a hung server or a
    full pool costs the caller ``timeout`` seconds at most.

    :returns: ``{"healthy": bool, "latency_ms": float, "error": str | None}``; the
        error text names the exception type only, never the URL.
    """
    start = time.perf_counter()
    if engine is None:
        return {"healthy": False, "latency_ms": 0.0, "error": "no database engine configured"}
    result: dict[str, Any] = {}
    done = make_event(socketio)

    def probe() -> None:
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1")).scalar()
            result["error"] = None
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: could not run SELECT 1"
        finally:
            result["latency_ms"] = round((time.perf_counter() - start) * 1000.0, 3)
            done.set()

    try:
        spawn(socketio, probe)
    except Exception as exc:  # e.g. no threads left
        return {"healthy": False, "latency_ms": 0.0, "error": f"{type(exc).__name__}"}
    if not done.wait(timeout):
        return {
            "healthy": False,
            "latency_ms": round((time.perf_counter() - start) * 1000.0, 3),
            "error": f"timed out after {timeout}s",
        }
    return {
        "healthy": result["error"] is None,
        "latency_ms": result["latency_ms"],
        "error": result["error"],
    }
