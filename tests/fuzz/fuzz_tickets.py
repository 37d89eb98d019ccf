"""Coverage-guided fuzzing of relay tickets (relay/tickets.py).

The first byte chooses what the rest is: a ticket as received (odd), or a
ticket body that the harness signs with the trusted key before parsing
(even), so that the decoder and the claim checks behind the signature are
fuzzed too. Properties: only :class:`TicketError` is raised, and an accepted
ticket is exactly what ``sign_ticket`` makes of its claims (one encoding per
ticket: nothing unsigned, nothing ambiguous).
"""

from __future__ import annotations

import atheris
from _harness import PROJECT, fuzz
from nacl.signing import SigningKey

with atheris.instrument_imports(include=PROJECT):
    from relay.errors import TicketError
    from relay.tickets import DOMAIN, Node, TrustedSigner, issue_pair, parse_ticket, sign_ticket
    from wiregate.keys import encode_key, public_from_private

KEY = SigningKey(bytes(range(32)))
TRUSTED = [TrustedSigner(bytes(KEY.verify_key), frozenset({"acme", "t"}))]
RELAY, NOW = "relay-1", 1_700_000_000.0


def _node(name: str, seed: int) -> Node:
    return Node(name, encode_key(public_from_private(bytes([seed]) * 32)))


def seeds() -> list[bytes]:
    a, b = _node("dev-a", 1), _node("dev-b", 2)
    out = []
    for tenant, lifetime in (("acme", 120), ("t", 300)):
        pair = issue_pair(KEY, relay_id=RELAY, tenant=tenant, node_a=a, node_b=b, now=NOW,
                          lifetime=lifetime)  # fmt: skip
        for ticket in pair:
            out += [b"\x01" + ticket, b"\x00" + ticket[:-64]]
    return out


def test_one_input(data: bytes) -> None:
    if not data:
        return
    ticket = data[1:]
    if data[0] % 2 == 0:
        ticket += KEY.sign(DOMAIN + ticket).signature
    try:
        parsed = parse_ticket(ticket, TRUSTED, NOW, relay_id=RELAY)
    except TicketError:
        return
    assert sign_ticket(parsed, KEY) == ticket, "an accepted ticket is not its claims' encoding"


if __name__ == "__main__":
    fuzz(test_one_input, seeds())
