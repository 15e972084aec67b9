"""An existing decorator-based Flask-SocketIO app, adopted with one line.

The handlers below are plain ``@socketio.on`` functions that use ``db.session``;
``DBCTX_WRAP_ALL_HANDLERS`` runs each of them in its own app context and session,
commits before the ack, and answers a failure with an error ack instead of silence.
New handlers can use ``@dbctx.on`` (the same arguments as ``@socketio.on``).

Needs: ``pip install socketio-dbctx simple-websocket``.

Run: ``python examples/adopt.py`` (``PORT``, default 5000; ``DATABASE_URL``).
"""

import os

from flask import Flask
from flask_socketio import SocketIO, emit
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext

app = Flask(__name__)
app.config["SQLALCHEMY_DATABASE_URI"] = os.environ.get("DATABASE_URL", "sqlite:///adopt.db")
db = SQLAlchemy(app)
socketio = SocketIO(app, async_mode="threading")


class Note(db.Model):
    id = db.Column(db.Integer, primary_key=True)
    text = db.Column(db.String(200), nullable=False)


# -- the existing app, unchanged -------------------------------------------------------


@socketio.on("add", namespace="/notes")
def add(data):
    db.session.add(Note(text=data["text"]))  # a missing key raises: error ack, rollback
    emit("added", data, broadcast=True)  # held until the COMMIT, dropped on rollback
    return {"ok": True}


@socketio.on("count", namespace="/notes")
def count():
    return db.session.query(Note).count()


# -- adoption --------------------------------------------------------------------------

app.config["DBCTX_WRAP_ALL_HANDLERS"] = True  # before DBContext(...): every @socketio.on
dbctx = DBContext(app, socketio, db)  # function and plain Namespace, unchanged


@dbctx.on("clear", namespace="/notes")  # the same arguments as @socketio.on
def clear():
    deleted = db.session.query(Note).delete()
    return {"ok": True, "deleted": deleted}


if __name__ == "__main__":
    with app.app_context():
        db.create_all()
    port = int(os.environ.get("PORT", "5000"))
    print(f"notes on http://127.0.0.1:{port}", flush=True)
    socketio.run(app, host="127.0.0.1", port=port, allow_unsafe_werkzeug=True)
