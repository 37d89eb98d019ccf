"""Enrollment key secrets: format, hashing, constant-time compare, usability at `now`."""

from __future__ import annotations

import base64
import hmac

import pytest

from identity import enrollment
from identity.enrollment import (
    KeyState,
    check_usable,
    generate_device_token,
    generate_secret,
    hash_secret,
    secret_matches,
)
from wiregate.errors import Unauthorized

T0 = 1_700_000_000.0


def test_secret_is_prefixed_32_random_bytes() -> None:
    secret = generate_secret()
    assert secret.startswith("wgk_")
    assert len(base64.urlsafe_b64decode(secret[4:] + "=")) == 32
    assert generate_secret() != secret


def test_device_token_is_prefixed_32_random_bytes() -> None:
    token = generate_device_token()
    assert token.startswith("wgd_")
    assert len(base64.urlsafe_b64decode(token[4:] + "=")) == 32


def test_hash_is_not_the_secret_and_matches() -> None:
    secret = generate_secret()
    stored = hash_secret(secret)
    assert secret not in stored and len(stored) == 64
    assert secret_matches(secret, stored)
    assert not secret_matches(secret + "x", stored)


def test_compare_is_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return original(a, b)

    monkeypatch.setattr(enrollment.hmac, "compare_digest", spy)
    secret = generate_secret()
    assert secret_matches(secret, hash_secret(secret))
    assert len(calls) == 1


def state(**kw: object) -> KeyState:
    base: dict[str, object] = {
        "expires_at": T0 + 60,
        "reusable": False,
        "used_count": 0,
        "revoked": False,
    }
    base.update(kw)
    return KeyState(**base)  # type: ignore[arg-type]


def test_fresh_key_is_usable_until_just_before_expiry() -> None:
    check_usable(state(), T0)
    check_usable(state(), T0 + 59.999)


@pytest.mark.parametrize("now", [T0 + 60, T0 + 61, T0 + 10**9])
def test_expired_at_and_after_expiry(now: float) -> None:
    with pytest.raises(Unauthorized):
        check_usable(state(), now)


@pytest.mark.parametrize(
    "key",
    [None, state(revoked=True), state(used_count=1), state(reusable=True, revoked=True)],
    ids=["unknown", "revoked", "single-use-spent", "reusable-revoked"],
)
def test_refusals_share_one_message(key: KeyState | None) -> None:
    with pytest.raises(Unauthorized) as info:
        check_usable(key, T0)
    assert info.value.status == 401
    assert info.value.message == "enrollment key is not valid"


def test_reusable_key_survives_use() -> None:
    check_usable(state(reusable=True, used_count=7), T0)
