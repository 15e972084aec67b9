"""The app factory: Flask, Flask-SQLAlchemy, Flask-SocketIO and socketio_dbctx."""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, jsonify, render_template
from flask_socketio import SocketIO

from socketio_dbctx import DBContext, DBContextNamespace, InvalidRequestError

from . import validation
from .models import Order, db


class Trading(DBContextNamespace):
    """``/trading``: every handler runs in its own app context and session."""

    def on_place_order(self, data: Any) -> dict[str, Any]:
        fields = validation.order_request(data)
        order = Order(**fields)
        self.session.add(order)
        self.session.flush()  # assigns the id; the commit follows before the ack
        payload = order.to_dict()
        self.emit("order_placed", payload)
        return {"ok": True, "order": payload}

    def on_list_orders(self, data: Any = None) -> dict[str, Any]:
        symbol, limit = validation.list_request(data)
        query = db.select(Order).order_by(Order.created_at.desc(), Order.id.desc()).limit(limit)
        if symbol is not None:
            query = query.where(Order.symbol == symbol)
        return {"orders": [o.to_dict() for o in self.session.scalars(query)]}

    def on_cancel_order(self, order_id: Any) -> dict[str, Any]:
        order = self.session.get(Order, validation.order_id(order_id))
        if order is None or order.status != "open":
            raise InvalidRequestError("no open order with that id")
        order.status = "cancelled"
        return {"ok": True}


def create_app(
    database_url: str | None = None,
    async_mode: str = "threading",
    message_queue: str | None = None,
    config: dict[str, Any] | None = None,
) -> tuple[Flask, SocketIO]:
    """Build the app; ``database_url`` defaults to SQLite in the instance folder."""
    app = Flask(__name__)
    if database_url is None:
        os.makedirs(app.instance_path, exist_ok=True)
        database_url = "sqlite:///" + os.path.join(app.instance_path, "trading.db")
    app.config["SQLALCHEMY_DATABASE_URI"] = database_url
    app.config.update(config or {})
    db.init_app(app)
    socketio = SocketIO(app, async_mode=async_mode, message_queue=message_queue)
    DBContext(app, socketio, db)
    socketio.on_namespace(Trading("/trading"))

    @app.get("/")
    def index() -> str:
        return render_template("index.html")

    @app.get("/healthz")
    def healthz() -> Any:
        result = app.extensions["dbctx"].health_check()
        return jsonify(result), 200 if result["healthy"] else 503

    with app.app_context():
        db.create_all()
    return app, socketio


def run(app: Flask, socketio: SocketIO, host: str, port: int) -> None:
    """Serve until interrupted, printing where."""
    print(f"socketio_dbctx sample app: http://{host}:{port}/", flush=True)
    socketio.run(app, host=host, port=port, allow_unsafe_werkzeug=True, log_output=False)
