"""A chat server on ``DBContextNamespace``: every event in its own app context and
session, committed before the ack, rolled back and answered on error.

Needs: ``pip install socketio-dbctx simple-websocket`` (SQLite, nothing else); for
PostgreSQL also the ``postgres`` extra and ``DATABASE_URL=postgresql+psycopg2://...``.

Run: ``python examples/chat.py`` (``PORT``, default 5000; ``DBCTX_MONITOR_AUTH``
turns on the ``/monitor`` namespace). A client::

    import socketio
    client = socketio.Client()
    client.connect("http://127.0.0.1:5000", namespaces=["/chat"], auth={"name": "ada"})
    client.call("send", {"text": "hello"}, namespace="/chat")   # {"ok": True, "id": 1}
"""

import logging
import os

from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace, InvalidRequestError

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("DATABASE_URL", "sqlite:///chat.db")
app.config["DBCTX_MONITOR_AUTH"] = os.environ.get("DBCTX_MONITOR_AUTH")  # None: no /monitor
db = SQLAlchemy(app)
socketio = SocketIO(app, async_mode="threading")  # WebSocket from simple-websocket
dbctx = DBContext(app, socketio, db)


class Message(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    text = db.Column(db.String(200), nullable=False)


class Chat(DBContextNamespace):
    def on_connect(self, auth):  # runs in its own scope too
        if not auth or not isinstance(auth.get("name"), str):
            raise ConnectionRefusedError("connect with auth={'name': ...}")

    def on_send(self, data):
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise InvalidRequestError("send takes {'text': str}")  # -> invalid_request ack
        message = Message(text=data["text"][:200])
        self.db_session.add(message)  # or db.session
        self.db_session.flush()  # the id, inside the event's transaction
        self.emit("message", {"id": message.id, "text": message.text})  # held until COMMIT
        return {"ok": True, "id": message.id}  # committed before this ack is sent

    def on_history(self, data=None):
        rows = db.session.scalars(db.select(Message).order_by(Message.id.desc()).limit(50))
        return {"messages": [{"id": m.id, "text": m.text} for m in rows]}


socketio.on_namespace(Chat("/chat"))


def audit(event, call_next):
    logging.getLogger("chat.audit").info("event %s", event)
    return call_next()


class Reports(DBContextNamespace):
    max_retries = 0
    commit_on_success = False
    extra_middleware = [audit]  # def audit(event, call_next): ... return call_next()

    def on_count(self):
        return {"messages": db.session.scalar(db.select(db.func.count(Message.id)))}


socketio.on_namespace(Reports("/reports"))

if __name__ == "__main__":
    with app.app_context():
        db.create_all()
    port = int(os.environ.get("PORT", "5000"))
    print(f"chat on http://127.0.0.1:{port}", flush=True)
    # Werkzeug's development server: fine for an example; see the sample app for more
    socketio.run(app, host="127.0.0.1", port=port, allow_unsafe_werkzeug=True)
