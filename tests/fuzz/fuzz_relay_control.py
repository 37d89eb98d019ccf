"""Coverage-guided fuzzing of the relay control codec (relay/controlwire.py).

Properties: parsing raises only :class:`ControlError`; whatever parses
re-encodes to the same message; the refusal codes decode to a known reason.
"""

from __future__ import annotations

import atheris
from _harness import PROJECT, fuzz

with atheris.instrument_imports(include=PROJECT):
    from relay.controlwire import (
        REASONS,
        Allocate,
        Allocated,
        Bind,
        Bound,
        Challenge,
        Confirm,
        Ping,
        Pong,
        Refused,
        build_control,
        is_control,
        parse_control,
    )
    from relay.errors import ControlError

ID, TICKET = bytes(range(16)), bytes(range(1, 200))


def seeds() -> list[bytes]:
    messages = [
        Allocate(TICKET),
        Allocated(ID, 40001),
        Bind(TICKET),
        Challenge(ID, bytes(16)),
        Confirm(bytes(16), TICKET),
        Bound(ID, True),
        Refused(ID, "ticket_expired"),
        Ping(ID),
        Pong(ID, 3, 100),
    ]
    return [build_control(m) for m in messages]


def test_one_input(data: bytes) -> None:
    try:
        msg = parse_control(data)
    except ControlError:
        return
    assert is_control(data)
    assert parse_control(build_control(msg)) == msg, "re-encoding changed the message"
    if isinstance(msg, Refused):
        assert msg.reason in REASONS


if __name__ == "__main__":
    fuzz(test_one_input, seeds())
