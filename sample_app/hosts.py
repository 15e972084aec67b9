"""Which hosts and origins may reach the app: a defence against DNS rebinding.

A page on ``evil.example`` whose name an attacker re-points at 127.0.0.1 talks to
the app with ``Host`` and ``Origin`` both ``evil.example:PORT``: same-origin as far as
the browser knows. So the app checks the ``Host`` of every request (HTTP routes and
the Socket.IO endpoint alike) against an allow-list, and accepts a browser's
``Origin`` only when it is the very scheme, host and port of that allowed ``Host``
(``cors_allowed_origins``).

``X-Forwarded-Host``/``-Proto``/``-For`` are read only behind a configured number of
trusted proxies (Werkzeug's ``ProxyFix``); otherwise they are ignored.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Sequence
from typing import Any, Callable
from urllib.parse import urlsplit

__all__ = ["LOOPBACK_NAMES", "HostGuard", "allowed_origin", "default_allowed_hosts", "hostname"]

#: Names that reach a loopback address; accepted when the app listens on one.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(listen_host: str) -> list[str]:
    """The allow-list when none is configured: the address the app listens on.

    Loopback: the loopback names too. All addresses (``0.0.0.0``, ``::``): loopback
    and this machine's names; any other name must be configured.
    """
    host = listen_host.strip("[]").lower()
    if host in ("", "0.0.0.0", "::"):
        names = {socket.gethostname().lower(), socket.getfqdn().lower()}
        return [*LOOPBACK_NAMES, *sorted(n for n in names if n)]
    if _is_loopback(host):
        return [*LOOPBACK_NAMES, *([host] if host not in LOOPBACK_NAMES else [])]
    return [host]


def parse_hosts(text: str) -> list[str]:
    """``"a.example, B.example"`` -> ``["a.example", "b.example"]`` (``*``: any host)."""
    return [h.strip().strip("[]").lower() for h in text.split(",") if h.strip()]


def hostname(host_header: str | None) -> str | None:
    """The host name of a ``Host`` value (``"[::1]:5000"`` -> ``"::1"``), or None."""
    if not host_header or any(c in host_header for c in "/?#@ \\"):
        return None
    try:
        parts = urlsplit("//" + host_header)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    return parts.hostname or None


class HostGuard:
    """WSGI middleware: 400 for a ``Host`` outside ``allowed`` (``"*"`` allows any)."""

    def __init__(self, app: Callable[..., Any], allowed: Iterable[str]) -> None:
        self.app = app
        self.allowed = frozenset(h.lower() for h in allowed)

    def allows(self, host_header: str | None) -> bool:
        if "*" in self.allowed:
            return True
        name = hostname(host_header)
        return name is not None and name in self.allowed

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if not self.allows(environ.get("HTTP_HOST")):
            body = b"Unknown host: add it with --allowed-hosts (env ALLOWED_HOSTS).\n"
            start_response(
                "400 Bad Request",
                [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))),
                ],
            )
            return [body]
        return self.app(environ, start_response)


def allowed_origin(origin: str | None, environ: dict[str, Any]) -> bool:
    """``cors_allowed_origins`` of the Socket.IO server: a browser may connect from
    the page the app itself served, i.e. the scheme and ``Host`` of this request
    (which :class:`HostGuard` has already checked). No ``Origin``: not a browser."""
    if origin is None:
        return True
    return (
        _site(origin)
        == _site(f"{environ.get('wsgi.url_scheme', 'http')}://{environ.get('HTTP_HOST', '')}")
        and _site(origin) is not None
    )


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _site(url: str) -> tuple[str, str, int] | None:
    """``(scheme, host, port)`` with the default port filled in; None when malformed."""
    try:
        parts = urlsplit(url.lower())
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname or port is None:
        return None
    if parts.path or parts.query or parts.fragment or parts.username is not None:
        return None
    return parts.scheme, parts.hostname, port


def guard(
    app: Callable[..., Any], allowed: Sequence[str], trusted_proxies: int
) -> Callable[..., Any]:
    """``app`` behind the host check, itself behind ``ProxyFix`` when proxies are trusted."""
    wrapped: Callable[..., Any] = HostGuard(app, allowed)
    if trusted_proxies > 0:
        from werkzeug.middleware.proxy_fix import ProxyFix

        n = trusted_proxies
        wrapped = ProxyFix(wrapped, x_for=n, x_proto=n, x_host=n, x_port=n)
    return wrapped
