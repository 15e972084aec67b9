"""Background work with a fresh scope per run: ``dbctx.start_background_task`` and
``dbctx.start_periodic_task``. Nothing holds a pooled connection between runs.

A background task seeds the price table once; a periodic task moves the prices
every second and broadcasts them to ``/prices`` after each run commits. ``/status``
shows ``dbctx.session_scope()`` and the status calls.

Needs: ``pip install socketio-dbctx simple-websocket``.

Run: ``python examples/background.py`` (``PORT``, default 5000; ``DATABASE_URL``;
``TICK``, seconds between runs, default 1).
"""

import os
import random

from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("DATABASE_URL", "sqlite:///prices.db")
db = SQLAlchemy(app)
socketio = SocketIO(app, async_mode="threading")
dbctx = DBContext(app, socketio, db)


class Price(db.Model):
    symbol = db.Column(db.String(12), primary_key=True)
    cents = db.Column(db.Integer, nullable=False)


class Prices(DBContextNamespace):
    def on_snapshot(self):
        return {p.symbol: p.cents for p in db.session.scalars(db.select(Price))}


socketio.on_namespace(Prices("/prices"))


def seed(symbols):
    for symbol in symbols:
        if db.session.get(Price, symbol) is None:
            db.session.add(Price(symbol=symbol, cents=10_000))


def poll_prices():
    moved = {}
    for price in db.session.scalars(db.select(Price)):
        price.cents = max(1, price.cents + random.randint(-50, 50))
        moved[price.symbol] = price.cents
    socketio.emit("prices", moved, namespace="/prices")  # held until this run commits


@app.get("/status")
def status():
    with dbctx.session_scope() as session:  # fresh context + session, commit/rollback/remove
        symbols = session.scalar(db.select(db.func.count(Price.symbol)))
    return {
        "symbols": symbols,
        "pool": dbctx.pool_status(),  # {"bind": "default", "checked_out": 0, ...}
        "health": dbctx.health_check(),  # {"healthy": True, "latency_ms": 0.8, ...}
        "metrics": dbctx.metrics(),  # {"/prices:snapshot": {"count": 10, "errors": 0, ...}}
    }


if __name__ == "__main__":
    with app.app_context():
        db.create_all()
    dbctx.start_background_task(seed, ["BTC", "ETH"])  # func runs inside its own scope
    task = dbctx.start_periodic_task(poll_prices, float(os.environ.get("TICK", "1.0")))
    port = int(os.environ.get("PORT", "5000"))
    print(f"prices on http://127.0.0.1:{port}", flush=True)
    try:
        socketio.run(app, host="127.0.0.1", port=port, allow_unsafe_werkzeug=True)
    finally:
        task.stop()
