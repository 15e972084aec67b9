"""Shared fixtures.

Services: ``DBCTX_TEST_POSTGRES_URL`` / ``DBCTX_TEST_MYSQL_URL`` (MariaDB or MySQL) /
``DBCTX_TEST_REDIS_URL`` (defaults: the local servers). A test that needs an unreachable
service is skipped with the reason, unless ``DBCTX_REQUIRE_SERVICES=1`` (set by
``.ci/run``), where it fails instead.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
import socketio as socketio_client
import sqlalchemy as sa
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy
from server_launch import HTTP, server_command, stop_process, wait_ready
from tcp_proxy import TcpProxy

POSTGRES_URL = os.environ.get(
    "DBCTX_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
MYSQL_URL = os.environ.get("DBCTX_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test")
REDIS_URL = os.environ.get("DBCTX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("DBCTX_REQUIRE_SERVICES") == "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test that starts server processes carries the ``server`` marker, so
    ``-m "not server"`` leaves them all out whether or not its module says so."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if "server_factory" in fixtures:
            item.add_marker(pytest.mark.server)
        callspec = getattr(item, "callspec", None)
        params = callspec.params if callspec is not None else {}
        if "mariadb_url" in fixtures or "mariadb" in (
            params.get("database_url"),
            params.get("server_database"),
        ):
            item.add_marker(pytest.mark.mysql)


def _reachable(url: str, default_port: int) -> str | None:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or default_port
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as exc:
        return f"{host}:{port} unreachable ({exc})"


def require_service(name: str, url: str, default_port: int) -> str:
    """Return ``url`` when the service answers; skip (or fail in CI) when not."""
    problem = _reachable(url, default_port)
    if problem is None:
        return url
    message = f"{name} is not available at {problem}; set DBCTX_TEST_{name.upper()}_URL"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (DBCTX_REQUIRE_SERVICES=1: services are required)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return require_service("postgres", POSTGRES_URL, 5432)


@pytest.fixture(scope="session")
def mysql_url() -> str:
    """The MariaDB/MySQL server's URL (its ``test`` database); tests use
    :func:`mariadb_url`, a database of their own on it."""
    return require_service("mysql", MYSQL_URL, 3306)


@pytest.fixture(scope="session")
def redis_url() -> str:
    return require_service("redis", REDIS_URL, 6379)


#: Claims a Redis database for one test run of the cluster tests (also benchmarks/workers.py).
CLUSTER_LOCK_KEY = "socketio_dbctx_tests:cluster-lock"
CLUSTER_LOCK_SECONDS = 900


@pytest.fixture
def cluster_redis(redis_url: str) -> Iterator[str]:
    """A Redis URL on a database (1-15) no other cluster test uses right now.

    Cluster keys (``socketio_dbctx:worker:*``) are global per Redis database: every
    test of several workers claims one by a lock key, and finds it and leaves it
    without worker keys.
    """
    from socketio_dbctx.cluster import KEY_PREFIX  # here: only these tests need it

    parts = urlsplit(redis_url)
    owner = uuid.uuid4().hex
    for index in range(15, 0, -1):  # database 0 is everybody's default
        url = urlunsplit((parts.scheme, parts.netloc, f"/{index}", "", ""))
        client = redis.Redis.from_url(url)
        if client.set(CLUSTER_LOCK_KEY, owner, nx=True, ex=CLUSTER_LOCK_SECONDS):
            break
        client.close()
    else:
        pytest.fail("every Redis database 1-15 is locked by another cluster test run")

    def clear() -> None:
        stale = list(client.scan_iter(match=f"{KEY_PREFIX}worker:*"))
        if stale:
            client.delete(*stale)

    clear()  # keys a killed run left behind
    try:
        yield url
    finally:
        clear()
        if client.get(CLUSTER_LOCK_KEY) == owner.encode():
            client.delete(CLUSTER_LOCK_KEY)
        client.close()


@pytest.fixture
def pg_schema(postgres_url: str) -> Iterator[str]:
    """A throw-away PostgreSQL schema, so tests never see each other's tables."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        yield name
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        engine.dispose()


def schema_url(postgres_url: str, schema: str) -> str:
    """``postgres_url`` with its search_path set to ``schema``."""
    sep = "&" if "?" in postgres_url else "?"
    return f"{postgres_url}{sep}options=-csearch_path%3D{schema}"


def mysql_database_url(mysql_url: str, name: str) -> str:
    """``mysql_url`` pointing at database ``name``."""
    url = sa.engine.make_url(mysql_url).set(database=name)
    return url.render_as_string(hide_password=False)


