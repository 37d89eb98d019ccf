"""Device login (RFC 8628 style): user codes, poll tokens, states and a guess limiter.

Pure: no I/O, every time is passed in. The gateway's store and API build on it.

A person runs ``wiregate login``; the CLI asks the gateway for a login request
and shows a *user code* (8 characters from :data:`ALPHABET`, shown
``XXXX-XXXX``, 20**8 ≈ 2**34.6 codes) and a URL. The approver types the code
after signing in; the CLI polls with its *poll token* (32 random bytes, stored
hashed) no faster than :data:`INTERVAL` seconds, or it is told ``slow_down``
and its interval grows by 5 s (RFC 8628 §3.5).

Every state change is in :data:`TRANSITIONS`::

    pending ──approve──▶ approved ──collect──▶ consumed
       │  └───deny────▶ denied
       └──────expire──▶ expired ◀──expire── approved

A request is approved at most once and its device token collected at most once:
a transition is only legal from the state in the table, and the store applies
it as a compare-and-set. User-code lookups are charged to a :class:`GuessLimiter`
(per source and global token buckets), which bounds brute force of the codes.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from enum import StrEnum

from wiregate.errors import BadInput, Conflict, RemoteError

__all__ = [
    "ALPHABET",
    "INTERVAL",
    "LIFETIME",
    "MAX_INTERVAL",
    "POLL_TOKEN_PREFIX",
    "SLOW_DOWN_STEP",
    "TRANSITIONS",
    "USER_CODE_LEN",
    "Event",
    "GuessLimiter",
    "InvalidTransition",
    "PollDecision",
    "PollState",
    "Status",
    "TokenBucket",
    "TooManyGuesses",
    "decide_poll",
    "effective_status",
    "format_user_code",
    "generate_poll_token",
    "generate_user_code",
    "normalize_user_code",
    "transition",
]

ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"  # no vowels (no words), no 0/O, 1/I/L confusions
USER_CODE_LEN = 8
LIFETIME = 600.0  # seconds a login request stays usable
INTERVAL = 5  # seconds between polls (RFC 8628 §3.2 default)
SLOW_DOWN_STEP = 5  # RFC 8628 §3.5: add 5 s on every slow_down
MAX_INTERVAL = 60
POLL_TOKEN_PREFIX = "wgp_"  # noqa: S105 (a prefix, not a secret)
_SEPARATORS = str.maketrans("", "", "- \t")


class Status(StrEnum):
    """Where a login request is."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    CONSUMED = "consumed"


class Event(StrEnum):
    """What can happen to a login request."""

    APPROVE = "approve"
    DENY = "deny"
    EXPIRE = "expire"
    COLLECT = "collect"  # the device's poll picks up its token


TRANSITIONS: dict[tuple[Status, Event], Status] = {
    (Status.PENDING, Event.APPROVE): Status.APPROVED,
    (Status.PENDING, Event.DENY): Status.DENIED,
    (Status.PENDING, Event.EXPIRE): Status.EXPIRED,
    (Status.APPROVED, Event.COLLECT): Status.CONSUMED,
    (Status.APPROVED, Event.EXPIRE): Status.EXPIRED,
}


class InvalidTransition(Conflict):
    """An event that is not legal in the request's current state (HTTP 409)."""

    code = "login_request_not_pending"


class TooManyGuesses(RemoteError):
    """Too many user-code lookups (HTTP 429); nothing was looked up or changed."""

    status = 429
    code = "too_many_guesses"


def transition(status: Status, event: Event) -> Status:
    """The state after ``event``, or :class:`InvalidTransition`."""
    after = TRANSITIONS.get((status, event))
    if after is None:
        raise InvalidTransition(f"the login request is {status.value}; it cannot {event.value}")
    return after


def effective_status(status: Status, expires_at: float, now: float) -> Status:
    """``status``, or expired when the request's lifetime is over and it can expire."""
    if now >= expires_at and (status, Event.EXPIRE) in TRANSITIONS:
        return Status.EXPIRED
    return status


# -- codes and tokens ----------------------------------------------------------------


def generate_user_code() -> str:
    """A fresh user code in canonical form (8 characters of :data:`ALPHABET`, no dash)."""
    return "".join(secrets.choice(ALPHABET) for _ in range(USER_CODE_LEN))


def format_user_code(code: str) -> str:
    """The displayed form of a canonical code, ``XXXX-XXXX``."""
    half = USER_CODE_LEN // 2
    return f"{code[:half]}-{code[half:]}"


