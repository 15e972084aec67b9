"""Watch the pool from a browser: a page served by the app, on the ``/monitor``
namespace, with the socket.io client served by the app too (the copy the sample app
vendors in ``sample_app/static/vendor/``): no internet needed.

Needs: ``pip install socketio-dbctx simple-websocket``; run from a checkout of the
repository (for the vendored socket.io client).

Run: ``DBCTX_MONITOR_AUTH=s3cret python examples/monitor_page.py`` and open
``http://127.0.0.1:5000/?token=s3cret`` (``PORT``, default 5000).
"""

import os
from pathlib import Path

from flask import Flask, send_from_directory
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace

VENDOR = Path(__file__).resolve().parent.parent / "sample_app" / "static" / "vendor"

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("DATABASE_URL", "sqlite://")
app.config["DBCTX_MONITOR_AUTH"] = os.environ["DBCTX_MONITOR_AUTH"]  # the page's token
app.config["DBCTX_MONITOR_INTERVAL"] = 1.0
db = SQLAlchemy(app)
socketio = SocketIO(app, async_mode="threading")
dbctx = DBContext(app, socketio, db)


class Work(DBContextNamespace):
    def on_ping(self):  # something to watch: one short query per event
        return db.session.scalar(db.select(db.literal(1)))


socketio.on_namespace(Work("/work"))

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Pool monitor</title>
<style>body { font: 15px system-ui, sans-serif; margin: 2em; } dd { margin: 0 0 .5em; }
.refused { color: #a61b1b; }</style></head>
<body>
<h1>Pool monitor</h1>
<p id="state">connecting&hellip;</p>
<dl>
  <dt>Status</dt><dd id="status">&ndash;</dd>
  <dt>In use</dt><dd id="in-use">&ndash;</dd>
  <dt>Waiting</dt><dd id="waiting">&ndash;</dd>
  <dt>Leaks</dt><dd id="leaks">&ndash;</dd>
  <dt>Events handled</dt><dd id="events">&ndash;</dd>
</dl>
<script src="/vendor/socket.io-client/socket.io.min.js"></script>
<script>
  const token = new URLSearchParams(location.search).get("token");
  const monitor = io("/monitor", { auth: { token } });
  const show = (id, text) => { document.getElementById(id).textContent = text; };
  monitor.on("connect", () => show("state", "connected"));
  monitor.on("connect_error", (err) => {
    if (monitor.active) return;  // a network problem: socket.io retries by itself
    const state = document.getElementById("state");
    state.textContent = "refused: " + err.message;
    state.className = "refused";
  });
  monitor.on("pool_status", (status) => {
    const pool = status.pools["default"];
    const events = Object.values(status.events).reduce((n, e) => n + e.count, 0);
    show("status", status.status);
    show("in-use", pool.checked_out + " / " + pool.capacity);
    show("waiting", pool.waiting);
    show("leaks", status.leaks.length);
    show("events", events);
  });
</script>
</body></html>
"""


@app.get("/")
def index():
    return PAGE


@app.get("/vendor/<path:name>")
def vendor(name):
    return send_from_directory(VENDOR, name)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "5000"))
    print(f"monitor page: http://127.0.0.1:{port}/?token=...", flush=True)
    socketio.run(app, host="127.0.0.1", port=port, allow_unsafe_werkzeug=True)
