"""``tests/tcp_proxy.py`` in front of a tiny echo server: no database, no Socket.IO.

Its database-specific parts (``cut``, ``blackhole``, ``cut_next_commit`` against a
real server, argument checks) are tested in ``tests/test_faults.py``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from typing import Callable

import pytest
from conftest import wait_for
from tcp_proxy import COMMIT_MESSAGE, MYSQL_COMMIT_PACKET, TcpProxy

#: How long a read through a partition waits before "nothing came" counts.
QUIET = 0.5


class EchoServer:
    """Echoes every byte back on 127.0.0.1 and records what it received."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.received = bytearray()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(4096):
                with self._lock:
                    self.received += data
                conn.sendall(data)

    def seen(self) -> bytes:
        with self._lock:
            return bytes(self.received)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy("127.0.0.1", echo.port) as running:
        yield running


@pytest.fixture
def connect(proxy: TcpProxy) -> Iterator[Callable[[], socket.socket]]:
    """``connect()``: a client socket to the proxy, closed at teardown."""
    opened: list[socket.socket] = []

    def make() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        opened.append(sock)
        return sock

    yield make
    for sock in opened:
        sock.close()


def roundtrip(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def closed_by_peer(sock: socket.socket) -> bool:
    """True once ``sock`` reads end-of-file or a reset (without waiting long)."""
    sock.settimeout(0.05)
    try:
        return sock.recv(4096) == b""
    except socket.timeout:
        return False
    except OSError:
        return True


def test_partition_keeps_connections_open_forwards_nothing_until_restored(
    proxy: TcpProxy, echo: EchoServer, connect: Callable[[], socket.socket]
) -> None:
    before = connect()
    assert roundtrip(before, b"hello") == b"hello"
    port = proxy.port

    proxy.partition()

    assert proxy.state == "partition"
    before.sendall(b"lost-on-the-way")
    before.settimeout(QUIET)
    with pytest.raises(socket.timeout):  # neither an answer nor end-of-file: open, silent
        before.recv(4096)
    accepted = proxy.accepted
    during = connect()  # accepted, never answered
    wait_for(lambda: proxy.accepted == accepted + 1, 5, "the proxy to accept during it")
    during.sendall(b"lost-too")
    during.settimeout(QUIET)
    with pytest.raises(socket.timeout):
        during.recv(4096)
    assert echo.seen() == b"hello", "a partition let bytes through"

    proxy.restore()

    assert proxy.state == "forwarding" and proxy.port == port
    for sock in (before, during):  # out of step: closed, not resumed
        wait_for(lambda s=sock: closed_by_peer(s), 5, "a partitioned connection to close")
    after = connect()
    assert roundtrip(after, b"again") == b"again"
    assert echo.seen() == b"helloagain"


def test_partition_after_a_cut_listens_again(
    proxy: TcpProxy, connect: Callable[[], socket.socket]
) -> None:
    proxy.cut()
    with pytest.raises(ConnectionRefusedError):
        connect()

    proxy.partition()

    held = connect()
    held.sendall(b"x")
    held.settimeout(QUIET)
    with pytest.raises(socket.timeout):
        held.recv(4096)
    proxy.restore()
    assert roundtrip(connect(), b"back") == b"back"


def test_partition_needs_start() -> None:
    with pytest.raises(RuntimeError, match="not running"):
        TcpProxy("127.0.0.1", 5432).partition()


# -- cut_next_commit: which COMMITs, and what comes after ------------------------------


@pytest.mark.parametrize(
    "commit",
    [COMMIT_MESSAGE, MYSQL_COMMIT_PACKET],
    ids=["postgresql", "mysql"],
)
@pytest.mark.parametrize("after", ["close", "refuse"])
def test_cut_next_commit_drops_the_reply_then_closes_or_refuses(
    proxy: TcpProxy,
    echo: EchoServer,
    connect: Callable[[], socket.socket],
    commit: bytes,
    after: str,
) -> None:
    """The COMMIT reaches the server (the echo server records it), its reply (the
    echo) never comes back, that connection is closed; ``after="refuse"`` also closes
    the other connections and refuses new ones until ``restore()``."""
    bystander = connect()
    assert roundtrip(bystander, b"warm") == b"warm"
    sock = connect()
    assert roundtrip(sock, b"BEGIN") == b"BEGIN"  # not a COMMIT: forwarded both ways

    proxy.cut_next_commit(after=after)
    sock.sendall(commit)

    wait_for(lambda: closed_by_peer(sock), 5, "the COMMIT's connection to close")
    assert proxy.commits_cut == 1
    assert echo.seen().endswith(commit), "the COMMIT did not reach the server"
    if after == "close":
        assert proxy.state == "forwarding"
        assert roundtrip(bystander, b"still") == b"still"
        assert roundtrip(connect(), commit) == commit  # armed once: answered now
    else:
        assert proxy.state == "refusing"
        wait_for(lambda: closed_by_peer(bystander), 5, "the other connection to close")
        with pytest.raises(ConnectionRefusedError):
            connect()
        proxy.restore()
        assert roundtrip(connect(), commit) == commit
    assert proxy.commits_cut == 1


def test_cut_next_commit_counts_each_armed_cut_with_its_own_after(
    proxy: TcpProxy, connect: Callable[[], socket.socket]
) -> None:
    proxy.cut_next_commit(count=1, after="close")
    proxy.cut_next_commit(count=1, after="refuse")

    first = connect()
    first.sendall(MYSQL_COMMIT_PACKET)
    wait_for(lambda: closed_by_peer(first), 5, "the first COMMIT's connection to close")
    assert proxy.state == "forwarding" and proxy.commits_cut == 1
    second = connect()
    second.sendall(COMMIT_MESSAGE)
    wait_for(lambda: closed_by_peer(second), 5, "the second COMMIT's connection to close")
    assert proxy.state == "refusing" and proxy.commits_cut == 2


@pytest.mark.parametrize("after", ["", "cut", None, 1, "REFUSE"])
def test_cut_next_commit_rejects_an_unknown_after(proxy: TcpProxy, after: object) -> None:
    with pytest.raises(ValueError, match="after must be one of"):
        proxy.cut_next_commit(after=after)  # type: ignore[arg-type]
    assert proxy.commits_cut == 0


def test_the_mysql_commit_packet_is_what_pymysql_sends() -> None:
    """PyMySQL's ``Connection.commit()`` is ``_execute_command(COM_QUERY, "COMMIT")``,
    whose first packet is ``struct.pack("<iB", len + 1, command) + sql``."""
    import struct

    from pymysql.constants import COMMAND

    assert struct.pack("<iB", 7, COMMAND.COM_QUERY) + b"COMMIT" == MYSQL_COMMIT_PACKET
