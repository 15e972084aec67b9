"""A bounded ``SELECT 1`` against an engine that never raises, and what the last one said.

Each engine remembers its last probe: :func:`probe_failing` is true from the moment a
probe failed or a caller gave up waiting for it until a later probe succeeds, so the
monitor's ``status`` never says ``healthy`` right after ``/healthz`` said 503.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Engine

from .leaks import NOT_WAITING
from .shapes import HealthResult
from .tasks import make_event, spawn

__all__ = ["PROBE_TIMEOUT", "health_check", "probe_failing", "start_probe"]

#: Seconds after which a probe still running counts as failed.
PROBE_TIMEOUT = 2.0


def health_check(engine: Engine | None, timeout: float, socketio: Any = None) -> HealthResult:
    """Check out a connection, run ``SELECT 1`` and give it back, within ``timeout``.

    The probe runs in the async mode's own kind of thread, so a hung server or a
    full pool costs the caller ``timeout`` seconds at most.

    :returns: a :class:`~socketio_dbctx.shapes.HealthResult`; the error text names
        the exception type only, never the URL.
    """
    start = time.perf_counter()
    if engine is None:
        return {"healthy": False, "latency_ms": 0.0, "error": "no database engine configured"}
    with _LOCK:
        # One probe per engine at a time: during an incident, repeated checks join the
        # probe already running instead of piling up threads waiting on the pool.
        running = _PROBES.get(engine)
        if running is None:
            running = _PROBES[engine] = _Probe(make_event(socketio), start)
            _STARTED[engine] = start
            fresh = True
        else:
            fresh = False
    if fresh:
        try:
            spawn(socketio, running.run, engine)
        except Exception as exc:  # e.g. no threads left
            with _LOCK:
                _PROBES.pop(engine, None)
                _FAILED[engine] = True
            return {"healthy": False, "latency_ms": 0.0, "error": f"{type(exc).__name__}"}
    if not running.done.wait(timeout):
        running.gave_up = True
        return {
            "healthy": False,
            "latency_ms": round((time.perf_counter() - start) * 1000.0, 3),
            "error": f"timed out after {timeout}s",
        }
    return {
        "healthy": running.error is None,
        "latency_ms": running.latency_ms,
        "error": running.error,
    }


def start_probe(engine: Engine, socketio: Any = None, *, every: float = 0.0) -> None:
    """Start a probe of ``engine`` unless one is running, or one started less than
    ``every`` seconds ago; don't wait for it (its result is what :func:`probe_failing`
    reports)."""
    now = time.perf_counter()
    with _LOCK:
        if engine in _PROBES or now - _STARTED.get(engine, -every) < every:
            return
        probe = _PROBES[engine] = _Probe(make_event(socketio), now)
        _STARTED[engine] = now
    try:
        spawn(socketio, probe.run, engine)
    except Exception:
        with _LOCK:
            _PROBES.pop(engine, None)
            _FAILED[engine] = True


def probe_failing(engine: Engine) -> bool:
    """Whether ``engine``'s health probes fail: the last one failed, or the one running
    has taken longer than :data:`PROBE_TIMEOUT` or than a caller would wait."""
    with _LOCK:
        running = _PROBES.get(engine)
        if running is not None and (
            running.gave_up or time.perf_counter() - running.start > PROBE_TIMEOUT
        ):
            return True
        return _FAILED.get(engine, False)


class _Probe:
    __slots__ = ("done", "error", "gave_up", "latency_ms", "start")

    def __init__(self, done: Any, start: float) -> None:
        self.done = done
        self.start = start
        self.gave_up = False  # a caller stopped waiting for it: it counts as failed
        self.error: str | None = "probe did not finish"
        self.latency_ms = 0.0

    def run(self, engine: Engine) -> None:
        token = NOT_WAITING.set(True)  # a probe is not an event waiting for the pool
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1")).scalar()
            self.error = None
        except Exception as exc:
            self.error = f"{type(exc).__name__}: could not run SELECT 1"
        finally:
            NOT_WAITING.reset(token)
            self.latency_ms = round((time.perf_counter() - self.start) * 1000.0, 3)
            with _LOCK:
                if _PROBES.get(engine) is self:
                    del _PROBES[engine]
                _FAILED[engine] = self.error is not None
            self.done.set()


_LOCK = threading.Lock()
_PROBES: weakref.WeakKeyDictionary[Engine, _Probe] = weakref.WeakKeyDictionary()
#: when the last probe of each engine started (``time.perf_counter()``)
_STARTED: weakref.WeakKeyDictionary[Engine, float] = weakref.WeakKeyDictionary()
#: whether the last finished probe of each engine failed
_FAILED: weakref.WeakKeyDictionary[Engine, bool] = weakref.WeakKeyDictionary()
