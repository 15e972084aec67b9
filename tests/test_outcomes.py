"""Uncertain commits on real servers: a connection lost while COMMIT's answer was on
its way is resolved, never answered with a plain ``db_unavailable``.

Every test starts ``tests.servers.app --extra tests.servers.reliability`` (namespace
``/r``, see that module) and talks to it with real python-socketio clients; a second
client listens for the handlers' held ``written`` broadcasts, so a test can tell
whether an event's emits went out, and how often. The faults are real:

* PostgreSQL, through ``tests/tcp_proxy.py``: ``cut_next_commit()`` lets the COMMIT
  reach the server and drops its answer (committed; resolved through
  ``txid_status()``), ``cut_next_commit(after="refuse")`` also takes the database
  away right after (unresolvable: ``outcome_unknown``, and the row is stored all the
  same); a backend terminated just before its COMMIT is sent (aborted: retried).
* MariaDB, through the same proxy: a lost COMMIT answer is ``outcome_unknown`` for a
  plain handler, retried for an ``@idempotent`` one, and answered through the key for
  a handler with an idempotency key.

The helpers here are shared with ``tests/test_idempotency.py``.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import socketio
import sqlalchemy as sa
from conftest import ON_MARIADB, ServerProcess, schema_url, wait_for
from eventkit import (
    ClientFactory,
    ExtraModule,
    ServerFactory,
    assert_error_ack,
    direct_connection,
    engine_options,
    new_token,
    proxied,
    servers_stop_first,
)
from tcp_proxy import TcpProxy

pytestmark = pytest.mark.server

NS = "/r"
KEYED_NS = "/rk"
EXTRA = ["tests.servers.reliability"]
#: Retries come fast: the decisions, not the backoff, are under test.
CONFIG = {"DBCTX_RETRY_DELAY": 0.01, "DBCTX_RETRY_MAX_DELAY": 0.05}
#: Seconds any one ack may take (resolution retries for ~2.5 s).
ACK_TIMEOUT = 30.0
IDEMPOTENCY_TABLE = "socketio_dbctx_idempotency"


RELIABILITY = ExtraModule(NS, "/r/metrics", timeout=ACK_TIMEOUT, runs_by_namespace=True)
call = RELIABILITY.call
metrics = RELIABILITY.state
runs = RELIABILITY.runs
event_stats = RELIABILITY.event_stats


# -- helpers (shared with test_idempotency.py) -----------------------------------------


def written_ack(token: str, event: str = "write", run: int = 1) -> dict[str, Any]:
    """The success ack of a ``/r`` handler's run number ``run`` for ``token``."""
    return {"token": token, "event": event, "run": run}


def stored(server: ServerProcess, token: str) -> int:
    """``r_rows`` rows of ``token``, read on a fresh direct connection (committed only)."""
    with direct_connection(server) as conn:
        return int(
            conn.execute(
                sa.text("SELECT count(*) FROM r_rows WHERE token = :token"), {"token": token}
            ).scalar_one()
        )


def lost_commit_outcomes(server: ServerProcess, event: str, namespace: str = NS) -> list[str]:
    """The outcome of every lost COMMIT of ``event`` the server logged (WARNING
    ``... the connection was lost during COMMIT; outcome: committed|aborted|unknown``)."""
    pattern = re.compile(
        rf"{re.escape(namespace)}:{event} for sid \S+: the connection was lost during "
        r"COMMIT; outcome: (\w+)"
    )
    return pattern.findall(server.log())


def purge_expired_key_now(server: ServerProcess, client: socketio.Client, event: str) -> None:
    """Plant an expired key, send a keyed ``event`` (it starts the background purge,
    which then waits ``min(ttl, 60)`` s before the next), and wait until the purge has
    deleted (committed) the planted row: no purge COMMIT comes later."""
    engine = sa.create_engine(server.database_url, poolclass=sa.pool.NullPool)
    planted = new_token()
    try:
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    f"INSERT INTO {IDEMPOTENCY_TABLE} (namespace, event, {quoted_key(conn)}, "
                    "ack, expires_at) VALUES ('/planted', 'planted', :key, NULL, 0)"
                ),
                {"key": planted},
            )
        call(client, event, {"token": new_token(), "key": new_token()})

        def gone() -> bool:
            with engine.connect() as conn:
                return not conn.execute(
                    sa.text(
                        f"SELECT count(*) FROM {IDEMPOTENCY_TABLE} WHERE namespace = '/planted'"
                    )
                ).scalar_one()

        wait_for(gone, 10, "the purge to delete the planted expired key")
    finally:
        engine.dispose()


