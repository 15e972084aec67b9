"""Idempotency keys: a repeat of a request gets the first run's ack, not a second run.

The key lives in one table, ``socketio_dbctx_idempotency`` (:func:`idempotency_table`),
one row per (namespace, event, key). A keyed event first *claims* its key in its own
transaction (an insert that skips an existing row); it then runs the handler and
stores the ack in the same row, so the row commits with the handler's work or not at
all. A second run of the key meets the row: committed, it answers with the stored ack
without running the handler; still uncommitted in a concurrent transaction, the
insert waits for that one to end (PostgreSQL and InnoDB lock the key; SQLite's lock
is the whole database, answered ``database is locked`` and retried). Keys expire
after ``DBCTX_IDEMPOTENCY_TTL`` seconds; expired rows are deleted in the background.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Callable

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import SingletonThreadPool, StaticPool

from .errors import BusyError, InvalidRequestError

__all__ = [
    "MAX_KEY_LENGTH",
    "TABLE_NAME",
    "KeyStore",
    "Stored",
    "create_tables",
    "idempotency_table",
    "read_key",
]

logger = logging.getLogger(__name__)

TABLE_NAME = "socketio_dbctx_idempotency"
MAX_KEY_LENGTH = 255
#: Expired keys are purged at most this often (and at least once per TTL).
PURGE_INTERVAL = 60.0

_BAD_KEY = "the idempotency key must be a non-empty string of at most 255 characters or an integer"


def idempotency_table(metadata: sa.MetaData) -> sa.Table:
    """The ``socketio_dbctx_idempotency`` table in ``metadata`` (for Alembic: add it to
    your models' metadata, or create it with :meth:`DBContext.create_tables
    <socketio_dbctx.DBContext.create_tables>`)."""
    existing = metadata.tables.get(TABLE_NAME)
    if existing is not None:
        return existing
    return sa.Table(
        TABLE_NAME,
        metadata,
        sa.Column("namespace", sa.String(255), primary_key=True),
        sa.Column("event", sa.String(255), primary_key=True),
        sa.Column("key", sa.String(MAX_KEY_LENGTH), primary_key=True),
        # the first run's ack as JSON; committed only together with the handler's work
        sa.Column("ack", sa.Text, nullable=True),
        # seconds since the epoch
        sa.Column("expires_at", sa.Double, nullable=False, index=True),
    )


_TABLE = idempotency_table(sa.MetaData())


def create_tables(engine: Engine) -> None:
    """Create the idempotency table on ``engine`` when it is missing."""
    try:
        _TABLE.create(engine, checkfirst=True)
    except sa.exc.DatabaseError:
        # another worker created it between the check and the CREATE
        if not sa.inspect(engine).has_table(TABLE_NAME):
            raise


def read_key(key_func: Callable[..., Any], args: tuple[Any, ...]) -> str | None:
    """The client's key for a payload: ``key_func(*args)``, checked.

    :returns: the key as text (an int key is its decimal text), or None: no key.
    :raises InvalidRequestError: for a key of the wrong kind, or a payload the key
        function cannot read.
    """
    try:
        value = key_func(*args)
    except Exception as exc:
        raise InvalidRequestError(f"could not read the idempotency key: {_BAD_KEY}") from exc
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidRequestError(f"{_BAD_KEY}, got {type(value).__name__}")
    text = value if isinstance(value, str) else str(value)
    if not text or len(text) > MAX_KEY_LENGTH:
        raise InvalidRequestError(_BAD_KEY)
    return text


class Stored:
    """The ack a previous run of a key committed."""

    __slots__ = ("ack",)

    def __init__(self, ack: Any) -> None:
        self.ack = ack


def _insert_skipping(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        return insert(_TABLE).on_conflict_do_nothing()
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(_TABLE).on_conflict_do_nothing()
    if dialect in ("mysql", "mariadb"):
        return _TABLE.insert().prefix_with("IGNORE")
    return None


class KeyStore:
    """Claims, answers and stores the keys of one app.

    :param ttl: seconds a key is remembered.
    :param spawn: starts a background function (the purge).
    """

    def __init__(self, ttl: float, spawn: Callable[[Callable[[], Any]], Any]) -> None:
        self.ttl = ttl
        self._spawn = spawn
        self._next_purge = 0.0
        self._lock = threading.Lock()

    def claim(self, session: Session, namespace: str, event: str, key: str) -> Stored | None:
        """Claim ``key`` in ``session``'s transaction (through the session, so the claim
        counts as a write of the scope): None when this run owns it (run
        the handler, then :meth:`store`), else the stored ack of an earlier run.

        :raises BusyError: when the key stays contended.
        """
        pk = {"namespace": namespace, "event": event, "key": key}
        where = _where(namespace, event, key)
        connection = session.connection()
        dialect = connection.dialect.name
        self._purge_soon(session, connection.engine)
        for _ in range(3):
            now = time.time()
            insert = _insert_skipping(dialect)
            values = {**pk, "ack": None, "expires_at": now + self.ttl}
            if insert is not None:
                if session.execute(insert.values(**values)).rowcount == 1:  # type: ignore[attr-defined]
                    return None
            else:  # no insert-or-skip: a savepoint catches the duplicate
                try:
                    with session.begin_nested():
                        session.execute(_TABLE.insert().values(**values))
                    return None
                except sa.exc.IntegrityError:
                    pass
            query = sa.select(_TABLE.c.ack, _TABLE.c.expires_at).where(where)
            if dialect != "sqlite":
                query = query.with_for_update(read=True)  # the latest committed row
            row = session.execute(query).first()
            if row is None:
                continue  # purged in between: claim again
            if row.expires_at <= now:
                expired = sa.and_(where, _TABLE.c.expires_at <= now)
                update = _TABLE.update().where(expired).values(ack=None, expires_at=now + self.ttl)
                if session.execute(update).rowcount == 1:  # type: ignore[attr-defined]
                    return None
                continue
            if row.ack is not None:
                return Stored(json.loads(row.ack))
        raise BusyError("the idempotency key is in use by another request", retry_after=0.5)

    def store(
        self,
        session: Session,
        namespace: str,
        event: str,
        key: str,
        ack: Any,
        *,
        separately: bool = False,
    ) -> None:
        """Store the ack of the run that claimed ``key``, in its transaction.

        :param separately: the claim was already committed (by a handler that commits
            itself): store the ack in a transaction of its own.
        """
        try:
            text = json.dumps(ack, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"the ack of a handler with an idempotency key must be JSON-serialisable "
                f"({namespace} {event}): {exc}"
            ) from exc
        update = _TABLE.update().where(_where(namespace, event, key)).values(ack=text)
        if separately:
            with _engine(session).begin() as connection:
                connection.execute(update)
        else:
            session.execute(update)

    def release(self, session: Session, namespace: str, event: str, key: str) -> None:
        """Forget a claim that a failed run had already committed (in a transaction of
        its own), so the key can run again."""
        try:
            with _engine(session).begin() as connection:
                connection.execute(_TABLE.delete().where(_where(namespace, event, key)))
        except Exception:  # the event's own failure is what matters; the key expires
            logger.warning("could not release idempotency key %r of %s", key, event, exc_info=True)

    def _purge_soon(self, session: Session, engine: Engine) -> None:
        now = time.monotonic()
        if now < self._next_purge:
            return
        with self._lock:
            if now < self._next_purge:
                return
            self._next_purge = now + min(self.ttl, PURGE_INTERVAL)
        if isinstance(engine.pool, (StaticPool, SingletonThreadPool)):
            # one connection for everybody (in-memory SQLite): a purge from another
            # thread would run inside this event's transaction; purge in it instead
            session.execute(_TABLE.delete().where(_TABLE.c.expires_at <= time.time()))
        else:
            self._spawn(lambda: purge(engine))


def _engine(session: Session) -> Engine:
    bind = session.get_bind()
    return bind if isinstance(bind, Engine) else bind.engine


def _where(namespace: str, event: str, key: str) -> Any:
    return sa.and_(_TABLE.c.namespace == namespace, _TABLE.c.event == event, _TABLE.c.key == key)


def purge(engine: Engine) -> int:
    """Delete the expired keys; returns how many."""
    try:
        with engine.begin() as connection:
            deleted = connection.execute(
                _TABLE.delete().where(_TABLE.c.expires_at <= time.time())
            ).rowcount
    except Exception:
        logger.warning("could not purge expired idempotency keys", exc_info=True)
        return 0
    if deleted:
        logger.info("purged %d expired idempotency key(s)", deleted)
    return int(deleted)
