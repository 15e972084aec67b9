"""Configuration: the ``DBCTX_`` keys, their defaults, and validation.

Precedence, lowest first: defaults, ``app.config["DBCTX_..."]``, keyword options
given to :class:`~socketio_dbctx.DBContext`, then per-namespace class attributes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, Union
from urllib.parse import urlsplit

from .errors import ContextSetupError

__all__ = ["PREFIX", "Settings", "load_settings"]

PREFIX = "DBCTX_"

MonitorAuth = Union[None, bool, str, Callable[[Any], bool]]


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated configuration of one app (or one namespace within it)."""

    commit_on_success: bool = True
    max_retries: int = 2
    retry_delay: float = 0.05
    retry_max_delay: float = 2.0
    max_in_flight_per_client: int = 4
    max_concurrent_events: int | None = None
    queue_timeout: float = 10.0
    leak_threshold: float = 30.0
    warn_utilization: float = 0.8
    monitor_namespace: str = "/monitor"
    monitor_interval: float = 2.0
    monitor_auth: MonitorAuth = None
    expose_errors: bool = False
    cluster_redis_url: str | None = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            _VALIDATORS[field.name](field.name, getattr(self, field.name))

    def override(self, values: Mapping[str, Any]) -> Settings:
        """Return a copy with ``values`` applied; ``None`` values are ignored.

        :param values: lower-case setting names to new values.
        """
        changes = {k: v for k, v in values.items() if v is not None}
        _check_names(changes)
        return dataclasses.replace(self, **changes) if changes else self


def _fail(name: str, value: Any, expected: str) -> None:
    raise ContextSetupError(
        f"{PREFIX}{name.upper()} must be {expected}, got {value!r}; fix app.config"
        f"[{PREFIX + name.upper()!r}] or the {name}= option"
    )


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def _number(
    minimum: float, *, integer: bool = False, optional: bool = False, maximum: float | None = None
) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        kinds = (int,) if integer else (int, float)
        expected = "an integer" if integer else "a number"
        expected += f" >= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or not math.isfinite(value)
            or value < minimum
            or (maximum is not None and value > maximum)
        ):
            _fail(name, value, expected + (" or None" if optional else ""))

    return check


def _positive(name: str, value: Any) -> None:
    _number(0)(name, value)
    if value == 0:
        _fail(name, value, "a number > 0")


def _namespace(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.startswith("/"):
        _fail(name, value, "a namespace string starting with '/'")


def _auth(name: str, value: Any) -> None:
    if not (value is None or value is False or isinstance(value, str) or callable(value)):
        _fail(name, value, "a token string, a callable, False or None")
    if value == "":
        _fail(name, value, "a non-empty token (use False to open the monitor to anyone)")


def _redis_url(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value.startswith(("redis://", "rediss://", "unix://")):
        _fail(name, value, "a redis://, rediss:// or unix:// URL, or None")
    try:
        port = urlsplit(value).port  # raises for a port that is not a number in 0..65535
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        _fail(name, value, "a Redis URL with a valid port")


_VALIDATORS: dict[str, Callable[[str, Any], None]] = {
    "commit_on_success": _bool,
    "max_retries": _number(0, integer=True),
    "retry_delay": _number(0),
    "retry_max_delay": _number(0),
    "max_in_flight_per_client": _number(0, integer=True),
    "max_concurrent_events": _number(0, integer=True, optional=True),
    "queue_timeout": _number(0),
    "leak_threshold": _number(0),
    "warn_utilization": _number(0, maximum=1),
    "monitor_namespace": _namespace,
    "monitor_interval": _positive,
    "monitor_auth": _auth,
    "expose_errors": _bool,
    "cluster_redis_url": _redis_url,
}

_NAMES = frozenset(_VALIDATORS)


def _check_names(values: Mapping[str, Any]) -> None:
    unknown = sorted(set(values) - _NAMES)
    if unknown:
        raise ContextSetupError(
            f"unknown socketio_dbctx option(s) {', '.join(unknown)}; "
            f"valid names are {', '.join(sorted(_NAMES))}"
        )


def load_settings(config: Mapping[str, Any], options: Mapping[str, Any]) -> Settings:
    """Read the ``DBCTX_`` keys of ``config``, then apply ``options`` on top.

    :param config: usually ``app.config``.
    :param options: keyword options given to the extension (lower-case names).
    :raises ContextSetupError: for an unknown option or an invalid value.
    """
    _check_names(options)
    values: dict[str, Any] = {}
    for name in _NAMES:
        key = PREFIX + name.upper()
        if key in config:
            values[name] = config[key]
    values.update(options)
    return Settings(**values)