def create_mysql_database(mysql_url: str) -> str:
    """Create a throw-away MariaDB/MySQL database; return its URL."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(mysql_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    finally:
        engine.dispose()
    return mysql_database_url(mysql_url, name)


def drop_mysql_database(url: str) -> None:
    """Drop the database of ``url`` (made by :func:`create_mysql_database`)."""
    parsed = sa.engine.make_url(url)
    engine = sa.create_engine(parsed.set(database=None), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{parsed.database}`")
    finally:
        engine.dispose()


@pytest.fixture
def mariadb_url(mysql_url: str) -> Iterator[str]:
    """A throw-away MariaDB/MySQL database (``t_<random>``), dropped at teardown."""
    url = create_mysql_database(mysql_url)
    try:
        yield url
    finally:
        drop_mysql_database(url)


#: The databases :func:`database_url` knows; ``ALL_DATABASES`` runs a test on each.
DATABASES = ("sqlite", "postgres", "mariadb")

#: Run a test (one using ``database_url`` or the fixtures built on it: ``app``, ``db``,
#: ``url``, ``Item``...) on SQLite, PostgreSQL and MariaDB alike.
ALL_DATABASES = pytest.mark.parametrize("database_url", DATABASES, indirect=True)
#: Start a test's servers (``server_factory``) on MariaDB, or on SQLite, not PostgreSQL.
ON_MARIADB = pytest.mark.parametrize("server_database", ["mariadb"], indirect=True)
ON_SQLITE = pytest.mark.parametrize("server_database", ["sqlite"], indirect=True)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """A database URL: a SQLite file, a fresh schema on PostgreSQL, or (with
    ``ALL_DATABASES`` or an indirect ``"mariadb"`` parameter) a fresh MariaDB database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/test.db"
    if request.param == "mariadb":
        return str(request.getfixturevalue("mariadb_url"))
    if request.param != "postgres":
        raise ValueError(f"unknown database {request.param!r}; one of {DATABASES}")
    url: str = request.getfixturevalue("postgres_url")
    return schema_url(url, request.getfixturevalue("pg_schema"))


@pytest.fixture
def app(database_url: str) -> Flask:
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI=database_url,
        SQLALCHEMY_ENGINE_OPTIONS={"pool_size": 5, "max_overflow": 2, "pool_timeout": 5},
        TESTING=True,
    )
    return app


@pytest.fixture
def db(app: Flask) -> Iterator[SQLAlchemy]:
    db = SQLAlchemy()
    db.init_app(app)
    yield db
    with app.app_context():
        for engine in db.engines.values():
            engine.dispose()


@pytest.fixture
def socketio(app: Flask) -> SocketIO:
    return SocketIO(app, async_mode="threading")


#: The keys of a pool dict (DESIGN section 5).
POOL_KEYS = frozenset(
    {
        "bind",
        "pool_class",
        "size",
        "max_overflow",
        "capacity",
        "checked_in",
        "checked_out",
        "overflow",
        "utilization",
        "timeout",
        "waiting",
        "long_held",
        "status",
    }
)


def make_item_model(db: SQLAlchemy) -> Any:
    """An ``items`` table with a unique ``name``, on ``db``."""

    class Item(db.Model):  # type: ignore[name-defined,misc]
        __tablename__ = "items"
        id = db.Column(db.Integer, primary_key=True)
        name = db.Column(db.String(80), unique=True, nullable=False)

    return Item


def stored_names(url: str) -> list[str]:
    """Names in ``items``, read over a brand-new connection (sees only committed rows)."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            return sorted(conn.exec_driver_sql("SELECT name FROM items").scalars())
    finally:
        engine.dispose()


@pytest.fixture
def url(app: Flask) -> str:
    """The app's database URL."""
    return str(app.config["SQLALCHEMY_DATABASE_URI"])


@pytest.fixture
def Item(app: Flask, db: SQLAlchemy) -> Any:
    """The ``items`` model of :func:`make_item_model`, its table created."""
    model = make_item_model(db)
    with app.app_context():
        db.create_all()
    return model


def checked_out(db: SQLAlchemy, app: Flask) -> int:
    """Connections currently checked out of the default engine's pool."""
    with app.app_context():
        return db.engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]


# -- real Socket.IO servers ------------------------------------------------------------
#
# Each server is ``python -m tests.servers.app`` in its own process, so eventlet and
# gevent monkey patching never reaches the pytest process.

REPO_ROOT = Path(__file__).resolve().parent.parent
ASYNC_MODES = ["threading", "eventlet", "gevent"]
SERVER_START_TIMEOUT = 20.0


