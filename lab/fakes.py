"""Fakes shared by the unit tests: an injectable clock and fresh WireGuard keys."""

from __future__ import annotations

from wiregate.keys import encode_key, generate_private_key, public_from_private

T0 = 1_700_000_000.0


class FakeClock:
    """An injected clock: ``clock()`` is ``now``; tests set it or ``advance`` it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def new_key() -> str:
    """A fresh, valid WireGuard public key (base64)."""
    return encode_key(public_from_private(generate_private_key()))
