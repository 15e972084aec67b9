"""A small real-time trading desk that shows socketio_dbctx at work.

``python -m sample_app`` serves it (see ``__main__``); ``python -m sample_app.load``
trades against it with real Socket.IO clients.

* ``app``: the app factory, the ``/trading`` namespace, the HTTP routes and the web server.
* ``book``: price-time priority matching; a book's lock is held until the transaction ends.
* ``models``, ``validation``, ``money``: the tables, strict checks of what clients send, and
  exact decimal amounts on a tick.
* ``hosts``: the allow-list of hosts and origins (DNS rebinding), forwarded headers.
* ``static/``, ``templates/``: the dashboard page; ``static/vendor/`` holds the
  browser libraries from npm (``package.json`` at the repository root,
  ``npm ci && npm run vendor`` to update them).
* ``process``: runs the app as a child process, for tests and demos.

This package module stays import-light on purpose: ``__main__`` must monkey-patch for
eventlet or gevent before Flask, the database driver or socket modules are imported.
"""
