"""The start-up WARNING for a database driver that would block eventlet or gevent.

mysqlclient and MariaDB Connector/Python are not installed here: each is a stand-in
DBAPI module (``create_engine(..., module=...)``), enough for SQLAlchemy to build the
dialect the URL names; nothing ever connects. (psycopg 3's dialect imports the real
package, so its warning is not covered here.)
"""

from __future__ import annotations

import logging
import types
from typing import Any

import pytest
import sqlalchemy as sa
from flask import Flask
from flask_socketio import SocketIO
from flask_sqlalchemy import SQLAlchemy

from socketio_dbctx import DBContext, DBContextNamespace
from socketio_dbctx.drivers import check_green_driver, green_driver_problem


def stand_in_dbapi(name: str, version: str) -> types.ModuleType:
    """A module that looks enough like a DBAPI for SQLAlchemy to build a dialect."""
    module = types.ModuleType(name)
    module.__version__ = version  # type: ignore[attr-defined]
    module.version_info = tuple(int(part) for part in version.split("."))  # type: ignore[attr-defined]
    module.paramstyle = "format"  # type: ignore[attr-defined]
    for error in ("Error", "OperationalError", "InterfaceError", "ProgrammingError"):
        setattr(module, error, type(error, (Exception,), {}))

    def connect(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the stand-in DBAPI must never connect")

    module.connect = connect  # type: ignore[attr-defined]
    return module


def mysqlclient_engine() -> sa.Engine:
    return sa.create_engine(
        "mysql+mysqldb://root@127.0.0.1:3306/test", module=stand_in_dbapi("MySQLdb", "2.2.4")
    )


def mariadb_connector_engine() -> sa.Engine:
    return sa.create_engine(
        "mysql+mariadbconnector://root@127.0.0.1:3306/test",
        module=stand_in_dbapi("mariadb", "1.1.10"),
    )


#: (engine, driver name, words the warning must say): C drivers that block green modes.
BLOCKING = [
    pytest.param(mysqlclient_engine, "mysqldb", "mysqlclient (MySQLdb)", id="mysqlclient"),
    pytest.param(
        mariadb_connector_engine,
        "mariadbconnector",
        "MariaDB Connector/Python",
        id="mariadb_connector",
    ),
]


def pymysql_engine() -> sa.Engine:
    return sa.create_engine("mysql+pymysql://root@127.0.0.1:3306/test")


@pytest.mark.parametrize(("make_engine", "driver", "named"), BLOCKING)
@pytest.mark.parametrize("async_mode", ["eventlet", "gevent"])
def test_c_mysql_drivers_are_named_under_green_async_modes(
    async_mode: str, make_engine: Any, driver: str, named: str
) -> None:
    engine = make_engine()
    assert engine.dialect.driver == driver
    problem = green_driver_problem(engine, async_mode)
    assert problem is not None
    assert named in problem and async_mode in problem
    assert "PyMySQL" in problem and "mysql+pymysql://" in problem  # names the fix


@pytest.mark.parametrize(("make_engine", "driver", "named"), BLOCKING)
@pytest.mark.parametrize("async_mode", ["threading", None])
def test_c_mysql_drivers_are_fine_under_threading(
    async_mode: str | None, make_engine: Any, driver: str, named: str
) -> None:
    assert green_driver_problem(make_engine(), async_mode) is None


@pytest.mark.parametrize("async_mode", ["threading", "eventlet", "gevent"])
def test_pymysql_is_fine_everywhere(async_mode: str) -> None:
    engine = pymysql_engine()
    assert engine.dialect.driver == "pymysql"
    assert green_driver_problem(engine, async_mode) is None


def test_check_green_driver_logs_one_warning_per_blocking_engine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engines = {"default": pymysql_engine(), "reports": mysqlclient_engine()}
    with caplog.at_level(logging.WARNING, logger="socketio_dbctx.drivers"):
        check_green_driver(engines, "gevent")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "'reports'" in message and "mysqlclient" in message
    assert "stalls all other clients" in message


@pytest.mark.parametrize("async_mode", ["gevent", "threading"])
def test_first_event_warns_about_mysqlclient_under_gevent(
    async_mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the extension: the first event, when the async mode is known, logs the
    WARNING once (and nothing under threading)."""
    app = Flask(__name__)
    app.config.update(
        SQLALCHEMY_DATABASE_URI="mysql+mysqldb://root@127.0.0.1:3306/test",
        SQLALCHEMY_ENGINE_OPTIONS={"module": stand_in_dbapi("MySQLdb", "2.2.4")},
    )
    db = SQLAlchemy()
    db.init_app(app)
    socketio = SocketIO(app, async_mode=async_mode)
    DBContext(app, socketio, db)

    class Ping(DBContextNamespace):
        def on_ping(self) -> str:
            return "pong"  # no query: the stand-in never connects

    socketio.on_namespace(Ping("/t"))
    client = socketio.test_client(app, namespace="/t")
    with caplog.at_level(logging.WARNING, logger="socketio_dbctx.drivers"):
        assert client.emit("ping", namespace="/t", callback=True) == "pong"
        assert client.emit("ping", namespace="/t", callback=True) == "pong"
    client.disconnect(namespace="/t")
    warnings = [r.getMessage() for r in caplog.records if r.name == "socketio_dbctx.drivers"]
    if async_mode == "gevent":
        assert len(warnings) == 1 and "mysqlclient (MySQLdb) blocks" in warnings[0]
    else:
        assert warnings == []
