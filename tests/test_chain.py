"""The chain, as pure logic: built once from wraps, outermost first, user middleware
adapted, short-circuits and re-runs allowed (no server, no database)."""

from __future__ import annotations

from typing import Any

import pytest

from socketio_dbctx.errors import InvalidRequestError
from socketio_dbctx.pipeline import Event, HandlerSpec, Step, adapt, build_chain, call_handler


def make_event(handler: Any, *args: Any) -> Event:
    return Event(
        app=None,  # type: ignore[arg-type]
        state=None,  # type: ignore[arg-type]
        settings=None,  # type: ignore[arg-type]
        namespace="/t",
        name="go",
        sid="s1",
        args=args,
        handler=handler,
        spec=HandlerSpec(handler),
        sleep=lambda seconds: None,
    )


def recording(name: str, log: list[str]) -> Any:
    def wrap(rest: Step) -> Step:
        def step(event: Event) -> Any:
            log.append(f"{name} in")
            try:
                return rest(event)
            finally:
                log.append(f"{name} out")

        return step

    return wrap


def test_wraps_run_outermost_first_around_the_handler() -> None:
    log: list[str] = []

    def handler(x: int) -> int:
        log.append("handler")
        return x * 2

    chain = build_chain([recording("a", log), recording("b", log)])
    assert chain(make_event(handler, 21)) == 42
    assert log == ["a in", "b in", "handler", "b out", "a out"]


def test_a_chain_is_built_once_and_reused_for_every_event() -> None:
    built: list[str] = []

    def wrap(rest: Step) -> Step:
        built.append("built")
        return rest

    chain = build_chain([wrap])
    for value in range(3):
        assert chain(make_event(lambda v: v, value)) == value
    assert built == ["built"]


def test_user_middleware_sees_the_event_and_can_short_circuit() -> None:
    called: list[str] = []

    def gate(event: Event, call_next: Any) -> Any:
        if event.args == ("stop",):
            return {"stopped": event.key}
        return call_next()

    chain = build_chain([adapt(gate)])
    assert chain(make_event(lambda v: called.append(v) or "ran", "go")) == "ran"
    assert chain(make_event(lambda v: called.append(v) or "ran", "stop")) == {"stopped": "/t:go"}
    assert called == ["go"]


def test_call_next_may_be_called_again() -> None:
    runs: list[int] = []

    def twice(event: Event, call_next: Any) -> Any:
        call_next()
        return call_next()

    chain = build_chain([adapt(twice)])
    assert chain(make_event(lambda: runs.append(1) or len(runs))) == 2


@pytest.mark.parametrize(
    ("args", "accepted"),
    [((), False), ((1,), True), ((1, 2), True), ((1, 2, 3), False)],
)
def test_the_argument_count_is_checked_before_the_handler_runs(
    args: tuple[Any, ...], accepted: bool
) -> None:
    calls: list[tuple[Any, ...]] = []

    def handler(a: Any, b: Any = None) -> str:
        calls.append((a, b))
        return "ok"

    event = make_event(handler, *args)
    if accepted:
        assert call_handler(event) == "ok"
    else:
        with pytest.raises(InvalidRequestError, match=r"go takes 1 to 2 argument\(s\)"):
            call_handler(event)
        assert calls == []
