"""Device login core: codes, normalisation, the guess limiter, the state table."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity import device_login as dl
from identity.device_login import (
    ALPHABET,
    TRANSITIONS,
    Event,
    GuessLimiter,
    InvalidTransition,
    PollState,
    Status,
    TokenBucket,
    TooManyGuesses,
    decide_poll,
    effective_status,
    format_user_code,
    generate_poll_token,
    generate_user_code,
    normalize_user_code,
    transition,
)
from wiregate.errors import BadInput

T0 = 1_700_000_000.0


def test_exported_members() -> None:
    assert set(dl.__all__) == {n for n in dir(dl) if not n.startswith("_")} - {
        "BadInput",
        "Conflict",
        "RemoteError",
        "annotations",
        "dataclass",
        "field",
        "secrets",
        "StrEnum",
    }


def test_user_codes_are_unambiguous_and_about_34_bits() -> None:
    assert not set(ALPHABET) & set("AEIOU01")
    assert math.log2(len(ALPHABET) ** dl.USER_CODE_LEN) > 34
    codes = {generate_user_code() for _ in range(200)}
    assert len(codes) == 200
    assert all(len(c) == 8 and set(c) <= set(ALPHABET) for c in codes)


def test_format_and_normalise_round_trip() -> None:
    code = generate_user_code()
    shown = format_user_code(code)
    assert shown[4] == "-" and len(shown) == 9
    for typed in (shown, shown.lower(), f"  {code[:4]} {code[4:]} ", code.lower()):
        assert normalize_user_code(typed) == code


@pytest.mark.parametrize(
    "typed", ["", "BCDF-GHJ", "BCDF-GHJKL", "BCDF-GHJA", "BCDF-GHJ0", "ÅCDFGHJK"]
)
def test_normalise_refuses_non_codes(typed: str) -> None:
    with pytest.raises(BadInput) as err:
        normalize_user_code(typed)
    assert err.value.code == "invalid_user_code"


def test_poll_tokens_are_long_and_distinct() -> None:
    tokens = {generate_poll_token() for _ in range(50)}
    assert len(tokens) == 50
    assert all(t.startswith("wgp_") and len(t) == 4 + 43 for t in tokens)


# -- transitions ------------------------------------------------------------------------


def test_transition_table() -> None:
    assert transition(Status.PENDING, Event.APPROVE) is Status.APPROVED
    assert transition(Status.APPROVED, Event.COLLECT) is Status.CONSUMED
    for status in (Status.DENIED, Status.EXPIRED, Status.CONSUMED):
        assert not any(s is status for s, _ in TRANSITIONS)  # terminal
    with pytest.raises(InvalidTransition):
        transition(Status.APPROVED, Event.APPROVE)


def test_expiry_applies_to_pending_and_approved_only() -> None:
    assert effective_status(Status.PENDING, T0, T0) is Status.EXPIRED
    assert effective_status(Status.PENDING, T0, T0 - 0.001) is Status.PENDING
    assert effective_status(Status.APPROVED, T0, T0 + 1) is Status.EXPIRED
    assert effective_status(Status.DENIED, T0, T0 + 1) is Status.DENIED
    assert effective_status(Status.CONSUMED, T0, T0 + 1) is Status.CONSUMED


_EVENTS = st.lists(
    st.tuples(st.sampled_from(["approve", "deny", "poll"]), st.floats(0, 30)), max_size=40
)


@given(_EVENTS)
def test_no_sequence_approves_twice_or_hands_out_two_tokens(
    events: list[tuple[str, float]],
) -> None:
    status, now, last_poll, interval = Status.PENDING, T0, None, dl.INTERVAL
    expires_at = T0 + 120
    approvals = tokens = 0
    for kind, step in events:
        now += step
        if kind == "poll":
            d = decide_poll(PollState(status, expires_at, last_poll, interval), now)
            status, last_poll, interval = d.status, now, d.interval
            tokens += d.reported == "approved"
            assert interval <= dl.MAX_INTERVAL
            continue
        event = Event.APPROVE if kind == "approve" else Event.DENY
        try:
            status = transition(effective_status(status, expires_at, now), event)
        except InvalidTransition:
            continue
        approvals += event is Event.APPROVE
    assert approvals <= 1 and tokens <= approvals


def test_poll_decisions() -> None:
    fresh = PollState(Status.PENDING, T0 + 600, None, 5)
    assert decide_poll(fresh, T0).reported == "pending"
    soon = PollState(Status.PENDING, T0 + 600, T0, 5)
    slow = decide_poll(soon, T0 + 4.9)
    assert (slow.reported, slow.interval) == ("slow_down", 10)  # RFC 8628 §3.5: +5 s
    assert decide_poll(soon, T0 + 5).reported == "pending"
    ok = decide_poll(PollState(Status.APPROVED, T0 + 600, T0, 5), T0 + 5)
    assert (ok.reported, ok.status) == ("approved", Status.CONSUMED)
    assert decide_poll(PollState(Status.CONSUMED, T0 + 600, T0, 5), T0 + 9).reported == "expired"
    assert decide_poll(PollState(Status.DENIED, T0 + 600, T0, 5), T0 + 9).reported == "denied"
    assert decide_poll(PollState(Status.PENDING, T0 + 600, None, 5), T0 + 600).reported == (
        "expired"
    )


# -- guess limiter ------------------------------------------------------------------------


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(capacity=2, rate=0.5)
    assert bucket.take(T0) and bucket.take(T0) and not bucket.take(T0)
    assert not bucket.take(T0 + 1.9)
    assert bucket.take(T0 + 2.0)
    assert bucket.full(T0 + 100)


def test_limiter_per_source_then_recovers() -> None:
    limiter = GuessLimiter(source_burst=3, source_rate=0.1, global_burst=100, global_rate=10)
    for _ in range(3):
        limiter.check("192.0.2.1", T0)
    with pytest.raises(TooManyGuesses) as err:
        limiter.check("192.0.2.1", T0)
    assert err.value.status == 429 and "too many" in err.value.message
    limiter.check("192.0.2.2", T0)  # another source is not affected
    limiter.check("192.0.2.1", T0 + 10)


def test_limiter_global_bound_across_sources() -> None:
    limiter = GuessLimiter(source_burst=5, source_rate=1, global_burst=10, global_rate=1)
    for i in range(10):
        limiter.check(f"198.51.100.{i}", T0)
    with pytest.raises(TooManyGuesses):
        limiter.check("203.0.113.1", T0)


def test_limiter_memory_is_bounded() -> None:
    limiter = GuessLimiter(max_sources=4, global_burst=1000)
    for i in range(50):
        limiter.check(f"src-{i}", T0 + i)
    assert len(limiter._sources) <= 4


@given(st.lists(st.tuples(st.integers(0, 3), st.floats(0, 5)), max_size=200))
def test_limiter_never_admits_more_than_the_global_budget(
    guesses: list[tuple[int, float]],
) -> None:
    limiter = GuessLimiter(source_burst=4, source_rate=1, global_burst=6, global_rate=0.5)
    now, admitted = T0, 0
    for source, step in guesses:
        now += step
        try:
            limiter.check(str(source), now)
        except TooManyGuesses:
            continue
        admitted += 1
    assert admitted <= 6 + 0.5 * (now - T0) + 1e-9