def normalize_user_code(text: str) -> str:
    """The canonical form of what a person typed (any case, dashes, spaces), or BadInput."""
    code = text.translate(_SEPARATORS).upper()
    if len(code) != USER_CODE_LEN or any(c not in ALPHABET for c in code):
        raise BadInput(
            "that is not a login code",
            code="invalid_user_code",
            hint="type the 8-letter code the device shows, like BCDF-GHJK",
        )
    return code


def generate_poll_token() -> str:
    """A fresh poll token, ``wgp_`` + 32 random bytes (urlsafe base64); stored hashed."""
    return POLL_TOKEN_PREFIX + secrets.token_urlsafe(32)


# -- polling ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PollState:
    """What a poll decision needs from a stored request."""

    status: Status
    expires_at: float
    last_poll_at: float | None
    interval: int


@dataclass(frozen=True, slots=True)
class PollDecision:
    """The answer to a poll: the status to report, the new status and interval to store."""

    reported: str  # pending | slow_down | approved | denied | expired
    status: Status
    interval: int


def decide_poll(state: PollState, now: float) -> PollDecision:
    """Decide a poll at ``now`` (RFC 8628 §3.5).

    An expired request reports ``expired``; polling sooner than the interval
    reports ``slow_down`` and adds 5 s to the interval; an approved request moves
    to consumed (its token is handed out this once); a consumed one reports
    ``expired`` like any spent request.
    """
    status = effective_status(state.status, state.expires_at, now)
    if status is Status.EXPIRED or status is Status.CONSUMED:
        return PollDecision("expired", status, state.interval)
    if status is Status.DENIED:
        return PollDecision("denied", status, state.interval)
    too_soon = state.last_poll_at is not None and now - state.last_poll_at < state.interval
    if too_soon:
        interval = min(state.interval + SLOW_DOWN_STEP, MAX_INTERVAL)
        return PollDecision("slow_down", status, interval)
    if status is Status.APPROVED:
        return PollDecision("approved", transition(status, Event.COLLECT), state.interval)
    return PollDecision("pending", status, state.interval)


# -- guess limiter ------------------------------------------------------------------


@dataclass(slots=True)
class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second; a take costs one."""

    capacity: float
    rate: float
    tokens: float = field(init=False)
    updated: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.tokens = self.capacity

    def take(self, now: float) -> bool:
        """Spend one token at ``now`` if there is one."""
        self._refill(now)
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled completely (it can be forgotten)."""
        self._refill(now)
        return self.tokens >= self.capacity

    def _refill(self, now: float) -> None:
        if self.updated is None:
            self.updated = now
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate)
        self.updated = max(self.updated, now)


@dataclass(slots=True)
class GuessLimiter:
    """Bounds user-code lookups per source and in total.

    With the defaults, at most ``global_burst + global_rate * LIFETIME`` = 1260
    guesses reach the store during one request's lifetime, so with P pending
    requests a guesser's chance is below 1260 * P / 20**8 (5e-8 per pending code).
    """

    source_burst: float = 10.0
    source_rate: float = 1 / 30
    global_burst: float = 60.0
    global_rate: float = 2.0
    max_sources: int = 10_000
    _sources: dict[str, TokenBucket] = field(default_factory=dict)
    _global: TokenBucket | None = None

    def check(self, source: str, now: float) -> None:
        """Charge one guess to ``source``; :class:`TooManyGuesses` when over a limit."""
        bucket = self._bucket(source, now)
        if not bucket.take(now):
            raise TooManyGuesses(
                "too many login code attempts from here",
                hint="wait a minute, then type the code exactly as the device shows it",
            )
        if self._global is None:
            self._global = TokenBucket(self.global_burst, self.global_rate)
        if not self._global.take(now):
            raise TooManyGuesses(
                "too many login code attempts right now", hint="wait a minute and try again"
            )

    def _bucket(self, source: str, now: float) -> TokenBucket:
        bucket = self._sources.get(source)
        if bucket is None:
            if len(self._sources) >= self.max_sources:
                self._forget_full(now)
            bucket = self._sources[source] = TokenBucket(self.source_burst, self.source_rate)
        return bucket

    def _forget_full(self, now: float) -> None:
        for key in [k for k, b in self._sources.items() if b.full(now)]:
            del self._sources[key]
        while len(self._sources) >= self.max_sources:  # all busy: drop the oldest
            del self._sources[next(iter(self._sources))]
