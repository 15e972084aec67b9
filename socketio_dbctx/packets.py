"""Malformed Socket.IO packets: dropped, or acked ``invalid_request``, with one log line.

python-socketio decodes each Engine.IO message in ``Server._handle_eio_message`` and
dispatches events from ``Server._handle_event``. Left alone, a packet it cannot decode
(absurd nesting: ``RecursionError``; an integer of over 100 digits, which engineio's
JSON refuses, bad JSON, a binary frame nobody asked for: ``ValueError``) or an event
whose name is not a string (``42/chat,1[123,{}]``: ``TypeError`` at ``"on_" + event``)
ends in a traceback per packet, and the client's call never gets an ack.

:func:`install` guards one server: the decoding (its packet class, so the check costs
nothing on the path of a good packet) and the event's shape (a list starting with a
string name). A packet that cannot be decoded is dropped (its ack id cannot be trusted);
an event of the wrong shape is acked ``invalid_request`` when the client asked for an
ack, else dropped. Either way nothing runs, nothing is stored, nothing is held, and one
line is logged per kind of problem (then summaries, as for failed events: see
:mod:`socketio_dbctx.throttle`).
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from socketio import packet as sio_packet

from .acks import error_payload
from .errors import InvalidRequestError
from .throttle import LogThrottle

__all__ = ["MalformedPacket", "install"]

logger = logging.getLogger(__name__)

_ATTR = "_dbctx_packets"
_THROTTLE = LogThrottle()

#: python-socketio's own refusals in ``_handle_eio_message`` (client-made packets)
_REFUSALS = {
    "Unknown packet type.": "unknown packet type",
    "Unexpected binary packet": "binary packet outside a namespace",
    "Unexpected CONNECT_ERROR packet.": "CONNECT_ERROR sent by a client",
}


class MalformedPacket(Exception):
    """A packet that cannot be decoded.

    :param kind: what is wrong, in a few words (one log line per kind).
    """

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class MalformedEvent(MalformedPacket):
    """A decoded event of the wrong shape; its ack id can be trusted.

    :param namespace: the packet's namespace (``None``: ``"/"``).
    :param id: the packet's ack id, if the client asked for an ack.
    """

    def __init__(self, kind: str, namespace: str | None, id: Any) -> None:
        super().__init__(kind)
        self.namespace = namespace
        self.id = id


def _kind(exc: BaseException, encoded: Any) -> str:
    if isinstance(exc, RecursionError):
        return "nesting too deep"
    text = str(exc)
    # engineio's JSON refuses integers of over 100 digits; Python's, of over 4300
    if isinstance(exc, ValueError) and (
        "Integer is too large" in text or "integer string" in text
    ):
        return "integer too large"
    if isinstance(encoded, bytes):
        return "binary data where a packet was expected"
    return "undecodable packet"


def _guarded(base: type) -> type:
    class GuardedPacket(base):  # type: ignore[misc]
        """The server's packet class; decoding failures raise :class:`MalformedPacket`,
        an event of the wrong shape :class:`MalformedEvent` (a binary one once its
        attachments are in)."""

        def decode(self, encoded_packet: Any) -> Any:
            try:
                count = base.decode(self, encoded_packet)  # type: ignore[attr-defined]
            except Exception as exc:
                raise MalformedPacket(_kind(exc, encoded_packet)) from None
            if self.packet_type == sio_packet.EVENT:
                data = self.data
                if not (type(data) is list and data and type(data[0]) is str):
                    _check_event(self)
            return count

        def add_attachment(self, attachment: Any) -> Any:
            try:
                complete = super().add_attachment(attachment)
            except Exception as exc:
                raise MalformedPacket("bad binary attachment") from exc
            if complete and self.packet_type == sio_packet.BINARY_EVENT:
                _check_event(self)
            return complete

    GuardedPacket.__name__ = GuardedPacket.__qualname__ = f"Guarded{base.__name__}"
    return GuardedPacket


def _log(kind: str, eio_sid: str) -> None:
    decision = _THROTTLE.occurred(kind)
    if not decision.log:
        return
    if decision.first:
        logger.warning("dropped a malformed packet from %s: %s", eio_sid, kind)
    else:
        logger.warning(
            "dropped a malformed packet from %s: %s ... and %d more like it in the last %.0f s",
            eio_sid,
            kind,
            decision.more,
            decision.seconds,
        )


def _event_problem(data: Any) -> str | None:
    if not isinstance(data, list):
        return "event payload not a list"
    if not data:
        return "event without a name"
    if not isinstance(data[0], str):
        return "event name not a string"
    return None


def _check_event(packet: Any) -> None:
    """Raise :class:`MalformedEvent` for an event packet of the wrong shape."""
    problem = _event_problem(packet.data)
    if problem is not None:
        raise MalformedEvent(problem, packet.namespace, packet.id)


def install(server: Any) -> None:
    """Guard a python-socketio ``Server`` or ``AsyncServer`` against malformed packets;
    once per server."""
    if server is None or getattr(server, _ATTR, False):
        return
    server.packet_class = _guarded(server.packet_class)
    handle_message = server._handle_eio_message

    def refused(eio_sid: str, exc: Exception) -> MalformedEvent | None:
        """Log a refused packet; the malformed event to answer, if any. Re-raises what
        is not a malformed packet."""
        if isinstance(exc, MalformedPacket):
            server._binary_packet.pop(eio_sid, None)  # a broken attachment ends its packet
            _log(exc.kind, eio_sid)
            return exc if isinstance(exc, MalformedEvent) else None
        kind = _REFUSALS.get(str(exc)) if isinstance(exc, ValueError) else None
        if kind is None:
            raise exc
        _log(kind, eio_sid)
        return None

    if inspect.iscoroutinefunction(handle_message):

        async def guarded_message(eio_sid: str, data: Any) -> Any:
            try:
                return await handle_message(eio_sid, data)
            except (MalformedPacket, ValueError) as exc:
                event = refused(eio_sid, exc)
                ack = _refusal(server, eio_sid, event) if event is not None else None
                if ack is not None:
                    await server._send_packet(eio_sid, ack)
            return None

    else:

        def guarded_message(eio_sid: str, data: Any) -> Any:  # type: ignore[misc]
            try:
                return handle_message(eio_sid, data)
            except (MalformedPacket, ValueError) as exc:
                event = refused(eio_sid, exc)
                ack = _refusal(server, eio_sid, event) if event is not None else None
                if ack is not None:
                    server._send_packet(eio_sid, ack)
            return None

    server._handle_eio_message = guarded_message
    # Engine.IO calls the handler it was given at start: give it this one instead
    server.eio.on("message", guarded_message)
    setattr(server, _ATTR, True)


def _refusal(server: Any, eio_sid: str, exc: MalformedEvent) -> Any:
    """The ``invalid_request`` ack packet of a malformed event, if its client asked for
    an ack and is connected to its namespace; else None."""
    namespace = exc.namespace or "/"
    sid = server.manager.sid_from_eio_sid(eio_sid, namespace)
    if exc.id is None or sid is None or not server.manager.is_connected(sid, namespace):
        return None
    ack = error_payload(InvalidRequestError(f"malformed event: {exc.kind}"), expose=False)
    return server.packet_class(sio_packet.ACK, namespace=namespace, id=exc.id, data=[ack])
