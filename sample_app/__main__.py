"""``python -m sample_app [--host H] [--port P] [--async-mode M] [--database-url URL]
[--message-queue URL] [--allowed-hosts H1,H2] [--trusted-proxies N]``.

Environment: ``DATABASE_URL``, ``SOCKETIO_MESSAGE_QUEUE``, ``ALLOWED_HOSTS``,
``TRUSTED_PROXIES``, ``DBCTX_MONITOR_AUTH`` (the token of the ``/monitor``
namespace; generated at start when unset; printed in the dashboard URL),
``DBCTX_DRAIN_TIMEOUT``.

The default async mode follows Flask-SocketIO's advice: threading, whose WebSocket
comes from simple-websocket; else gevent; never eventlet, which is deprecated
upstream (ask for it with ``--async-mode eventlet``).

Ctrl-C or SIGTERM drains (new events are acked ``busy``, the ones in flight finish and
ack, ``/healthz`` answers 503), closes every connection and exits; a second one stops
at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import sys
import warnings
from collections.abc import Mapping
from urllib.parse import quote


def default_async_mode() -> str:
    """threading when simple-websocket is installed, else gevent when installed, else
    threading (long-polling only). Never eventlet: it is deprecated upstream."""
    if importlib.util.find_spec("simple_websocket") is None and importlib.util.find_spec("gevent"):
        return "gevent"
    return "threading"


def parse_args(
    argv: list[str] | None = None, environ: Mapping[str, str] = os.environ
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m sample_app",
        description="The socketio_dbctx trading desk with its live monitoring dashboard.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    parser.add_argument("--port", type=int, default=5000, help="default: 5000")
    parser.add_argument(
        "--async-mode",
        choices=("eventlet", "gevent", "threading"),
        default=default_async_mode(),
        help="default: threading (with simple-websocket), else gevent; eventlet is deprecated",
    )
    parser.add_argument(
        "--database-url",
        default=environ.get("DATABASE_URL") or None,
        help="SQLAlchemy URL (env DATABASE_URL); default: SQLite in the instance folder",
    )
    parser.add_argument(
        "--message-queue",
        default=environ.get("SOCKETIO_MESSAGE_QUEUE") or None,
        help="Socket.IO message queue URL for several workers (env SOCKETIO_MESSAGE_QUEUE)",
    )
    parser.add_argument(
        "--allowed-hosts",
        default=environ.get("ALLOWED_HOSTS") or None,
        help="comma-separated host names browsers and clients may use (env ALLOWED_HOSTS; "
        "'*' for any); default: the --host address (and the loopback names for loopback)",
    )
    parser.add_argument(
        "--trusted-proxies",
        type=int,
        default=int(environ.get("TRUSTED_PROXIES") or 0),
        help="proxies in front of the app whose X-Forwarded-* headers count "
        "(env TRUSTED_PROXIES; default 0: those headers are ignored)",
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be 0-65535, got {args.port}")
    if not 0 <= args.trusted_proxies <= 10:
        parser.error(f"--trusted-proxies must be 0-10, got {args.trusted_proxies}")
    from .hosts import default_allowed_hosts, parse_hosts

    if args.allowed_hosts is None:
        args.allowed_hosts = default_allowed_hosts(args.host)
    else:
        args.allowed_hosts = parse_hosts(args.allowed_hosts)
        if not args.allowed_hosts:
            parser.error("--allowed-hosts is empty")
    return args


def monitor_token(environ: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """``(token, generated)``: ``DBCTX_MONITOR_AUTH``, or a fresh random token."""
    token = environ.get("DBCTX_MONITOR_AUTH")
    if token:
        return token, False
    token = secrets.token_urlsafe(24)
    while token.startswith("-"):  # would read as an option: `load --token -x...`
        token = secrets.token_urlsafe(24)
    return token, True


def drain_timeout(environ: Mapping[str, str] = os.environ) -> float:
    """``DBCTX_DRAIN_TIMEOUT`` from the environment (seconds), default 30."""
    return float(environ.get("DBCTX_DRAIN_TIMEOUT") or 30.0)


def dashboard_url(host: str, port: int, token: str | None) -> str:
    """Where to point a browser (``token=None``: a placeholder)."""
    if host in ("", "0.0.0.0", "::"):  # listening everywhere: this machine answers on loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    query = quote(token, safe="") if token is not None else "<DBCTX_MONITOR_AUTH>"
    return f"http://{host}:{port}/?token={query}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Monkey-patching has to happen before anything imports socket, threading or the driver.
    if args.async_mode == "eventlet":
        # one line instead of eventlet's nine-line warning: the user asked for it
        print(
            "eventlet is deprecated upstream; Flask-SocketIO advises the default "
            "(threading) or --async-mode gevent",
            flush=True,
        )
        warnings.filterwarnings("ignore", message=r"(?s).*Eventlet is deprecated")
        import eventlet

        eventlet.monkey_patch()
    elif args.async_mode == "gevent":
        from gevent import monkey

        monkey.patch_all()
        try:
            from psycogreen.gevent import patch_psycopg
        except ImportError:
            pass
        else:
            patch_psycopg()

    from .app import create_app, run

    token, generated = monitor_token()
    app, socketio = create_app(
        database_url=args.database_url,
        async_mode=args.async_mode,
        message_queue=args.message_queue,
        monitor_auth=token,
        config={"DBCTX_DRAIN_TIMEOUT": drain_timeout()},
        allowed_hosts=args.allowed_hosts,
        trusted_proxies=args.trusted_proxies,
    )
    app.extensions["dbctx"].drain_on_signals()  # Ctrl-C and SIGTERM: drain, then exit
    print(
        f"socketio_dbctx sample app ({args.async_mode}) on "
        f"{app.config['SQLALCHEMY_DATABASE_URI'].split('://', 1)[0]}",
        flush=True,
    )
    if generated:
        print("monitor token generated (set DBCTX_MONITOR_AUTH to choose one)", flush=True)
    print(f"allowed hosts: {', '.join(args.allowed_hosts)}", flush=True)
    print(f"dashboard: {dashboard_url(args.host, args.port, token)}", flush=True)
    run(app, socketio, host=args.host, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
