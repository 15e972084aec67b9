"""Shared fixtures.

Services: ``DBCTX_TEST_POSTGRES_URL`` / ``DBCTX_TEST_REDIS_URL`` (defaults: the local
servers). A test that needs an unreachable service is skipped with the reason, unless
``DBCTX_REQUIRE_SERVICES=1`` (set by ``.ci/run``), where it fails instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

POSTGRES_URL = os.environ.get(
    "DBCTX_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("DBCTX_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("DBCTX_REQUIRE_SERVICES") == "1"


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
def redis_url() -> str:
    return require_service("redis", REDIS_URL, 6379)


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


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """A database URL: a SQLite file, or a fresh schema on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/test.db"
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


def checked_out(db: SQLAlchemy, app: Flask) -> int:
    """Connections currently checked out of the default engine's pool."""
    with app.app_context():
        return db.engine.pool.checkedout()  # type: ignore[attr-defined,no-any-return]