def quoted_key(conn: sa.Connection) -> str:
    """The column name ``key``, quoted for ``conn``'s database (a MySQL keyword)."""
    return str(conn.dialect.identifier_preparer.quote_identifier("key"))


class Listener:
    """A client that records every ``written`` broadcast of one namespace."""

    def __init__(self, client: socketio.Client, namespace: str = NS) -> None:
        self.client = client
        self.namespace = namespace
        self._lock = threading.Lock()
        self._heard: list[dict[str, Any]] = []
        client.on("written", self._on_written, namespace=namespace)

    def _on_written(self, data: dict[str, Any]) -> None:
        with self._lock:
            self._heard.append(data)

    def count(self, token: str) -> int:
        with self._lock:
            return sum(1 for item in self._heard if item.get("token") == token)

    def settle(self, sender: socketio.Client) -> None:
        """Send a plain ``write`` and wait until its broadcast arrives: every broadcast
        of an event acked before it has arrived by then (one connection, in order)."""
        token = new_token()
        assert call(sender, "write", {"token": token}, namespace=self.namespace)["run"] == 1
        wait_for(lambda: self.count(token), 10, "the settling broadcast")


def start(server_factory: ServerFactory, async_mode: str, **config: Any) -> ServerProcess:
    return server_factory(async_mode, extra=EXTRA, config={**CONFIG, **config})


def start_proxied(
    server_factory: ServerFactory, async_mode: str, proxy: TcpProxy, database_url: str
) -> ServerProcess:
    """A reliability server whose database connections all go through ``proxy``
    (``server.database_url`` stays the direct URL, for checking rows)."""
    return start(
        server_factory,
        async_mode,
        SQLALCHEMY_DATABASE_URI=proxied(database_url, proxy),
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(connect_timeout=2),
    )


@pytest.fixture
def connect_client(connect_client: ClientFactory) -> Iterator[ClientFactory]:
    """Clients on ``/r``; the servers stop before the clients disconnect."""
    yield from servers_stop_first(connect_client, NS)


# -- PostgreSQL: resolved through txid_status() ----------------------------------------


def test_lost_commit_reply_resolved_committed(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    pg_proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
) -> None:
    """The COMMIT is applied and its answer lost: the library asks ``txid_status()``
    on a fresh connection, hears ``committed``, and the plain handler's event succeeds:
    its normal ack once, one run, one row, its held broadcast heard exactly once."""
    server = start_proxied(
        server_factory, async_mode, pg_proxy, schema_url(postgres_url, pg_schema)
    )
    client, listener = connect_client(server), Listener(connect_client(server))
    token = new_token()

    pg_proxy.cut_next_commit()
    ack = call(client, "write", {"token": token})

    assert pg_proxy.commits_cut == 1
    assert ack == written_ack(token), ack
    assert lost_commit_outcomes(server, "write") == ["committed"]
    assert runs(server, "write", token) == 1
    stats = event_stats(server, "write")
    assert stats["retries"] == 0 and stats["errors"] == 0, stats
    listener.settle(client)
    assert listener.count(token) == 1
    assert stored(server, token) == 1
    server.wait_checked_out(0)


def test_commit_of_a_killed_backend_resolved_aborted_and_retried(
    async_mode: str, server_factory: ServerFactory, connect_client: ClientFactory
) -> None:
    """The backend is terminated (from a second connection, waited until it exited)
    just before the COMMIT is sent: the transaction was aborted, ``txid_status()``
    says so, and the plain handler runs again: stored once, heard once (the second
    run's broadcast only)."""
    server = start(server_factory, async_mode)
    client, listener = connect_client(server), Listener(connect_client(server))
    token = new_token()

    ack = call(client, "write", {"token": token, "kill_commit": True})

    assert ack == written_ack(token, run=2), ack
    assert lost_commit_outcomes(server, "write") == ["aborted"]
    assert runs(server, "write", token) == 2
    assert event_stats(server, "write")["retries"] == 1
    listener.settle(client)
    assert listener.count(token) == 1
    assert stored(server, token) == 1
    server.wait_checked_out(0)


def test_lost_commit_reply_with_the_database_gone_is_outcome_unknown(
    async_mode: str,
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    pg_proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
) -> None:
    """The COMMIT is applied, its answer lost, and the database is unreachable right
    after: nobody can find out, so the ack is ``outcome_unknown`` (not retryable), the
    handler ran once and nothing was broadcast; yet the row is there once the database
    is back."""
    server = start_proxied(
        server_factory, async_mode, pg_proxy, schema_url(postgres_url, pg_schema)
    )
    client, listener = connect_client(server), Listener(connect_client(server))
    token = new_token()

    pg_proxy.cut_next_commit(after="refuse")
    ack = call(client, "write", {"token": token})

    assert pg_proxy.commits_cut == 1 and pg_proxy.state == "refusing"
    assert_error_ack(ack, "outcome_unknown", retryable=False)
    assert lost_commit_outcomes(server, "write") == ["unknown"]
    assert runs(server, "write", token) == 1
    assert event_stats(server, "write")["retries"] == 0
    server.wait_checked_out(0)
    pg_proxy.restore()
    listener.settle(client)
    assert listener.count(token) == 0
    assert stored(server, token) == 1  # it did commit
    server.wait_checked_out(0)


