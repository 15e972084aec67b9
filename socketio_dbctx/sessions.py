"""Where sessions come from: Flask-SQLAlchemy, or a plain SQLAlchemy session factory.

A source hands out one fresh session per scope and takes it back at the end of the
scope; it also names the engines whose pools the monitor reports on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Union

from flask import Flask, current_app, has_app_context
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, scoped_session, sessionmaker

from .errors import ContextSetupError
from .transactions import follow_commits, follow_transactions

if TYPE_CHECKING:
    from flask_sqlalchemy import SQLAlchemy

__all__ = ["FlaskSQLAlchemySource", "SessionFactorySource", "SessionSource", "make_source"]


SessionFactory = Union["sessionmaker[Any]", "scoped_session[Any]"]

_NO_DB = (
    "socketio_dbctx has no database to work with: call DBContext(app, socketio, db) "
    "with your Flask-SQLAlchemy instance (or session_factory=a sessionmaker), "
    "or initialise Flask-SQLAlchemy on the app (db.init_app(app)) before the first event"
)


class SessionSource:
    """Interface of a session source.

    Sessions are created lazily: a scope whose code never touches the database costs
    no Session at all. ``open``/``close`` bracket a scope; ``get`` returns the scope's
    session, creating it on first use; ``active`` returns it only if it exists.
    """

    def open(self) -> Any:
        """Prepare a scope (inside its fresh app context); returns a token for ``close``."""
        return None

    def get(self, token: Any) -> Session:
        """The scope's session, created on first use."""
        raise NotImplementedError

    def active(self, token: Any) -> Session | None:
        """The scope's session if it was created, else None."""
        raise NotImplementedError

    def close(self, token: Any, used: bool) -> None:
        """Close the scope's session, if any, and restore whatever was there before.

        :param used: a transaction of the scope's session began. A session that never
            began one holds no connection and no objects (``add()`` begins one).
        """
        raise NotImplementedError

    def engines(self, app: Flask) -> dict[str, Engine]:
        """The engines of ``app`` by bind name, ``"default"`` first."""
        raise NotImplementedError

    def follow_transactions(self) -> None:
        """Follow the connections and writes of this source's transactions (see
        :func:`~socketio_dbctx.transactions.follow_transactions`); inside an app context."""
        raise NotImplementedError


class FlaskSQLAlchemySource(SessionSource):
    """Sessions from Flask-SQLAlchemy's ``db.session``, which is scoped to the app context.

    A fresh app context therefore means a fresh session; ``db.session`` inside the
    handler is the scope's session.

    :param db: the ``SQLAlchemy`` instance; ``None`` looks up
        ``app.extensions["sqlalchemy"]`` when first needed.
    """

    def __init__(self, db: SQLAlchemy | None) -> None:
        self._db = db
        if db is not None:
            follow_commits(db.session)

    def _resolve(self, app: Flask) -> SQLAlchemy:
        db: SQLAlchemy | None = self._db or app.extensions.get("sqlalchemy")
        if db is None:
            raise ContextSetupError(_NO_DB)
        if db is not self._db:  # found on the app: follow it once
            follow_commits(db.session)
            self._db = db
        return db

    def open(self) -> Any:
        return (self._db or self._resolve(current_app)).session

    def get(self, token: Any) -> Session:
        return token()  # type: ignore[no-any-return]

    def active(self, token: Any) -> Session | None:
        return token() if token.registry.has() else None

    def close(self, token: Any, used: bool) -> None:
        # Closed and removed here, so its connection is back before the held emits and
        # the ack (Flask-SQLAlchemy's teardown then finds nothing to remove; leaving the
        # session to it costs a second close(), more than that teardown's caught
        # KeyError). An unused session holds nothing: left to the teardown.
        if used:
            token.remove()

    def follow_transactions(self) -> None:
        follow_transactions(self._resolve(current_app).session)

    def engines(self, app: Flask) -> dict[str, Engine]:
        db = self._resolve(app)
        if has_app_context() and current_app._get_current_object() is app:  # type: ignore[attr-defined]
            engines = db.engines
        else:
            with app.app_context():
                engines = db.engines
        return {("default" if key is None else key): engine for key, engine in engines.items()}


class FactoryToken:
    """What a ``sessionmaker`` scope holds: its session, once made, and what a
    ``scoped_session``'s registry held before the scope."""

    __slots__ = ("previous", "session")

    def __init__(self, previous: Session | None = None) -> None:
        self.session: Session | None = None
        self.previous = previous


class SessionFactorySource(SessionSource):
    """Sessions from a plain SQLAlchemy ``sessionmaker`` or ``scoped_session``.

    For a ``scoped_session`` the registry is emptied for the duration of the scope, so
    ``Session()`` and ``Session.add(...)`` in the handler create and reach the scope's
    own session; whatever the registry held before comes back afterwards.

    :param factory: a ``sessionmaker`` or a ``scoped_session``.
    """

    def __init__(self, factory: SessionFactory) -> None:
        if not isinstance(factory, (sessionmaker, scoped_session)):
            raise ContextSetupError(
                f"session_factory must be a sqlalchemy.orm.sessionmaker or scoped_session, "
                f"got {type(factory).__name__}"
            )
        self._factory = factory
        self._scoped = isinstance(factory, scoped_session)
        follow_commits(factory)

    def open(self) -> Any:
        if self._scoped:
            registry = self._factory.registry  # type: ignore[union-attr]
            own = FactoryToken(registry() if registry.has() else None)
            registry.clear()
            return own
        return FactoryToken()

    def get(self, token: Any) -> Session:
        if self._scoped:
            return self._factory()  # type: ignore[no-any-return]
        if token.session is None:
            token.session = self._factory()
        return token.session  # type: ignore[no-any-return]

    def active(self, token: Any) -> Session | None:
        if self._scoped:
            registry = self._factory.registry  # type: ignore[union-attr]
            return registry() if registry.has() else None
        return token.session  # type: ignore[no-any-return]

    def close(self, token: Any, used: bool) -> None:
        session = self.active(token)
        try:
            if session is not None:
                session.close()
        finally:
            if self._scoped:
                registry = self._factory.registry  # type: ignore[union-attr]
                if token.previous is None:
                    registry.clear()
                else:
                    registry.set(token.previous)

    def follow_transactions(self) -> None:
        follow_transactions(self._factory)

    def engines(self, app: Flask) -> dict[str, Engine]:
        maker = (
            self._factory.session_factory
            if isinstance(self._factory, scoped_session)
            else self._factory
        )
        found: dict[str, Engine] = {}
        bind = maker.kw.get("bind")
        if bind is not None:
            found["default"] = _engine_of(bind)
        for key, value in (maker.kw.get("binds") or {}).items():
            name = getattr(key, "__name__", None) or getattr(key, "name", None) or str(key)
            engine = _engine_of(value)
            if engine not in found.values():
                found.setdefault("default" if not found else name, engine)
        return found


def _engine_of(bind: Any) -> Engine:
    return bind if isinstance(bind, Engine) else bind.engine


def make_source(db: SQLAlchemy | None, session_factory: SessionFactory | None) -> SessionSource:
    """Pick the session source for the given arguments.

    :raises ContextSetupError: when both are given.
    """
    if db is not None and session_factory is not None:
        raise ContextSetupError("give DBContext either db= or session_factory=, not both")
    if session_factory is not None:
        return SessionFactorySource(session_factory)
    return FlaskSQLAlchemySource(db)
