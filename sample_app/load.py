"""A load driver for the sample app: real python-socketio clients trading on ``/trading``.

    python -m sample_app.load --url http://127.0.0.1:5000 --clients 20 --rate 5 --duration 30

Each client sends ``--rate`` events per second on a fixed schedule, whether or not its
earlier events were answered (an open loop, like independent users): mostly random
valid orders on ``--symbols`` (buys and sells around one price, so many cross and
trade), some ``list_orders``, and some ``cancel_order`` of its own open orders; a
cancel of an order that filled first is answered ``{"ok": false}`` and counted as
``late``, apart from errors. It stops by itself after ``--duration``
seconds and prints a summary: events sent, acks ok, errors by code, latency
percentiles. Only loopback URLs are accepted unless ``--allow-remote`` is given.

Exit status: 0 when events were acknowledged and none timed out, failed with
``internal_error``/``db_unavailable`` or lost its connection; 1 otherwise; 2 when no
client could connect.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import json
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import engineio
import socketio

__all__ = ["Stats", "main", "make_order", "parse_args", "run"]

NS = "/trading"
MAX_CLIENTS = 1000
MAX_RATE = 1000.0
MAX_DURATION = 3600.0
#: latencies kept per event for the percentiles (a uniform sample beyond that)
SAMPLE = 50_000
#: ack codes after which the run counts as failed
FAILURES = frozenset({"timeout", "disconnected", "internal_error", "db_unavailable"})
#: the default books: orders of one symbol are matched one at a time
SYMBOLS = ("BTC.USD", "ETH.USD", "SOL.USD", "ADA.USD", "XRP.USD", "DOT.USD", "LTC.USD", "BNB.USD")
#: the outcome of a cancel answered ``{"ok": false, "order": ...}``: counted apart
LATE = "late"


def _positive(kind: type, upper: float) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (value > 0 and value <= upper and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0 and <= {upper:g}, got {text}")
        return value

    return parse


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be from 0 to 1, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sample_app.load",
        description="Trade against a running sample app with real Socket.IO clients.",
    )
    parser.add_argument("--url", default="http://127.0.0.1:5000", help="the sample app")
    parser.add_argument(
        "--clients", type=_positive(int, MAX_CLIENTS), default=10, help="default: 10"
    )
    parser.add_argument(
        "--rate",
        type=_positive(float, MAX_RATE),
        default=5.0,
        help="events per second of each client (default: 5)",
    )
    parser.add_argument(
        "--duration",
        type=_positive(float, MAX_DURATION),
        default=30.0,
        help="seconds to run (default: 30)",
    )
    parser.add_argument(
        "--symbols",
        default=",".join(SYMBOLS),
        help=f"comma-separated (default: {','.join(SYMBOLS)}): one book per symbol, "
        "matched one order at a time",
    )
    parser.add_argument("--list-ratio", type=_ratio, default=0.1, help="share of list_orders")
    parser.add_argument("--cancel-ratio", type=_ratio, default=0.1, help="share of cancel_order")
    parser.add_argument(
        "--invalid-ratio",
        type=_ratio,
        default=0.0,
        help="share of deliberately invalid orders (acked invalid_request)",
    )
    parser.add_argument("--timeout", type=_positive(float, 120.0), default=10.0, help="ack wait")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument(
        "--token",
        default=os.environ.get("DBCTX_MONITOR_AUTH"),
        help="monitor token (env DBCTX_MONITOR_AUTH): add the server's pool status at the "
        "end (write --token=VALUE when it starts with '-')",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--closed-loop",
        action="store_true",
        help="wait for each ack before the next event (a client with one request at a time)",
    )
    parser.add_argument(
        "--thread-per-message",
        action="store_true",
        help="python-socketio's default client, which starts a thread for every message it "
        "receives (for comparison: CPU-bound with many clients)",
    )
    parser.add_argument(
        "--allow-remote", action="store_true", help="allow a URL that is not on this machine"
    )
    args = parser.parse_args(argv)
    parts = urlsplit(args.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        parser.error(f"--url must be http(s)://host:port, got {args.url!r}")
    if not args.allow_remote and not is_loopback(parts.hostname):
        parser.error(f"--url {args.url} is not on this machine; pass --allow-remote to load it")
    args.symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    if not args.symbols:
        parser.error("--symbols is empty")
    if args.list_ratio + args.cancel_ratio + args.invalid_ratio > 1:
        parser.error("--list-ratio + --cancel-ratio + --invalid-ratio must be <= 1")
    return args


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_order(rng: random.Random, symbol: str, mid: float = 100.0) -> dict[str, Any]:
    """A random valid order near ``mid``: buys and sells overlap, so about half cross."""
    side = rng.choice(("buy", "sell"))
    skew = -0.5 if side == "buy" else 0.5
    price = f"{max(0.01, rng.gauss(mid + skew, 1.0)):.2f}"  # on the 0.01 tick
    qty = str(rng.choice((1, 1, 2, 3, 5))) if rng.random() < 0.7 else f"{rng.uniform(0.1, 4):.2f}"
    return {"symbol": symbol, "side": side, "qty": qty, "price": price}


INVALID_ORDERS: list[Any] = [
    {"symbol": "btc", "side": "buy", "qty": 1, "price": 100},
    {"symbol": "BTC.USD", "side": "hold", "qty": 1, "price": 100},
    {"symbol": "BTC.USD", "side": "buy", "qty": -1, "price": 100},
    {"symbol": "BTC.USD", "side": "buy", "qty": 1},
    {"symbol": "BTC.USD", "side": "buy", "qty": 0.1 + 0.2, "price": 100},  # off the tick
    "not an order",
]


@dataclass
class EventStats:
    sent: int = 0
    ok: int = 0
    #: answered ``{"ok": false, ...}``: a cancel of an order that filled first
    late: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)


class Stats:
    """Counters shared by the client threads."""

    def __init__(self, seed: int | None) -> None:
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self.events: dict[str, EventStats] = {}
        self.connect_errors: list[str] = []
        self.broadcasts: Counter[str] = Counter()

    def record(self, event: str, seconds: float, error: str | None) -> None:
        """``error``: None for an ok ack, ``LATE`` for ``{"ok": false}``, else the code."""
        with self._lock:
            stats = self.events.setdefault(event, EventStats())
            stats.sent += 1
            if error is None:
                stats.ok += 1
            elif error == LATE:
                stats.late += 1
            else:
                stats.errors[error] += 1
            if len(stats.latencies) < SAMPLE:
                stats.latencies.append(seconds)
            else:  # reservoir sampling keeps a uniform sample
                slot = self._rng.randrange(stats.sent)
                if slot < SAMPLE:
                    stats.latencies[slot] = seconds

    def connect_error(self, message: str) -> None:
        with self._lock:
            self.connect_errors.append(message)

    def broadcast(self, name: str) -> None:
        with self._lock:
            self.broadcasts[name] += 1


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(q * len(ordered)) - 1)] * 1000.0, 2)


def _error_code(ack: Any) -> str | None:
    if isinstance(ack, dict) and ack.get("ok") is False and "error" not in ack:
        return LATE  # an answer, not an error: the order filled (or went) first
    if isinstance(ack, dict) and "error" not in ack:
        return None
    if isinstance(ack, dict) and isinstance(ack.get("error"), str):
        return str(ack["error"])
    return "bad_ack"


def _transports() -> list[str] | None:
    # WebSocket straight away when websocket-client is installed; else long-polling
    return ["websocket"] if importlib.util.find_spec("websocket") else None


class _InlineEngineIO(engineio.Client):  # type: ignore[misc]
    """An Engine.IO client that handles each received message in its reader thread.

    python-engineio starts a thread for every message it receives; a load driver
    whose clients hear every broadcast spends its CPU starting threads (measured: one
    core at 90% for 20 clients at 5 events/s, and latencies of 170 ms that the server
    did not cause). The driver's handlers only count and record, so running them
    inline is safe: none of them waits for the server.
    """

    def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "message":
            kwargs["run_async"] = False
        return super()._trigger_event(event, *args, **kwargs)


class LoadClient(socketio.Client):  # type: ignore[misc]
    """A python-socketio client on :class:`_InlineEngineIO`."""

    def _engineio_client_class(self) -> type:
        return _InlineEngineIO


def _client_loop(
    index: int, client: socketio.Client, args: argparse.Namespace, stats: Stats, deadline: float
) -> None:
    """Send on a fixed schedule (open loop): an event goes out at its time whether or
    not earlier ones have been answered, as independent users would; each ack is
    recorded when it arrives, and an event unanswered after ``--timeout`` counts as
    ``timeout``."""
    rng = random.Random(None if args.seed is None else args.seed * 1_000 + index)
    open_orders: list[int] = []
    pending: dict[int, tuple[str, float]] = {}  # sequence number -> (event, sent at)
    lock = threading.Lock()
    answered_one = threading.Event()  # --closed-loop waits on it
    interval = 1.0 / args.rate
    next_at = time.monotonic() + rng.uniform(0, interval)  # spread the clients out

    def answered(number: int, event: str, *ack_args: Any) -> None:
        with lock:
            sent = pending.pop(number, None)
        if sent is None:  # counted as a timeout already
            return
        answered_one.set()
        ack = ack_args[0] if ack_args else None
        stats.record(event, time.perf_counter() - sent[1], _error_code(ack))
        if event == "place_order" and isinstance(ack, dict) and ack.get("ok"):
            order = ack["order"]
            if order["status"] == "open":
                with lock:
                    open_orders.append(order["id"])
                    del open_orders[:-100]  # bounded: cancel among the newest

    def expire(older_than: float) -> None:
        with lock:
            late = [(n, e) for n, (e, at) in pending.items() if at < older_than]
            for number, _ in late:
                del pending[number]
        for _, event in late:
            stats.record(event, args.timeout, "timeout")

    number = 0
    while True:
        now = time.monotonic()
        if next_at > now:
            time.sleep(min(next_at - now, max(0.0, deadline - now)))
        if time.monotonic() >= deadline:
            break
        next_at = max(next_at + interval, time.monotonic() - 1.0)  # no burst after a stall
        expire(time.perf_counter() - args.timeout)
        roll = rng.random()
        cancel: int | None = None
        if (
            args.invalid_ratio + args.list_ratio
            <= roll
            < (args.invalid_ratio + args.list_ratio + args.cancel_ratio)
        ):
            with lock:
                if open_orders:
                    cancel = open_orders.pop(rng.randrange(len(open_orders)))
        if roll < args.invalid_ratio:
            event, data = "place_order", rng.choice(INVALID_ORDERS)
        elif roll < args.invalid_ratio + args.list_ratio:
            event, data = "list_orders", {"symbol": rng.choice(args.symbols), "limit": 50}
        elif cancel is not None:
            event, data = "cancel_order", cancel
        else:
            event, data = "place_order", make_order(rng, rng.choice(args.symbols))
        number += 1
        with lock:
            pending[number] = (event, time.perf_counter())
        try:
            client.emit(
                event,
                data,
                namespace=NS,
                callback=lambda *a, n=number, e=event: answered(n, e, *a),
            )
        except socketio.exceptions.SocketIOError:
            with lock:
                pending.pop(number, None)
            stats.record(event, 0.0, "disconnected")
            return
        if args.closed_loop:  # one at a time: wait for this ack (or its timeout)
            answered_one.wait(args.timeout)
            answered_one.clear()
    # the last acks: wait for them up to the ack timeout
    give_up = time.monotonic() + args.timeout
    while time.monotonic() < give_up:
        with lock:
            if not pending:
                return
        time.sleep(0.02)
    expire(float("inf"))


def _connect(index: int, args: argparse.Namespace, stats: Stats) -> socketio.Client | None:
    client = (socketio.Client if args.thread_per_message else LoadClient)(reconnection=False)
    if index == 0:  # one client counts what the server broadcasts
        for name in ("order_placed", "trade", "order_updated"):
            client.on(name, lambda *_, name=name: stats.broadcast(name), namespace=NS)
    try:
        client.connect(
            args.url, namespaces=[NS], transports=_transports(), wait_timeout=args.timeout
        )
    except socketio.exceptions.ConnectionError as exc:
        stats.connect_error(str(exc))
        return None
    return client


def server_status(args: argparse.Namespace) -> dict[str, Any] | None:
    """The server's monitor payload (``get_status``), when a token was given."""
    if not args.token:
        return None
    client = socketio.Client(reconnection=False)
    try:
        client.connect(
            args.url,
            namespaces=["/monitor"],
            auth={"token": args.token},
            transports=_transports(),
            wait_timeout=args.timeout,
        )
        status = client.call("get_status", namespace="/monitor", timeout=args.timeout)
    except socketio.exceptions.SocketIOError as exc:
        return {"error": f"monitor unavailable: {type(exc).__name__}: {exc}"}
    finally:
        if client.connected:
            client.disconnect()
    return status if isinstance(status, dict) else {"error": "unexpected get_status ack"}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Connect, trade until the duration is over, disconnect; return the summary."""
    stats = Stats(args.seed)
    clients: list[socketio.Client | None] = [None] * args.clients

    def connect(i: int) -> None:
        clients[i] = _connect(i, args, stats)

    connectors = [threading.Thread(target=connect, args=(i,)) for i in range(args.clients)]
    for thread in connectors:
        thread.start()
    for thread in connectors:
        thread.join(args.timeout + 5)
    connected = [(i, c) for i, c in enumerate(clients) if c is not None and c.connected]
    started = time.monotonic()
    deadline = started + args.duration
    if connected:
        workers = [
            threading.Thread(target=_client_loop, args=(i, c, args, stats, deadline), daemon=True)
            for i, c in connected
        ]
        for thread in workers:
            thread.start()
        for thread in workers:  # each loop ends at the deadline, plus one ack wait at most
            thread.join(max(0.0, deadline - time.monotonic()) + args.timeout + 5)
    elapsed = time.monotonic() - started
    # in parallel: some servers let a WebSocket close wait for its timeout (3 s)
    closers = [threading.Thread(target=c.disconnect) for _, c in connected if c.connected]
    for thread in closers:
        thread.start()
    for thread in closers:
        thread.join(args.timeout)
    return summarize(args, stats, len(connected), elapsed, server_status(args))


def summarize(
    args: argparse.Namespace,
    stats: Stats,
    connected: int,
    elapsed: float,
    server: dict[str, Any] | None,
) -> dict[str, Any]:
    errors: Counter[str] = Counter()
    events: dict[str, Any] = {}
    everything: list[float] = []
    for name, s in sorted(stats.events.items()):
        errors.update(s.errors)
        everything.extend(s.latencies)
        events[name] = {
            "sent": s.sent,
            "ok": s.ok,
            "late": s.late,
            "errors": dict(s.errors),
            "p50_ms": percentile(s.latencies, 0.50),
            "p99_ms": percentile(s.latencies, 0.99),
        }
    sent = sum(s.sent for s in stats.events.values())
    ok = sum(s.ok for s in stats.events.values())
    summary: dict[str, Any] = {
        "url": args.url,
        "clients": args.clients,
        "connected": connected,
        "connect_errors": stats.connect_errors[:10],
        "rate_per_client": args.rate,
        "duration_s": args.duration,
        "elapsed_s": round(elapsed, 3),
        "events": sent,
        "acks_ok": ok,
        "late_cancels": sum(s.late for s in stats.events.values()),
        "errors": dict(errors),
        "events_per_s": round(sent / elapsed, 2) if elapsed > 0 else 0.0,
        "p50_ms": percentile(everything, 0.50),
        "p99_ms": percentile(everything, 0.99),
        "by_event": events,
        "broadcasts_seen_by_client_0": dict(stats.broadcasts),
    }
    if server is not None:
        summary["server"] = _server_summary(server)
    return summary


def _server_summary(status: dict[str, Any]) -> dict[str, Any]:
    if "error" in status and "pools" not in status:
        return {"error": status["error"]}
    pool = status.get("pools", {}).get("default", {})
    return {
        "worker": status.get("worker"),
        "status": status.get("status"),
        "checked_out": pool.get("checked_out"),
        "capacity": pool.get("capacity"),
        "leaks": len(status.get("leaks", [])),
        "events": {
            key: {k: value.get(k) for k in ("count", "errors", "busy", "p50_ms", "p99_ms")}
            for key, value in status.get("events", {}).items()
            if key.startswith(NS + ":")
        },
    }


def format_summary(summary: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [
        f"sample_app.load: {summary['connected']}/{summary['clients']} clients x "
        f"{summary['rate_per_client']:g} ev/s for {summary['elapsed_s']:.1f} s "
        f"against {summary['url']}",
        f"{'event':<14}{'sent':>8}{'ok':>8}{'late':>6}{'errors':>8}{'p50 ms':>10}{'p99 ms':>10}",
    ]
    for name, e in summary["by_event"].items():
        lines.append(
            f"{name:<14}{e['sent']:>8}{e['ok']:>8}{e['late']:>6}{sum(e['errors'].values()):>8}"
            f"{ms(e['p50_ms']):>10}{ms(e['p99_ms']):>10}"
        )
    lines.append(
        f"{'total':<14}{summary['events']:>8}{summary['acks_ok']:>8}"
        f"{summary['late_cancels']:>6}{sum(summary['errors'].values()):>8}"
        f"{ms(summary['p50_ms']):>10}{ms(summary['p99_ms']):>10}"
    )
    errors = ", ".join(f"{k}={v}" for k, v in sorted(summary["errors"].items())) or "none"
    lines.append(f"errors by code: {errors}")
    lines.append(
        f"late cancels (the order filled first; an answer, not an error): "
        f"{summary['late_cancels']}"
    )
    seen = summary["broadcasts_seen_by_client_0"]
    lines.append(
        f"throughput: {summary['events_per_s']:.1f} ev/s; client 0 saw "
        f"{seen.get('order_placed', 0)} order_placed and {seen.get('trade', 0)} trade broadcasts"
    )
    if summary["connect_errors"]:
        lines.append(f"connect errors: {'; '.join(summary['connect_errors'])}")
    server = summary.get("server")
    if server:
        if "error" in server:
            lines.append(f"server: {server['error']}")
        else:
            lines.append(
                f"server {server['worker']}: {server['status']}, pool "
                f"{server['checked_out']}/{server['capacity']} checked out, "
                f"{server['leaks']} leaks"
            )
    return "\n".join(lines)


def exit_status(summary: dict[str, Any]) -> int:
    if not summary["connected"]:
        return 2
    failed = any(code in FAILURES for code in summary["errors"])
    return 1 if failed or not summary["acks_ok"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run(args)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary), flush=True)
    return exit_status(summary)


if __name__ == "__main__":
    sys.exit(main())