def test_lost_commit_reply_unresolved_keyed_then_the_client_retries(
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    pg_proxy: TcpProxy,
    postgres_url: str,
    pg_schema: str,
) -> None:
    """A keyed handler's COMMIT is applied, its answer lost, and the database is gone
    right after: the event may run again (it has a key), but its re-runs cannot reach
    the database, so nothing settled the first COMMIT: acked ``outcome_unknown``
    (never a ``db_unavailable`` that reads as "not stored"). Once the database is
    back, the client's retry with the same key gets the first run's ack from the
    store: the handler ran once, the row is stored once."""
    server = start_proxied(
        server_factory, "threading", pg_proxy, schema_url(postgres_url, pg_schema)
    )
    client, listener = connect_client(server), Listener(connect_client(server))
    purge_expired_key_now(server, client, "keyed_write")
    token, key = new_token(), new_token()

    pg_proxy.cut_next_commit(after="refuse")
    ack = call(client, "keyed_write", {"token": token, "key": key})

    assert pg_proxy.commits_cut == 1
    assert_error_ack(ack, "outcome_unknown", retryable=False)
    assert lost_commit_outcomes(server, "keyed_write") == ["unknown"]
    assert runs(server, "keyed_write", token) == 1
    server.wait_checked_out(0)
    pg_proxy.restore()
    retry = call(client, "keyed_write", {"token": new_token(), "key": key})
    assert retry == written_ack(token, "keyed_write")
    assert runs(server, "keyed_write", token) == 1
    listener.settle(client)
    assert listener.count(token) == 0  # a repeat answered from the store sends nothing
    assert stored(server, token) == 1
    server.wait_checked_out(0)


# -- MariaDB: no transaction status to ask ---------------------------------------------


@ON_MARIADB
@pytest.mark.parametrize(
    ("event", "async_mode"),
    [("write", "threading"), ("idem_write", "eventlet"), ("keyed_write", "gevent")],
    ids=["plain-outcome_unknown", "idempotent-retried", "keyed-resolved"],
)
def test_lost_commit_reply_on_mariadb(
    server_factory: ServerFactory,
    connect_client: ClientFactory,
    mysql_proxy: TcpProxy,
    mariadb_url: str,
    event: str,
    async_mode: str,
) -> None:
    """PyMySQL's COMMIT reaches MariaDB and its answer is lost. A plain handler is
    acked ``outcome_unknown`` (ran once, nothing broadcast, the row stored); an
    ``@idempotent`` one runs again and sees the first run's row; a keyed one is
    re-run, finds its committed key and answers with the stored ack (the handler ran
    once, its broadcast heard once), and a repeat of the key gets that ack too."""
    server = start_proxied(server_factory, async_mode, mysql_proxy, mariadb_url)
    client, listener = connect_client(server), Listener(connect_client(server))
    if event == "keyed_write":  # the purge's own COMMIT must not be the one cut
        purge_expired_key_now(server, client, event)
    token = new_token()
    data = {"token": token, "key": f"k-{token}"} if event == "keyed_write" else {"token": token}

    mysql_proxy.cut_next_commit()
    ack = call(client, event, data)

    assert mysql_proxy.commits_cut == 1
    assert lost_commit_outcomes(server, event) == ["unknown"]
    stats = event_stats(server, event)
    if event == "write":
        assert_error_ack(ack, "outcome_unknown", retryable=False)
        assert runs(server, event, token) == 1
        assert stats["retries"] == 0, stats
        heard = 0
    elif event == "idem_write":
        assert ack == {**written_ack(token, event, run=2), "existed": True}, ack
        assert runs(server, event, token) == 2
        assert stats["retries"] == 1, stats
        heard = 1
    else:
        assert ack == written_ack(token, event), ack
        assert runs(server, event, token) == 1
        heard = 1
        other = connect_client(server)
        assert call(other, event, {**data, "token": new_token()}) == ack
        assert runs(server, event, token) == 1
    listener.settle(client)
    assert listener.count(token) == heard
    assert stored(server, token) == 1
    server.wait_checked_out(0)
