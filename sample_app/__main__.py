"""``python -m sample_app [--host H] [--port P] [--async-mode M] [--database-url URL]
[--message-queue URL]``."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys


def default_async_mode() -> str:
    """eventlet when installed, else threading (DESIGN section 9)."""
    return "eventlet" if importlib.util.find_spec("eventlet") else "threading"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sample_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument(
        "--async-mode", choices=("eventlet", "gevent", "threading"), default=default_async_mode()
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("DATABASE_URL"),
        help="SQLAlchemy URL (env DATABASE_URL); default: SQLite in the instance folder",
    )
    parser.add_argument(
        "--message-queue",
        default=os.environ.get("SOCKETIO_MESSAGE_QUEUE"),
        help="Socket.IO message queue URL for several workers (env SOCKETIO_MESSAGE_QUEUE)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # Monkey-patching has to happen before anything imports socket, threading or the driver.
    if args.async_mode == "eventlet":
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

    app, socketio = create_app(
        database_url=args.database_url,
        async_mode=args.async_mode,
        message_queue=args.message_queue,
    )
    run(app, socketio, host=args.host, port=args.port)


if __name__ == "__main__":
    sys.exit(main())
