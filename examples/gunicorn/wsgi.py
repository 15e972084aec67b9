"""The sample app under gunicorn, draining on SIGTERM.

    cd examples/gunicorn && gunicorn -c gunicorn.conf.py wsgi:app

Environment: ``DATABASE_URL``, ``DBCTX_MONITOR_AUTH``, ``DBCTX_DRAIN_TIMEOUT`` (as
``python -m sample_app``). The async mode follows the worker class: gevent's workers
patch the standard library before they import this module.
"""

from __future__ import annotations

import os

from sample_app.app import create_app


def worker_async_mode() -> str:
    """``gevent`` under ``-k gevent`` (gunicorn patched the standard library before it
    imported this module), else ``threading`` (``-k gthread``)."""
    try:
        from gevent import monkey
    except ImportError:
        return "threading"
    if not monkey.is_module_patched("socket"):
        return "threading"
    try:
        from psycogreen.gevent import patch_psycopg
    except ImportError:
        pass
    else:
        patch_psycopg()  # psycopg2 must yield to other greenlets too
    return "gevent"


async_mode = worker_async_mode()
app, socketio = create_app(
    database_url=os.environ.get("DATABASE_URL") or None,
    async_mode=async_mode,
    monitor_auth=os.environ.get("DBCTX_MONITOR_AUTH") or None,
    config={"DBCTX_DRAIN_TIMEOUT": float(os.environ.get("DBCTX_DRAIN_TIMEOUT", "30"))},
)
# At import: gunicorn installed the worker's signal handlers (init_signals) before it
# imported this module (load_wsgi), so these replace them; after the drain the signal
# goes back to gunicorn's own handler and the worker exits as usual.
app.extensions["dbctx"].drain_on_signals()
