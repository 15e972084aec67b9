"""The ``/monitor`` namespace: live pool statistics for dashboards.

A subscriber authenticates with ``auth={"token": ...}`` (or whatever a callable
``DBCTX_MONITOR_AUTH`` accepts), receives one ``pool_status`` at once, then one
every ``DBCTX_MONITOR_INTERVAL`` seconds while it stays connected. One loop per
process does the pushing, and only while somebody listens. The namespace touches
no pooled connection for its own bookkeeping and is never held back by admission,
so it keeps answering when the pool is full.

The rules here (:func:`check_auth`, :class:`CallBudgets`, :func:`status_scope`, the
acks) are also those of the asyncio monitor, ``socketio_dbctx.aio.monitor``; the
payload is :func:`socketio_dbctx.state.monitor_payload` in both.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from collections.abc import Hashable, Mapping
from typing import Any, Literal, Union

from flask import Flask, current_app, request
from flask_socketio import Namespace

from .acks import error_payload
from .errors import BusyError, InvalidRequestError
from .health import start_probe
from .shapes import ClusterPayload, ErrorAck, HealthResult, MonitorPayload
from .state import AppState, app_state

__all__ = [
    "CallBudgets",
    "MonitorNamespace",
    "busy_ack",
    "check_auth",
    "no_cluster_ack",
    "status_scope",
    "warn_if_open",
]

logger = logging.getLogger(__name__)


def check_auth(setting: Any, auth: Any) -> bool:
    """Whether a client's ``auth`` payload passes ``DBCTX_MONITOR_AUTH``.

    A token is compared in constant time; a callable decides itself (an exception
    counts as no); ``False`` lets everybody in.
    """
    if setting is False:
        return True
    if isinstance(setting, str):
        token = auth.get("token") if isinstance(auth, dict) else None
        if not isinstance(token, str):
            return False
        return hmac.compare_digest(token.encode("utf-8"), setting.encode("utf-8"))
    if callable(setting):
        try:
            return bool(setting(auth if isinstance(auth, dict) else {}))
        except Exception:
            logger.exception("DBCTX_MONITOR_AUTH callable raised; refusing the client")
            return False
    return False


def warn_if_open(monitor_auth: Any, namespace: str) -> None:
    """Log the start-up warning of a monitor open to everybody (``auth=False``)."""
    if monitor_auth is False:
        logger.warning(
            "DBCTX_MONITOR_AUTH is False: %s is open to anyone who can connect", namespace
        )


def busy_ack() -> ErrorAck:
    """The ack of a ``get_status``/``health`` call beyond its budget."""
    return error_payload(BusyError("too many monitor calls"), expose=False)


def no_cluster_ack() -> ErrorAck:
    """The ack of ``get_status({"scope": "cluster"})`` without a cluster view."""
    return error_payload(
        InvalidRequestError("the cluster view needs a Redis message queue"), expose=False
    )


def status_scope(data: Any) -> Union[Literal["local", "cluster"], ErrorAck]:  # noqa: UP007
    """What a ``get_status`` call asks for: nothing (or ``{"scope": "local"}``) is this
    worker's payload, ``{"scope": "cluster"}`` the cluster view; anything else gets an
    ``invalid_request`` ack."""
    if data is None or data == {} or data == {"scope": "local"}:
        return "local"
    if data == {"scope": "cluster"}:
        return "cluster"
    return error_payload(
        InvalidRequestError("get_status takes nothing or {'scope': 'cluster'}"), expose=False
    )


def _sid() -> str:
    # Flask-SocketIO sets request.sid on its per-event request context
    sid: str = getattr(request, "sid")  # noqa: B009 - unknown to type checkers
    return sid


class _Bucket:
    """Token bucket for the ``get_status``/``health`` calls of one budget."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, capacity: float) -> None:
        self.tokens = capacity
        self.stamp = time.monotonic()


class CallBudgets:
    """The rate limits of ``get_status``/``health``: one token bucket per budget key
    (``rate`` calls per second, burst ``rate``), each sid counted against the key it
    joined with. A budget outlives its clients, so reconnecting does not refill it."""

    def __init__(self) -> None:
        self._buckets: dict[Hashable, _Bucket] = {}
        self._budget_of: dict[str, Hashable] = {}
        self._lock = threading.Lock()

    def join(self, sid: str, key: Hashable) -> None:
        """Count ``sid``'s calls against budget ``key``."""
        with self._lock:
            self._budget_of[sid] = key

    def leave(self, sid: str) -> None:
        """Forget ``sid`` (its budget stays)."""
        with self._lock:
            self._budget_of.pop(sid, None)

    def allow(self, sid: str, rate: float) -> bool:
        """Take a token from ``sid``'s budget; False when it is empty."""
        now = time.monotonic()
        with self._lock:
            key = self._budget_of.get(sid)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(rate)
            bucket.tokens = min(rate, bucket.tokens + (now - bucket.stamp) * rate)
            bucket.stamp = now
            if bucket.tokens < 1:
                return False
            bucket.tokens -= 1
            return True


