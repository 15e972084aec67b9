"""The sample app refuses foreign hosts and origins (DNS rebinding), and trusts
``X-Forwarded-*`` headers only behind a configured proxy.

Raw WebSocket handshakes (websocket-client) against ``python -m sample_app`` in a
subprocess, with the ``Host``, ``Origin`` and forwarded headers a rebound browser
or a proxy would send.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from sample_app.__main__ import parse_args
from sample_app.hosts import HostGuard, default_allowed_hosts, hostname
from sample_app.process import SampleAppProcess, StartError

pytestmark = pytest.mark.server

ORDER = {"symbol": "HOST.A", "side": "buy", "qty": "1", "price": "1"}


def _start(tmp_path: Path, *args: str) -> SampleAppProcess:
    app = SampleAppProcess(
        f"sqlite:///{tmp_path}/hosts.db", log_path=tmp_path / "app.log", extra_args=list(args)
    )
    try:
        return app.start()
    except StartError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def local(tmp_path: Path) -> Iterator[SampleAppProcess]:
    app = _start(tmp_path)
    yield app
    app.stop()


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[SampleAppProcess]:
    # behind one proxy that serves https://desk.example and talks to 127.0.0.1
    app = _start(tmp_path, "--allowed-hosts", "desk.example,127.0.0.1", "--trusted-proxies", "1")
    yield app
    app.stop()


def handshake(app: SampleAppProcess, host: str, origin: str | None, **headers: str) -> str:
    """``"accepted"`` after a WebSocket handshake, /trading join and an acked order;
    else ``"refused <status>"``."""
    try:
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{app.port}/socket.io/?EIO=4&transport=websocket",
            host=host,
            origin=origin,
            suppress_origin=origin is None,
            header=[f"{k.replace('_', '-')}: {v}" for k, v in headers.items()],
            timeout=10,
        )
    except websocket.WebSocketBadStatusException as exc:
        return f"refused {exc.status_code}"
    try:
        assert ws.recv().startswith("0")
        ws.send("40/trading,")
        assert ws.recv().startswith("40/trading,")
        ws.send("42/trading,1" + json.dumps(["place_order", ORDER]))
        while True:
            message = ws.recv()
            if message == "2":  # a ping
                ws.send("3")
            elif message.startswith("43/trading,1"):
                ack: Any = json.loads(message[len("43/trading,1") :])[0]
                assert ack["ok"] is True, ack
                return "accepted"
    finally:
        ws.close()


def http_status(app: SampleAppProcess, path: str, host: str) -> int:
    request = urllib.request.Request(f"{app.url}{path}", headers={"Host": host})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_own_host_and_origin_are_accepted(local: SampleAppProcess) -> None:
    own = f"127.0.0.1:{local.port}"
    assert handshake(local, own, f"http://{own}") == "accepted"
    assert handshake(local, f"localhost:{local.port}", f"http://localhost:{local.port}") == (
        "accepted"
    )
    assert handshake(local, own, None) == "accepted"  # not a browser: no Origin
    assert http_status(local, "/", f"localhost:{local.port}") == 200


def test_a_foreign_origin_is_refused(local: SampleAppProcess) -> None:
    own = f"127.0.0.1:{local.port}"
    assert handshake(local, own, f"http://evil.example:{local.port}") == "refused 400"
    assert handshake(local, own, f"https://{own}") == "refused 400"  # another scheme
    assert handshake(local, own, "http://127.0.0.1:1") == "refused 400"  # another port
    assert handshake(local, own, "null") == "refused 400"


def test_dns_rebinding_is_refused(local: SampleAppProcess) -> None:
    """A rebound browser sends Host and Origin both on the attacker's name."""
    evil = f"evil.example:{local.port}"
    assert handshake(local, evil, f"http://{evil}") == "refused 400"
    for path in ("/", "/healthz", "/static/app.js", "/socket.io/?EIO=4&transport=polling"):
        assert http_status(local, path, evil) == 400, path
    assert http_status(local, "/healthz", f"127.0.0.1:{local.port}") == 200


