"""Watch a server's pool from Python: a python-socketio client of ``/monitor``.

Prints one line per ``pool_status`` push (every ``DBCTX_MONITOR_INTERVAL`` seconds)
and, with ``--once``, just the answer to ``get_status``.

Needs: ``pip install "python-socketio[client]"`` (websocket-client comes with it).

Run against any app with ``DBCTX_MONITOR_AUTH`` set, e.g. ``examples/chat.py``::

    DBCTX_MONITOR_AUTH=s3cret python examples/chat.py &
    python examples/monitor_client.py http://127.0.0.1:5000 s3cret --count 3
"""

import argparse

import socketio


def line(status):
    pool = status["pools"]["default"]
    return (
        f"{status['worker']}: {status['status']}, {pool['checked_out']}/{pool['capacity']} "
        f"in use, {pool['waiting']} waiting, {len(status['leaks'])} leaks"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("token")
    parser.add_argument("--count", type=int, default=0, help="stop after N pushes")
    parser.add_argument("--once", action="store_true", help="print get_status and stop")
    args = parser.parse_args()

    client = socketio.Client(reconnection=False)
    seen = []

    @client.on("pool_status", namespace="/monitor")
    def pool_status(status):
        if args.once:
            return
        print(line(status), flush=True)
        seen.append(status)
        if args.count and len(seen) >= args.count:
            client.disconnect()

    client.connect(args.url, namespaces=["/monitor"], auth={"token": args.token})
    if args.once:
        print(line(client.call("get_status", namespace="/monitor", timeout=10)), flush=True)
        client.disconnect()
    client.wait()


if __name__ == "__main__":
    main()