class MonitorNamespace(Namespace):  # type: ignore[misc]
    """Streams ``pool_status`` to authenticated subscribers.

    Client events: ``get_status`` (optionally ``{"scope": "cluster"}``) and
    ``health``, each acked, and limited to :attr:`rate` calls per second per budget:
    by default one budget per process, shared by every monitor client (they all hold
    the one token, or pass the one callable), so opening more connections does not
    buy more calls. Override :meth:`budget_key` to give each user a budget of their own.

    :param namespace: usually ``DBCTX_MONITOR_NAMESPACE``.
    """

    #: calls of ``get_status``/``health`` per second and budget (burst: the same).
    rate = 5.0
    #: seconds between the health probes the push loop starts while anybody listens.
    probe_every = 10.0

    def budget_key(self, auth: Any) -> Hashable:
        """The rate-limit budget a client's calls count against, from the ``auth`` it
        connected with (already accepted). Clients with equal keys share one budget.

        The default, ``None``, is one budget for the whole process. With a callable
        ``DBCTX_MONITOR_AUTH`` that tells users apart, return the user's id here.

        .. versionadded:: 0.1
        """
        return None

    def __init__(self, namespace: str = "/monitor") -> None:
        super().__init__(namespace)
        self._subscribers: dict[str, Flask] = {}
        self._budgets = CallBudgets()
        self._lock = threading.Lock()
        self._loop_running = False

    # -- helpers ------------------------------------------------------------------------

    def _state(self) -> tuple[Flask, AppState]:
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        return app, app_state(app, self.socketio)

    def _allow(self, sid: str) -> bool:
        return self._budgets.allow(sid, self.rate)

    def _emit_to(self, sid: str, payload: Mapping[str, Any], event: str = "pool_status") -> None:
        # ignore_queue: a push is for this worker's own subscriber only, never via the queue
        self.socketio.emit(event, payload, to=sid, namespace=self.namespace, ignore_queue=True)

    def push(self, event: str, payload: Mapping[str, Any]) -> None:
        """Send ``payload`` to every subscriber connected to this process."""
        with self._lock:
            sids = list(self._subscribers)
        for sid in sids:
            try:
                self._emit_to(sid, payload, event)
            except Exception:
                logger.exception("monitor push of %s to %s failed", event, sid)

    # -- lifecycle ----------------------------------------------------------------------

    def on_connect(self, auth: Any = None) -> bool:
        app, state = self._state()
        if not check_auth(state.settings.monitor_auth, auth):
            logger.warning("monitor connection refused for sid %s", _sid())
            return False
        sid = _sid()
        budget = self.budget_key(auth)
        first = state.payload(app)  # before subscribing: if this fails, nobody is left behind
        self._budgets.join(sid, budget)
        with self._lock:
            self._subscribers[sid] = app
            start = not self._loop_running
            self._loop_running = True
        self._emit_to(sid, first)
        if start:
            self.socketio.start_background_task(self._loop, state.settings.monitor_interval)
        return True

    def on_disconnect(self, reason: Any = None) -> None:
        with self._lock:
            self._subscribers.pop(_sid(), None)
        # the budget stays: reconnecting must not refill it
        self._budgets.leave(_sid())

    def _loop(self, interval: float) -> None:
        """Push a snapshot to every local subscriber each interval; end with the last."""
        try:
            while True:
                self.socketio.sleep(interval)
                with self._lock:
                    subscribers = dict(self._subscribers)
                    if not subscribers:
                        self._loop_running = False
                        return
                payloads: dict[int, MonitorPayload] = {}
                for sid, app in subscribers.items():
                    try:
                        payload = payloads.get(id(app))
                        if payload is None:
                            state = app_state(app, self.socketio)
                            self._probe(app, state)
                            payload = payloads[id(app)] = state.payload(app)
                        self._emit_to(sid, payload)
                    except Exception:
                        logger.exception("monitor push to %s failed", sid)
        except BaseException:
            with self._lock:
                self._loop_running = False
            raise

    def _probe(self, app: Flask, state: AppState) -> None:
        # while somebody watches, the status follows the database without anybody
        # calling /healthz: a probe every probe_every seconds (not waited for; its result
        # shows in a later push). It takes a pooled connection for a moment.
        engine = state.follow(app).get("default")
        if engine is not None:
            start_probe(engine, self.socketio, every=self.probe_every)

    @property
    def subscribers(self) -> int:
        """How many clients of this process are subscribed."""
        return len(self._subscribers)

    @property
    def loop_running(self) -> bool:
        """Whether the push loop of this process is running."""
        return self._loop_running

    # -- client events ------------------------------------------------------------------

    def on_get_status(self, data: Any = None) -> MonitorPayload | ClusterPayload | ErrorAck:
        app, state = self._state()
        if not self._allow(_sid()):
            return busy_ack()
        scope = status_scope(data)
        if scope == "cluster":
            if state.cluster is None:
                return no_cluster_ack()
            return state.cluster.payload()  # type: ignore[no-any-return]
        if scope != "local":
            return scope
        return state.payload(app)

    def on_health(self, data: Any = None) -> HealthResult | ErrorAck:
        if not self._allow(_sid()):
            return busy_ack()
        app, state = self._state()
        return state.health(app, 2.0)
