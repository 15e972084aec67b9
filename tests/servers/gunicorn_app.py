"""``tests.servers.app`` with ``--extra tests.servers.ops`` as a gunicorn app, as
``examples/gunicorn/wsgi.py`` builds the sample app: ``gunicorn_app:app``.

The server's command-line arguments come from ``OPS_SERVER_ARGS`` (a JSON list);
``--async-mode`` follows the worker class (gevent's workers patch before importing).
"""

from __future__ import annotations

import json
import os

from gevent import monkey

ASYNC_MODE = "gevent" if monkey.is_module_patched("socket") else "threading"
if ASYNC_MODE == "gevent":
    from psycogreen.gevent import patch_psycopg

    patch_psycopg()

from tests.servers.app import create_app, parse_args  # noqa: E402

args = parse_args(["--async-mode", ASYNC_MODE, *json.loads(os.environ["OPS_SERVER_ARGS"])])
app, socketio, _db, dbctx = create_app(args)  # OPS_SIGNALS=true: drain_on_signals()
