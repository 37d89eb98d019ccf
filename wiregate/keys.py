"""WireGuard key codec: parse, validate and generate Curve25519 keys (pure).

A public key from the network is accepted only if it is 32 bytes of standard
base64, not all-zero and not one of the small-order points of Curve25519
(which would make every shared secret predictable).
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from nacl.public import PrivateKey

from wiregate.errors import BadKey

__all__ = [
    "KEY_LEN",
    "decode_key",
    "encode_key",
    "fingerprint",
    "generate_private_key",
    "parse_public_key",
    "public_from_private",
]

KEY_LEN = 32

# Curve25519 points of small order (and their non-canonical encodings), as
# listed by libsodium's blocklist for crypto_scalarmult.
_LOW_ORDER = frozenset(
    bytes.fromhex(h)
    for h in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)


def decode_key(text: str) -> bytes:
    """Decode a base64 key into 32 bytes, or raise :class:`BadKey`."""
    if not isinstance(text, str) or len(text) != 44:
        raise BadKey("a WireGuard key is 44 characters of base64 (32 bytes)")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadKey("a WireGuard key must be standard base64") from exc
    if len(raw) != KEY_LEN:
        raise BadKey("a WireGuard key is 32 bytes")
    return raw


def encode_key(raw: bytes) -> str:
    """Encode 32 raw bytes as base64 text."""
    if len(raw) != KEY_LEN:
        raise BadKey("a WireGuard key is 32 bytes")
    return base64.b64encode(raw).decode("ascii")


def parse_public_key(text: str) -> str:
    """Validate a public key from the network; return its canonical base64 form."""
    raw = decode_key(text)
    masked = raw[:31] + bytes([raw[31] & 0x7F])
    if raw in _LOW_ORDER or masked in _LOW_ORDER:
        raise BadKey("public key is all-zero or a low-order point")
    return encode_key(raw)


def generate_private_key() -> bytes:
    """A fresh X25519 private key (clamped by libsodium's scalar mult on use)."""
    return bytes(PrivateKey.generate())


def public_from_private(private: bytes) -> bytes:
    """The public key of a private key."""
    return bytes(PrivateKey(private).public_key)


def fingerprint(public_key_b64: str) -> str:
    """A short, human-comparable fingerprint of a public key (SHA-256, 8 groups)."""
    digest = hashlib.sha256(decode_key(public_key_b64)).hexdigest()[:32]
    return ":".join(digest[i : i + 4] for i in range(0, 32, 4))
