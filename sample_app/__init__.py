"""A small real-time trading desk that shows socketio_dbctx at work.

Run it with ``python -m sample_app``. This package module stays import-light on
purpose: ``__main__`` must monkey-patch for eventlet or gevent before Flask, the
database driver or socket modules are imported (see ``sample_app.app``).
"""
