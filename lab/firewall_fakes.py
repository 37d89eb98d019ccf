"""Peers with packet filters, and an in-memory nftables standing in for :class:`wiregate.nft.Nft`.

:class:`FakeNft` keeps ``table inet wiregate`` as the agent's scripts leave it:
the table created by :func:`agent.dataplane.filterset.table_script`, elements
added and deleted as nftables does (a whole script is one transaction; deleting
an element that is not there refuses it and changes nothing), and answers
``list table`` in nftables' JSON shape (protocols by name, prefixes and ranges
as objects), so the agent's reading back is exercised. The real nftables is
exercised by the lab tests.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from agent.dataplane.backend import MemoryBackend
from agent.dataplane.facade import DataPlane
from agent.dataplane.firewall import Firewall, NftMissing
from lab.dataplane_fakes import IFACE, PRIVATE, MemoryLinks
from wiregate.model import NetMap, Peer, SelfView
from wiregate.nft import NftError

_NAMES = {"6": "tcp", "17": "udp", "1": "icmp", "58": "ipv6-icmp"}
_TYPEOF = {
    "ip daddr": "ipv4_addr",
    "ip6 daddr": "ipv6_addr",
    "meta l4proto": "inet_proto",
    "meta nfproto": "nf_proto",
}


def peer(n: int, filter: tuple[str, ...] | None, *extra: str) -> Peer:
    cidrs = (f"100.64.0.{n}/32", f"fd7a::{n}/128")
    return Peer(f"d{n}", f"host{n}", f"{n:043d}=", cidrs, cidrs + extra, filter=filter)


def netmap(*peers: Peer) -> NetMap:
    me = SelfView("d1", "me", f"{1:043d}=", ("100.64.0.1/32",))
    return NetMap(1, me, {p.id: p for p in peers})


def filtered_dataplane(nft: FakeNft) -> DataPlane:
    """A set-up DataPlane on an in-memory WireGuard and link layer, its filter on ``nft``."""
    backend = MemoryBackend()
    backend.create(IFACE)
    dp = DataPlane(
        interface=IFACE, private_key=PRIVATE, listen_port=51820, fwmark=0xCA6C, table=51820,
        rule_priority=5210, mtu=1420, run_dir=Path("/nonexistent"), wireguard=backend,
        links=MemoryLinks(), firewall=Firewall(IFACE, nft),
    )  # fmt: skip
    dp.setup()
    return dp


class FakeNft:
    """An in-memory ``inet wiregate`` table driven by nftables scripts."""

    def __init__(self, *, missing: bool = False) -> None:
        self.missing = missing
        self.refuse: str | None = None  # the next run fails with this message
        self.scripts: list[str] = []
        self.queries = 0
        self.types: dict[str, list[str]] | None = None  # set name -> field types; None: no table
        self.kinds: dict[str, str] = {}  # set name -> "set" or "map"
        self.chains: dict[str, list[str]] = {}
        self.elements: dict[str, set[str]] = {}

    # --- the NftLike interface ---------------------------------------------------

    def run(self, script: str) -> None:
        if self.missing:
            raise NftMissing("nftables not found", hint="install nftables")
        self.scripts.append(script)
        if self.refuse is not None:
            message, self.refuse = self.refuse, None
            raise NftError(message)
        saved = copy.deepcopy((self.types, self.kinds, self.chains, self.elements))
        try:
            self._run(script)
        except NftError:
            self.types, self.kinds, self.chains, self.elements = saved
            raise

    def query_json(self, command: str) -> dict[str, Any]:
        if self.missing:
            raise NftMissing("nftables not found", hint="install nftables")
        self.queries += 1
        if command != "list table inet wiregate":
            raise NftError(f"FakeNft does not list {command!r}")
        if self.types is None:
            raise NftError("Error: No such file or directory")
        items: list[dict[str, Any]] = [{"metainfo": {"json_schema_version": 1}}]
        items.append({"table": {"family": "inet", "name": "wiregate", "handle": 1}})
        for name, types in self.types.items():
            body: dict[str, Any] = {"family": "inet", "name": name, "table": "wiregate"}
            body["type"] = types[0] if len(types) == 1 else types
            if self.elements[name]:
                body["elem"] = [self._elem(text, types) for text in sorted(self.elements[name])]
            items.append({self.kinds[name]: body})
        for chain, rules in self.chains.items():
            items.append({"chain": {"family": "inet", "table": "wiregate", "name": chain}})
            items += [{"rule": {"chain": chain, "expr": rule}} for rule in rules]
        return {"nftables": items}

    # --- what a test does to the "kernel" ----------------------------------------

    def tamper(self) -> None:
        """Delete the filter's last rule (as an administrator's ``nft delete rule`` would)."""
        self.chains["from_tunnel"].pop()

    # --- the script interpreter ----------------------------------------------------

    def _run(self, script: str) -> None:
        lines = script.splitlines()
        i = 0
        while i < len(lines):
            line = lines[i]
            if line == "table inet wiregate":
                i += 1
            elif line == "delete table inet wiregate":
                self.types, self.kinds, self.chains, self.elements = None, {}, {}, {}
                i += 1
            elif line == "table inet wiregate {":
                i = self._create(lines, i + 1)
            elif line.startswith(("add element inet wiregate ", "delete element inet wiregate ")):
                self._element(line)
                i += 1
            else:
                raise NftError(f"FakeNft: unexpected line {line!r}")

    def _create(self, lines: list[str], i: int) -> int:
        self.types, self.kinds, self.chains, self.elements = {}, {}, {}, {}
        while lines[i] != "}":
            kind, name, _ = lines[i].split()
            body = []
            i += 1
            while lines[i] != "\t}":
                body.append(lines[i].strip())
                i += 1
            i += 1
            if kind in ("set", "map"):
                self.kinds[name], self.types[name] = kind, _types(body[0])
                self.elements[name] = set()
            elif kind == "chain":
                self.chains[name] = body
        return i + 1

    def _element(self, line: str) -> None:
        verb, _, _, _, name, rest = line.split(" ", 5)
        if self.types is None or name not in self.elements:
            raise NftError(f"Error: No such file or directory ({name})")
        texts = rest.strip().removeprefix("{").removesuffix("}").strip().split(", ")
        for text in texts:
            if verb == "add":
                self.elements[name].add(text)
            elif text in self.elements[name]:
                self.elements[name].discard(text)
            else:
                raise NftError(f"Error: Could not process rule: No such file or directory ({text})")

    @staticmethod
    def _elem(text: str, types: list[str]) -> Any:
        key, _, value = text.partition(" : ")
        fields = [_field(f, t) for f, t in zip(key.split(" . "), types, strict=True)]
        shaped: Any = fields[0] if len(fields) == 1 else {"concat": fields}
        return [shaped, int(value)] if value else shaped


def _types(declaration: str) -> list[str]:
    head = declaration.split(";")[0]
    if head.startswith("typeof "):
        key = head.removeprefix("typeof ").split(" : ")[0]
        return [_TYPEOF[part] for part in key.split(" . ")]
    return head.removeprefix("type ").split(" . ")


def _field(text: str, kind: str) -> Any:
    if "/" in text:
        addr, length = text.split("/")
        return {"prefix": {"addr": addr, "len": int(length)}}
    if kind in ("inet_proto", "inet_service") and "-" in text:
        low, high = text.split("-")
        return {"range": [int(low), int(high)]}
    if kind == "inet_proto":
        return _NAMES.get(text, int(text))
    if kind == "inet_service":
        return int(text)
    return text