def wait_for(
    predicate: Callable[[], Any], timeout: float, message: str, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s: {message}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_schema(postgres_url: str) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    finally:
        engine.dispose()
    return name


def drop_schema(postgres_url: str, name: str) -> None:
    engine = sa.create_engine(postgres_url, poolclass=sa.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        engine.dispose()


class ServerProcess:
    """A running ``tests.servers.app`` process."""

    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        port: int,
        log_path: Path,
        async_mode: str,
        database_url: str,
        plain: bool,
    ) -> None:
        self.proc = proc
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.async_mode = async_mode
        self.database_url = database_url
        self.plain = plain
        self.schema = ""

    def __repr__(self) -> str:
        kind = "plain" if self.plain else "dbctx"
        return f"<ServerProcess {self.async_mode} {kind} {self.url} pid={self.proc.pid}>"

    def get(self, path: str, timeout: float = 5.0) -> str:
        with HTTP.open(self.url + path, timeout=timeout) as response:
            return str(response.read().decode())

    def stats(self) -> dict[str, Any]:
        """``GET /_stats``: the pool dict, ``checked_out`` and the loop counters."""
        data: dict[str, Any] = json.loads(self.get("/_stats"))
        return data

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_checked_out(self, expected: int, timeout: float = 10.0) -> dict[str, Any]:
        """Poll ``/_stats`` until ``checked_out == expected``; fail with the log if not."""
        last: dict[str, Any] = {}

        def check() -> bool:
            nonlocal last
            last = self.stats()
            return bool(last["checked_out"] == expected)

        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() >= deadline:
                pytest.fail(
                    f"{self}: checked_out stayed {last.get('checked_out')} (expected "
                    f"{expected}) for {timeout}s; stats={last}\n--- server log ---\n"
                    + self.log()[-5000:]
                )
            time.sleep(0.05)
        return last

    def stop(self) -> None:
        stop_process(self.proc, 5)


@pytest.fixture(params=ASYNC_MODES)
def async_mode(request: pytest.FixtureRequest) -> str:
    """Each Flask-SocketIO async mode, run in a server subprocess."""
    return str(request.param)


@pytest.fixture
def server_database(request: pytest.FixtureRequest) -> str:
    """The database ``server_factory`` starts servers on: ``"postgres"`` unless a test
    says otherwise (``@pytest.mark.parametrize("server_database", ["mariadb"],
    indirect=True)``; also ``"sqlite"``)."""
    value = str(getattr(request, "param", "postgres"))
    if value not in DATABASES:
        raise ValueError(f"unknown server_database {value!r}; one of {DATABASES}")
    return value


class _ServerDatabases:
    """The databases of one test's servers: the first is the test's own (``pg_schema``,
    ``mariadb_url`` or a SQLite file); each further one is made here, dropped at
    teardown. ``(url, name)`` pairs: ``name`` is the schema (PostgreSQL), else ''."""

    def __init__(self, request: pytest.FixtureRequest, kind: str, tmp_path: Path) -> None:
        self.request = request
        self.kind = kind
        self.tmp_path = tmp_path
        self.made: list[str] = []
        self.count = 0

    def first(self) -> tuple[str, str]:
        # Requested here, inside server_factory's setup: pytest then stops the servers
        # before it drops the schema or database.
        if self.kind == "postgres":
            postgres_url = self.request.getfixturevalue("postgres_url")
            schema = self.request.getfixturevalue("pg_schema")
            return schema_url(postgres_url, schema), schema
        if self.kind == "mariadb":
            return str(self.request.getfixturevalue("mariadb_url")), ""
        return f"sqlite:///{self.tmp_path}/server.db", ""

    def another(self) -> tuple[str, str]:
        self.count += 1
        if self.kind == "postgres":
            postgres_url = self.request.getfixturevalue("postgres_url")
            schema = create_schema(postgres_url)
            self.made.append(schema)
            return schema_url(postgres_url, schema), schema
        if self.kind == "mariadb":
            url = create_mysql_database(self.request.getfixturevalue("mysql_url"))
            self.made.append(url)
            return url, ""
        return f"sqlite:///{self.tmp_path}/server-{self.count}.db", ""

    def drop(self) -> None:
        for made in self.made:
            if self.kind == "postgres":
                drop_schema(self.request.getfixturevalue("postgres_url"), made)
            else:
                drop_mysql_database(made)


@pytest.fixture
def server_factory(
    request: pytest.FixtureRequest, server_database: str, tmp_path: Path
) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``python -m tests.servers.app`` processes; all are killed at teardown.

    ``server_factory(async_mode, plain=False, pool_size=5, max_overflow=0,
    pool_timeout=30.0, config=None, extra=(), message_queue=None,
    share_schema_with=None)``: servers run on ``server_database`` (PostgreSQL unless
    the test parametrizes it). The first server uses the test's own schema
    (``pg_schema``) or database (``mariadb_url``, a SQLite file), every further one a
    schema or database of its own (dropped at teardown) unless ``share_schema_with``
    names a server whose tables to share (several workers). ``config`` sets
    ``app.config`` keys; ``extra`` names modules whose ``setup(app, socketio, db,
    dbctx, args)`` adds handlers. The server creates its tables at start.
    """
    servers: list[ServerProcess] = []
    databases = _ServerDatabases(request, server_database, tmp_path)
    first = databases.first()

    def start(
        async_mode: str,
        *,
        plain: bool = False,
        pool_size: int = 5,
        max_overflow: int = 0,
        pool_timeout: float = 30.0,
        config: dict[str, Any] | None = None,
        extra: Sequence[str] = (),
        message_queue: str | None = None,
        share_schema_with: ServerProcess | None = None,
    ) -> ServerProcess:
        if share_schema_with is not None:
            database_url, schema = share_schema_with.database_url, share_schema_with.schema
        elif servers:
            database_url, schema = databases.another()
        else:
            database_url, schema = first
        problem = ""
        for attempt in range(3):  # a free port can be taken before the server binds it
            port = free_port()
            log_path = tmp_path / f"server-{len(servers)}-{async_mode}-{attempt}.log"
            command = server_command(
                async_mode,
                port,
                database_url,
                plain=plain,
                pool_size=pool_size,
                max_overflow=max_overflow,
                pool_timeout=pool_timeout,
                config=config,
                extra=extra,
                message_queue=message_queue,
            )
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            with log_path.open("wb") as log_file:
                proc = subprocess.Popen(
                    command,
                    cwd=REPO_ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                )
            server = ServerProcess(proc, port, log_path, async_mode, database_url, plain)
            server.schema = schema
            servers.append(server)
            problem = wait_ready(proc, port, SERVER_START_TIMEOUT) or ""
            if not problem:
                return server
            server.stop()
            if "in use" not in server.log():
                break
        pytest.fail(
            f"test server ({async_mode}, plain={plain}) failed to start: {problem}\n"
            f"command: {' '.join(command)}\n--- server log ---\n{server.log()[-8000:]}"
        )

    yield start
    for server in servers:
        server.stop()
    databases.drop()


@pytest.fixture
def connect_client(
    server_factory: Callable[..., ServerProcess],
) -> Iterator[Callable[..., socketio_client.Client]]:
    """``connect_client(server, namespace="/t", auth=None)``: a connected real
    python-socketio ``Client`` over the WebSocket transport; disconnected at teardown,
    before the servers stop (hence the dependency on ``server_factory``).
    """
    clients: list[socketio_client.Client] = []

    def connect(
        server: ServerProcess, namespace: str = "/t", auth: Any = None, wait_timeout: float = 10
    ) -> socketio_client.Client:
        client = socketio_client.Client(reconnection=False)
        clients.append(client)
        client.connect(
            server.url,
            namespaces=[namespace],
            transports=["websocket"],
            auth=auth,
            wait_timeout=wait_timeout,
        )
        return client

    yield connect
    connected = [client for client in clients if client.connected]
    if connected:
        # In parallel: a WebSocket close waits up to 3 s for the server's close frame.
        with ThreadPoolExecutor(len(connected)) as pool:
            for future in [pool.submit(client.disconnect) for client in connected]:
                future.result(timeout=30)


@pytest.fixture
def db_check(postgres_url: str, pg_schema: str) -> Iterator[sa.Engine]:
    """A direct engine on the test's PostgreSQL schema (the first server's), for
    checking rows and backends."""
    engine = sa.create_engine(schema_url(postgres_url, pg_schema), poolclass=sa.pool.NullPool)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_proxy(postgres_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy (``tests/tcp_proxy.py``) in front of PostgreSQL, forwarding."""
    url = sa.engine.make_url(postgres_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 5432) as running:
        yield running


@pytest.fixture
def mysql_proxy(mysql_url: str) -> Iterator[TcpProxy]:
    """A TCP proxy (``tests/tcp_proxy.py``) in front of MariaDB/MySQL, forwarding."""
    url = sa.engine.make_url(mysql_url)
    with TcpProxy(url.host or "127.0.0.1", url.port or 3306) as running:
        yield running
