"""gunicorn settings for a Flask-SocketIO app that drains on SIGTERM.

    gunicorn -c examples/gunicorn/gunicorn.conf.py wsgi:app

See docs/operations.rst ("gunicorn"). Stop it gracefully with SIGTERM to the master only
(systemd: ``KillMode=mixed``): the master sends SIGTERM to each worker once, and the
worker drains (``dbctx.drain_on_signals()`` in ``wsgi.py``) before it exits.
"""

import os

#: the app's DBCTX_DRAIN_TIMEOUT (keep the two equal)
drain_timeout = float(os.environ.get("DBCTX_DRAIN_TIMEOUT", "30"))

bind = os.environ.get("GUNICORN_BIND", "127.0.0.1:8000")
# "gevent" (Flask-SocketIO's gevent mode) or "gthread" (its threading mode). gunicorn
# removed its eventlet worker in gunicorn 26.
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gevent")
# Flask-SocketIO: one worker per port (several need sticky sessions and a message queue)
workers = 1
# gthread: each WebSocket connection holds a thread for its lifetime
threads = int(os.environ.get("GUNICORN_THREADS", "100"))
# the master kills a worker still running this long after SIGTERM: let it drain first
graceful_timeout = int(drain_timeout) + 10
# each worker imports the app itself, after gunicorn installed its signal handlers, so
# that drain_on_signals() replaces them: never preload
preload_app = False
# the directory of wsgi.py, so "wsgi:app" imports from anywhere
chdir = os.path.dirname(os.path.abspath(__file__))