def test_forwarded_headers_are_ignored_without_a_proxy(local: SampleAppProcess) -> None:
    own = f"127.0.0.1:{local.port}"
    forwarded = {"X_Forwarded_Host": "evil.example", "X_Forwarded_Proto": "https"}
    # the origin the forwarded headers claim is not taken
    assert handshake(local, own, "https://evil.example", **forwarded) == "refused 400"
    # the real Host still counts
    assert handshake(local, own, f"http://{own}", **forwarded) == "accepted"


def test_forwarded_headers_count_behind_a_trusted_proxy(proxied: SampleAppProcess) -> None:
    upstream = f"127.0.0.1:{proxied.port}"  # what the proxy sends as Host
    public = {"X_Forwarded_Host": "desk.example", "X_Forwarded_Proto": "https"}
    assert handshake(proxied, upstream, "https://desk.example", **public) == "accepted"
    # a forwarded host outside the allow-list is refused like a direct one
    rebound = {"X_Forwarded_Host": "evil.example", "X_Forwarded_Proto": "https"}
    assert handshake(proxied, upstream, "https://evil.example", **rebound) == "refused 400"
    # the page's origin must match the forwarded scheme and host exactly
    assert handshake(proxied, upstream, "http://desk.example", **public) == "refused 400"
    assert handshake(proxied, "evil.example", "http://evil.example") == "refused 400"


# -- the allow-list itself (no server) -----------------------------------------------------


def test_default_allow_list_is_the_listening_address() -> None:
    assert default_allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("127.0.0.2")[-1] == "127.0.0.2"
    assert default_allowed_hosts("192.0.2.7") == ["192.0.2.7"]
    everywhere = default_allowed_hosts("0.0.0.0")
    assert "localhost" in everywhere and len(everywhere) > 3
    args = parse_args([], {})
    assert args.allowed_hosts == ["localhost", "127.0.0.1", "::1"]
    assert args.trusted_proxies == 0
    args = parse_args([], {"ALLOWED_HOSTS": "A.example, b.example", "TRUSTED_PROXIES": "2"})
    assert (args.allowed_hosts, args.trusted_proxies) == (["a.example", "b.example"], 2)
    for bad in (["--allowed-hosts", " , "], ["--trusted-proxies", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(bad, {})


def test_origins_compare_by_scheme_host_and_port() -> None:
    from sample_app.hosts import allowed_origin

    env = {"wsgi.url_scheme": "https", "HTTP_HOST": "desk.example"}
    assert allowed_origin("https://desk.example", env)
    assert allowed_origin("https://desk.example:443", env)  # the default port, spelt out
    assert allowed_origin("https://DESK.example", env)
    assert allowed_origin("https://desk.example", {**env, "HTTP_HOST": "desk.example:443"})
    for origin in ("http://desk.example", "https://desk.example:8443", "https://evil.example",
                   "null", "", "https://desk.example/path", "https://u@desk.example",
                   "https://desk.example:99999"):  # fmt: skip
        assert not allowed_origin(origin, env), origin
    assert not allowed_origin("https://desk.example", {**env, "HTTP_HOST": ""})
    assert allowed_origin(None, env)  # not a browser


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:5000", "127.0.0.1"),
        ("LocalHost", "localhost"),
        ("[::1]:80", "::1"),
        ("evil.example:5000", "evil.example"),
        ("", None),
        (None, None),
        ("a b", None),
        ("x@127.0.0.1", None),
        ("127.0.0.1:notaport", None),
        ("127.0.0.1/x", None),
    ],
)
def test_host_header_parsing(header: str | None, name: str | None) -> None:
    assert hostname(header) == name
    guard = HostGuard(lambda *a: [], ["127.0.0.1", "localhost", "::1"])
    assert guard.allows(header) is (name in ("127.0.0.1", "localhost", "::1"))
