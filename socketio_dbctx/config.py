"""Configuration: the ``DBCTX_`` keys, their defaults, and validation, declared once.

Each setting is one field of :class:`Settings` carrying its own check; the subset a
namespace may override with a class attribute is :class:`NamespaceSettings`.
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

__all__ = [
    "NAMESPACE_SETTINGS",
    "PREFIX",
    "NamespaceSettings",
    "Settings",
    "is_number",
    "load_settings",
]

PREFIX = "DBCTX_"

MonitorAuth = Union[None, bool, str, Callable[[Any], bool]]
Check = Callable[[str, Any], None]


def is_number(
    value: Any,
    minimum: float = 0,
    *,
    integer: bool = False,
    maximum: float | None = None,
    above: bool = False,
) -> bool:
    """True for a finite int (or float, unless ``integer``), never a bool, within bounds.

    :param minimum: the smallest value allowed (excluded when ``above``).
    :param maximum: the largest value allowed, if any.
    """
    kinds = (int,) if integer else (int, float)
    return (
        not isinstance(value, bool)
        and isinstance(value, kinds)
        and math.isfinite(value)
        and (value > minimum if above else value >= minimum)
        and (maximum is None or value <= maximum)
    )


def _fail(name: str, value: Any, expected: str) -> None:
    raise ContextSetupError(
        f"{PREFIX}{name.upper()} must be {expected}, got {value!r}; fix app.config"
        f"[{PREFIX + name.upper()!r}] or the {name}= option"
    )


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def _number(
    minimum: float,
    *,
    integer: bool = False,
    optional: bool = False,
    maximum: float | None = None,
    above: bool = False,
) -> Check:
    expected = "an integer" if integer else "a number"
    expected += f" {'>' if above else '>='} {minimum}"
    expected += f" and <= {maximum}" if maximum is not None else ""
    expected += " or None" if optional else ""

    def check(name: str, value: Any) -> None:
        if value is None and optional:
            return
        if not is_number(value, minimum, integer=integer, maximum=maximum, above=above):
            _fail(name, value, expected)

    return check


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


def _setting(default: Any, check: Check) -> Any:
    return dataclasses.field(default=default, metadata={"check": check})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated configuration of one app (or one namespace within it).

    Each field is the lower-case name of a ``DBCTX_`` key.
    """

    commit_on_success: bool = _setting(True, _bool)
    max_retries: int = _setting(2, _number(0, integer=True))
    retry_delay: float = _setting(0.05, _number(0))
    retry_max_delay: float = _setting(2.0, _number(0))
    max_in_flight_per_client: int = _setting(4, _number(0, integer=True))
    max_concurrent_events: int | None = _setting(None, _number(0, integer=True, optional=True))
    queue_timeout: float = _setting(10.0, _number(0))
    leak_threshold: float = _setting(30.0, _number(0))
    warn_utilization: float = _setting(0.8, _number(0, maximum=1))
    monitor_namespace: str = _setting("/monitor", _namespace)
    monitor_interval: float = _setting(2.0, _number(0, above=True))
    monitor_auth: MonitorAuth = _setting(None, _auth)
    expose_errors: bool = _setting(False, _bool)
    defer_emits: bool = _setting(True, _bool)
    wrap_all_handlers: bool = _setting(False, _bool)
    cluster_redis_url: str | None = _setting(None, _redis_url)
    statement_timeout: float | None = _setting(None, _number(0, above=True, optional=True))
    idempotency_ttl: float = _setting(86400, _number(0, above=True))
    drain_timeout: float = _setting(30.0, _number(0))

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            field.metadata["check"](field.name, getattr(self, field.name))

    def override(self, values: Mapping[str, Any]) -> Settings:
        """Return a copy with ``values`` applied; ``None`` values are ignored.

        :param values: lower-case setting names to new values.
        """
        changes = {k: v for k, v in values.items() if v is not None}
        _check_names(changes)
        return dataclasses.replace(self, **changes) if changes else self


class NamespaceSettings:
    """The settings a :class:`~socketio_dbctx.DBContextNamespace` may override with a
    class attribute of the same name; ``None`` (the default) keeps the app's value."""

    commit_on_success: bool | None = None
    defer_emits: bool | None = None
    expose_errors: bool | None = None
    max_in_flight_per_client: int | None = None
    max_retries: int | None = None
    queue_timeout: float | None = None
    retry_delay: float | None = None
    retry_max_delay: float | None = None
    statement_timeout: float | None = None

    def setting_overrides(self) -> dict[str, Any]:
        """This object's overrides by setting name (``None``: not overridden)."""
        return {name: getattr(self, name) for name in NAMESPACE_SETTINGS}


#: Names of the settings a namespace may override.
NAMESPACE_SETTINGS = tuple(NamespaceSettings.__annotations__)

_NAMES = frozenset(field.name for field in dataclasses.fields(Settings))


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
