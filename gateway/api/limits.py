"""Who is asking, and what they may spend: the client address behind trusted proxies
and the rate limits of device login, shared by every replica through the store.

- **Login requests** (``POST /api/v1/login/requests``, no sign-in): a bucket per
  source (:data:`LOGIN_SOURCE`), and a fair share of the pending cap
  (:func:`gateway.store.logins.make_room`).
- **User-code lookups** (show, approve, deny; API and pages): a bucket per identity
  (the signed-in person, ``admin:token``, ``admin:socket``), one per source, and for
  people a global one that bounds brute force of the codes. Admins are not charged
  to the global bucket, so guessing by people cannot lock an admin out. With the
  global bucket at most 60 + 2 * 600 = 1260 guesses reach the store during one
  request's 10-minute life: with P requests pending a guesser's odds stay below
  1260 * P / 20**8.

A source is the client's address (an IPv6 client's /64): the TCP peer, or, when
the peer is in ``trusted_proxies``, the rightmost ``X-Forwarded-For`` hop that is
not a trusted proxy.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache

from aiohttp import web

from gateway.appkeys import SETTINGS, STORE
from gateway.store.limits import Bucket
from identity.device_login import TooManyGuesses

__all__ = [
    "GUESS_GLOBAL",
    "GUESS_IDENTITY",
    "GUESS_SOURCE",
    "LOGIN_SOURCE",
    "charge_guess",
    "charge_login_request",
    "client_source",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_WAIT = "wait a minute, then type the code exactly as the device shows it"
GUESS_CODE = TooManyGuesses.code

LOGIN_SOURCE = Bucket("login.source", 10, 1 / 30, "too many device logins from this address",
                      "wait a minute and try again", "too_many_logins")  # fmt: skip
GUESS_IDENTITY = Bucket("guess.identity", 10, 1 / 30, "too many login code attempts by you",
                        _WAIT, GUESS_CODE)  # fmt: skip
GUESS_SOURCE = Bucket("guess.source", 30, 1 / 10, "too many login code attempts from here",
                      _WAIT, GUESS_CODE)  # fmt: skip
GUESS_GLOBAL = Bucket("guess.global", 60, 2.0, "too many login code attempts right now",
                      "wait a minute and try again", GUESS_CODE)  # fmt: skip


async def charge_login_request(request: web.Request) -> str:
    """Charge a new login request to its source; the source (stored with the request)."""
    source = client_source(request)
    await request.app[STORE].charge([(LOGIN_SOURCE, source)])
    return source


async def charge_guess(request: web.Request, who: str, *, admin: bool) -> None:
    """Charge one user-code lookup by ``who`` (an audit actor); 429 past any bucket."""
    charges = [(GUESS_IDENTITY, who), (GUESS_SOURCE, client_source(request))]
    if not admin:
        charges.append((GUESS_GLOBAL, "all"))
    await request.app[STORE].charge(charges)


def client_source(request: web.Request) -> str:
    """The client's address as a rate-limit key: IPv4, an IPv6 /64, or ``local``."""
    address = client_address(request)
    if address is None:
        return "local"
    if address.version == 6:
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return str(address)


def client_address(request: web.Request) -> IPAddress | None:
    """The TCP peer, or behind trusted proxies the rightmost ``X-Forwarded-For`` hop
    that is not one of them (None on the unix socket)."""
    peer = _parse(request.remote)
    trusted = _networks(tuple(request.app[SETTINGS].trusted_proxies))
    if peer is None or not _within(peer, trusted):
        return peer
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", []) for h in v.split(",")]
    for hop in reversed(hops):
        address = _parse(hop)
        if address is None:  # a trusted proxy passed on garbage: stop at what it was
            return peer
        peer = address
        if not _within(address, trusted):
            return address
    return peer


def _parse(text: str | None) -> IPAddress | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def _within(address: IPAddress, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == n.version and address in n for n in networks)
