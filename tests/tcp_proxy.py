"""A small TCP proxy for fault injection, used by the tests and ``benchmarks/faults.py``.

Put it between an application and PostgreSQL (``sslmode=disable`` in the URL, so it
can see the protocol) and then, from the outside, at any moment:

* :meth:`TcpProxy.cut` closes every connection and stops listening: new connections
  are refused at once (the database is down);
* :meth:`TcpProxy.blackhole` closes every connection but keeps listening: new
  connections are accepted and never answered (the database hangs, or a firewall
  swallows the replies), so only the client's own timeouts end a connect;
* :meth:`TcpProxy.partition` keeps every connection open but forwards nothing either
  way, and accepts new connections without answering them (a network partition:
  nothing is closed, only the client's own timeouts notice);
* :meth:`TcpProxy.restore` forwards again, on the same port (connections held by a
  blackhole or a partition are closed: they are out of step);
* :meth:`TcpProxy.cut_next_commit` forwards the next ``COMMIT`` to the server, waits
  for the server's reply, drops it and closes that client connection: the COMMIT
  happened, and the application only knows that its connection broke during it.
  With ``after="refuse"`` the proxy then also does a :meth:`TcpProxy.cut` (before
  that client connection is closed): the database looks down right after the COMMIT,
  so nobody can ask it what became of that COMMIT until :meth:`TcpProxy.restore`.
  It knows PostgreSQL's ``COMMIT`` (:data:`COMMIT_MESSAGE`) and MySQL/MariaDB's as
  PyMySQL sends it (:data:`MYSQL_COMMIT_PACKET`).

Plain threads and blocking sockets (two pump threads per connection), so it runs in
any process that is not monkey-patched, and a call returns only once the change is
in effect. The protocols are not parsed: a COMMIT is recognised by its exact bytes in
one chunk the client sent (a client sends each query in one write).
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections import deque
from typing import Any

__all__ = ["COMMIT_AFTER", "COMMIT_MESSAGE", "COMMIT_MESSAGES", "MYSQL_COMMIT_PACKET", "TcpProxy"]

#: A PostgreSQL simple-query message ``COMMIT`` (type ``Q``, int32 length 11).
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0bCOMMIT\x00"
#: A MySQL/MariaDB ``COM_QUERY`` packet ``COMMIT`` as PyMySQL's ``Connection.commit()``
#: sends it: ``struct.pack("<iB", 7, COM_QUERY)`` (payload length 7 in 3 bytes,
#: sequence id 0, command 0x03), then the text.
MYSQL_COMMIT_PACKET = b"\x07\x00\x00\x00\x03COMMIT"
#: Every COMMIT :meth:`TcpProxy.cut_next_commit` recognises.
COMMIT_MESSAGES = (COMMIT_MESSAGE, MYSQL_COMMIT_PACKET)
#: What :meth:`TcpProxy.cut_next_commit` may do once it dropped a COMMIT's reply:
#: close only that connection, or also refuse every connection (as :meth:`TcpProxy.cut`).
COMMIT_AFTER = ("close", "refuse")

_CHUNK = 65536
_STATES = ("forwarding", "refusing", "blackhole", "partition")
#: States in which new connections are accepted and held, never answered.
_HOLDING = ("blackhole", "partition")


class _Pair:
    """One client connection and, unless it is held in a blackhole, its upstream."""

    def __init__(self, client: socket.socket, upstream: socket.socket | None) -> None:
        self.client = client
        self.upstream = upstream
        #: set when this connection's COMMIT reply is to be dropped: what to do after
        self.drop_reply: str | None = None
        self._lock = threading.Lock()
        self._users = 0
        self._shut = False

    def sockets(self) -> list[socket.socket]:
        return [s for s in (self.client, self.upstream) if s is not None]

    def enter(self) -> None:
        with self._lock:
            self._users += 1

    def leave(self) -> bool:
        """A pump thread is done; the last one closes the sockets. True when closed."""
        self.shutdown()
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            for sock in self.sockets():
                sock.close()
        return last

    def shutdown(self) -> None:
        """Wake every pump thread blocked on these sockets; they close them."""
        with self._lock:
            if self._shut:
                return
            self._shut = True
        for sock in self.sockets():
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class TcpProxy:
    """Forward ``host:port`` to ``target_host:target_port`` until told otherwise.

    :param target_host: where to forward to.
    :param target_port: its port (1-65535).
    :param host: the address to listen on.
    :param port: the port to listen on; 0 picks a free one (see :attr:`port`).
    :raises ValueError: for a port out of range.
    """

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        if isinstance(target_port, bool) or not isinstance(target_port, int):
            raise ValueError(f"target_port must be an int, got {target_port!r}")
        if not 1 <= target_port <= 65535:
            raise ValueError(f"target_port must be 1-65535, got {target_port}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535 (0: any free port), got {port!r}")
        self.target = (target_host, target_port)
        self.host = host
        self._port = port
        self._lock = threading.Lock()
        self._state = "stopped"
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        # wakes the accept loop; made by start(), closed by stop()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._pairs: set[_Pair] = set()
        self._threads: set[threading.Thread] = set()
        # one entry per armed COMMIT cut: what to do after it (see COMMIT_AFTER)
        self._commit_cuts: deque[str] = deque()
        #: connections accepted since start
        self.accepted = 0
        #: COMMIT replies dropped by :meth:`cut_next_commit`
        self.commits_cut = 0

    # -- public API -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port the proxy listens on (known once started)."""
        if not self._port:
            raise RuntimeError("the proxy has no port yet: call start() first")
        return self._port

    @property
    def state(self) -> str:
        """``"stopped"``, ``"forwarding"``, ``"refusing"``, ``"blackhole"`` or
        ``"partition"``."""
        return self._state

    @property
    def active(self) -> int:
        """Client connections open right now."""
        with self._lock:
            return len(self._pairs)

    def start(self) -> TcpProxy:
        """Listen and forward. Returns ``self``.

        :raises RuntimeError: when already started.
        """
        with self._lock:
            if self._state != "stopped":
                raise RuntimeError(f"the proxy is already started ({self._state})")
            self._state = "forwarding"
            self._wake_r, self._wake_w = socket.socketpair()
        self._listen()
        return self

    def cut(self) -> None:
        """Close every connection and refuse new ones until :meth:`restore`."""
        self._require_started("cut")
        self._stop_listening()
        with self._lock:
            self._state = "refusing"
        self._close_all()

    def blackhole(self) -> None:
        """Close every connection; accept new ones but never answer them."""
        self._require_started("blackhole")
        with self._lock:
            self._state = "blackhole"
        self._close_all()
        if self._listener is None:
            self._listen()

    def partition(self) -> None:
        """Keep every connection open but drop what either side sends; accept new
        connections but never answer them."""
        self._require_started("partition")
        with self._lock:
            self._state = "partition"
        if self._listener is None:
            self._listen()

    def restore(self) -> None:
        """Forward again (on the same port). Connections held by a blackhole or a
        partition are closed."""
        self._require_started("restore")
        with self._lock:
            previous, self._state = self._state, "forwarding"
        if previous in _HOLDING:
            self._close_all()
        if self._listener is None:
            self._listen()

    def cut_next_commit(self, count: int = 1, after: str = "close") -> None:
        """Arm: the next ``count`` COMMITs reach the server, but their replies are
        dropped and those client connections closed.

        :param count: how many COMMITs to cut (each is armed with the same ``after``).
        :param after: ``"close"``: only the COMMIT's connection is closed; ``"refuse"``:
            once the reply is dropped, the proxy is :meth:`cut` (every connection
            closed, new ones refused) before the COMMIT's own connection is closed.
        :raises ValueError: for a count below 1 or an unknown ``after``.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        if after not in COMMIT_AFTER:
            raise ValueError(f"after must be one of {COMMIT_AFTER}, got {after!r}")
        self._require_started("cut_next_commit")
        with self._lock:
            self._commit_cuts.extend([after] * count)

    def stop(self) -> None:
        """Close everything; the proxy cannot be started again."""
        with self._lock:
            if self._state == "stopped":
                return
            self._state = "stopped"
        self._stop_listening()
        self._close_all()
        for thread in list(self._threads):
            thread.join(5)
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._wake_r = self._wake_w = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<TcpProxy {self.host}:{self._port} -> {self.target[0]}:{self.target[1]} "
            f"{self._state} active={len(self._pairs)}>"
        )

    # -- internals --------------------------------------------------------------------

    def _require_started(self, what: str) -> None:
        if self._state == "stopped":
            raise RuntimeError(f"cannot {what}: the proxy is not running (call start())")

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self._port))
        except OSError:
            listener.close()
            raise
        listener.listen(128)
        self._port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor = self._spawn(self._accept_loop, listener, self._wake_r)

    def _stop_listening(self) -> None:
        listener, acceptor = self._listener, self._acceptor
        wake_r, wake_w = self._wake_r, self._wake_w
        if listener is None or acceptor is None or wake_r is None or wake_w is None:
            return
        self._listener = self._acceptor = None
        wake_w.send(b"x")
        acceptor.join(5)
        listener.close()
        # drain the wake-up byte(s)
        while select.select([wake_r], [], [], 0)[0]:
            wake_r.recv(64)

    def _close_all(self) -> None:
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            pair.shutdown()

    def _spawn(self, target: Any, *args: Any) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=(target, *args), daemon=True)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return thread

    def _run(self, target: Any, *args: Any) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept_loop(self, listener: socket.socket, wake: socket.socket) -> None:
        while True:
            readable, _, _ = select.select([listener, wake], [], [])
            if wake in readable:
                return
            try:
                client, _ = listener.accept()
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self.accepted += 1
                state = self._state
            upstream = None
            if state == "forwarding":
                try:
                    upstream = socket.create_connection(self.target, timeout=5)
                    upstream.settimeout(None)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    client.close()  # the target is down: so is the proxy, for this client
                    continue
            elif state not in _HOLDING:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                changed = self._state != state
                if not changed:
                    self._pairs.add(pair)
            if changed:  # cut, blackholed or restored meanwhile: this one is stale
                for sock in pair.sockets():
                    sock.close()
                continue
            if upstream is None:
                pair.enter()
                self._spawn(self._hold, pair)
            else:
                pair.enter()
                pair.enter()
                self._spawn(self._pump, pair, client, upstream, True)
                self._spawn(self._pump, pair, upstream, client, False)

    def _release(self, pair: _Pair) -> None:
        if pair.leave():
            with self._lock:
                self._pairs.discard(pair)

    def _hold(self, pair: _Pair) -> None:
        """A connection accepted in a blackhole or a partition: read and discard
        until it is closed."""
        try:
            with contextlib.suppress(OSError):
                while pair.client.recv(_CHUNK):
                    pass
        finally:
            self._release(pair)

    def _pump(
        self, pair: _Pair, source: socket.socket, sink: socket.socket, to_server: bool
    ) -> None:
        try:
            while True:
                data = source.recv(_CHUNK)
                if not data:
                    return
                if self._state == "partition":
                    continue  # lost in the network; the connection stays open
                if to_server:
                    if any(message in data for message in COMMIT_MESSAGES):
                        with self._lock:
                            if self._commit_cuts:
                                pair.drop_reply = self._commit_cuts.popleft()
                elif pair.drop_reply is not None:
                    # The server answered the COMMIT: it is done. The client never knows.
                    with self._lock:
                        self.commits_cut += 1
                    if pair.drop_reply == "refuse":
                        with contextlib.suppress(RuntimeError):  # stopped meanwhile
                            self.cut()  # down before the client can notice and ask again
                    return
                sink.sendall(data)
        except OSError:
            return
        finally:
            self._release(pair)
