"""The agent's inbound packet filter: what each peer may open on this device (nftables).

:func:`render` is pure: from the interface name and each peer's source
addresses (its allowed IPs: WireGuard only accepts those from that peer) and
``filter`` (see :mod:`wiregate.ports`; None: everything) it writes one
nftables script that atomically replaces the table ``inet wiregate``::

    table inet wiregate
    delete table inet wiregate
    table inet wiregate {
        counter dropped { }
        chain input   { type filter hook input priority filter; policy accept;
                        iifname "wg0" jump from_tunnel }
        chain forward { type filter hook forward priority filter; policy accept;
                        iifname "wg0" jump from_tunnel }
        chain from_tunnel {
            ct state established,related accept
            ip saddr { 100.64.0.2 } tcp dport 5432 accept
            ...
            counter name "dropped" drop
        }
    }

Only packets arriving from the tunnel are judged: replies to this device's own
connections pass, each peer's new connections pass to what its filter allows,
everything else from the tunnel is dropped and counted (``dropped``).

:class:`Firewall` applies the script with ``nft -f -`` (content on stdin, never
in argv), only when it changed (or when asked to repair), and deletes the table
on teardown. Without ``nft`` the agent keeps running and reports that the
filter is not enforced.
"""

from __future__ import annotations

import ipaddress
import subprocess
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

from agent.dataplane.mss import mss_chains
from wiregate.errors import DataPlaneError
from wiregate.logging import get_logger
from wiregate.model import NetMap
from wiregate.ports import PortSpec, parse_port

__all__ = [
    "TABLE",
    "Firewall",
    "NftMissing",
    "PeerRule",
    "Rendered",
    "peer_rules",
    "render",
    "run_nft",
]

TABLE = "wiregate"
NOT_ENFORCED = "packet filter not enforced"
_ICMP = {4: "icmp", 6: "ipv6-icmp"}
_FAMILY = {4: "ip", 6: "ip6"}

log = get_logger("agent.firewall")


class NftMissing(DataPlaneError):
    """The ``nft`` binary is not installed (or not executable)."""


@dataclass(frozen=True, slots=True)
class PeerRule:
    """One peer's sources and what they may open (None: everything; (): nothing)."""

    name: str
    sources: tuple[str, ...]
    filter: tuple[str, ...] | None
    path_mtu: int | None = None  # the probed path MTU through the tunnel (MSS clamp)


@dataclass(frozen=True, slots=True)
class Rendered:
    """The nftables script, whether any peer is restricted, and entries that were skipped."""

    script: str
    restricted: bool
    problems: tuple[str, ...] = ()


def peer_rules(
    netmap: NetMap,
    keys: Collection[str] | None = None,
    path_mtu: Mapping[str, int] | None = None,
) -> tuple[PeerRule, ...]:
    """Each peer of ``netmap`` as a :class:`PeerRule`, in device-id order.

    ``keys``: the public keys of the peers actually configured (a peer the agent
    refused gets no rule, so it cannot lend its allowance to addresses another
    peer carries). ``path_mtu``: probed path MTUs by public key.
    """
    mtus = path_mtu or {}
    return tuple(
        PeerRule(peer.name, peer.allowed_ips, peer.filter, mtus.get(peer.public_key))
        for _, peer in sorted(netmap.peers.items())
        if keys is None or peer.public_key in keys
    )


def render(interface: str, peers: Iterable[PeerRule], *, clamp: bool = False) -> Rendered:
    """The script that replaces ``table inet wiregate`` with these peers' rules.

    ``clamp``: also clamp the MSS of TCP SYNs through the tunnel (:mod:`agent.dataplane.mss`).
    """
    lines: list[str] = []
    problems: list[str] = []
    restricted = False
    peers = tuple(peers)
    for peer in peers:
        restricted = restricted or peer.filter is not None
        lines.extend(_peer_lines(peer, problems))
    body = "".join(f"\t\t{line}\n" for line in lines)
    clamps = mss_chains(interface, [(p.sources, p.path_mtu) for p in peers]) if clamp else ""
    hook = f'\t\tiifname "{interface}" jump from_tunnel\n'
    script = (
        f"table inet {TABLE}\n"
        f"delete table inet {TABLE}\n"
        f"table inet {TABLE} {{\n"
        "\tcounter dropped {\n\t}\n"
        "\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n"
        f"{hook}\t}}\n"
        "\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n"
        f"{hook}\t}}\n"
        "\tchain from_tunnel {\n\t\tct state established,related accept\n"
        f'{body}\t\tcounter name "dropped" drop\n\t}}\n'
        f"{clamps}}}\n"
    )
    return Rendered(script, restricted, tuple(problems))


def _peer_lines(peer: PeerRule, problems: list[str]) -> list[str]:
    by_family: dict[int, list[str]] = {4: [], 6: []}
    for source in peer.sources:
        try:
            net = ipaddress.ip_network(source, strict=False)
        except ValueError:
            problems.append(f"filter: peer {peer.name}: bad source {source!r} skipped")
            continue
        by_family[net.version].append(str(net))
    specs = _specs(peer, problems)
    lines = []
    for family, nets in by_family.items():
        if not nets:
            continue
        match = f"{_FAMILY[family]} saddr {{ {', '.join(sorted(set(nets)))} }}"
        if specs is None:
            lines.append(f"{match} accept")
        else:
            lines.extend(f"{match} {_match_port(spec, family)} accept" for spec in specs)
    return lines


def _specs(peer: PeerRule, problems: list[str]) -> list[PortSpec] | None:
    if peer.filter is None:
        return None
    specs = []
    for text in peer.filter:
        try:
            specs.append(parse_port(text))
        except ValueError as exc:  # more restrictive: the entry allows nothing
            problems.append(f"filter: peer {peer.name}: {exc}; skipped")
    return specs


def _match_port(spec: PortSpec, family: int) -> str:
    if spec.proto == "icmp":
        return f"meta l4proto {_ICMP[family]}"
    if spec.low is None:
        return f"meta l4proto {spec.proto}"
    ports = str(spec.low) if spec.low == spec.high else f"{spec.low}-{spec.high}"
    return f"{spec.proto} dport {ports}"


Runner = Callable[[str], None]


def run_nft(script: str, binary: str = "nft") -> None:
    """Run ``nft -f -`` with ``script`` on stdin; raise NftMissing or DataPlaneError."""
    try:
        done = subprocess.run(  # fixed argv; the ruleset goes to stdin
            [binary, "-f", "-"], input=script, capture_output=True, text=True, timeout=15
        )
    except FileNotFoundError:
        raise NftMissing(f"{binary} not found", hint="install nftables") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataPlaneError(f"nft failed to run: {exc}") from None
    if done.returncode != 0:
        raise DataPlaneError(f"nft refused the ruleset: {done.stderr.strip()[:300]}")


class Firewall:
    """Keeps ``table inet wiregate`` equal to the rendering of the last map."""

    def __init__(self, interface: str, runner: Runner | None = None, *, clamp: bool = True) -> None:
        self.interface = interface
        self._run = runner or run_nft
        self._applied: str | None = None
        self.enforced = False
        self.clamp = clamp  # MSS clamping of TCP SYNs through the tunnel
        self.path_mtu: dict[str, int] = {}  # probed path MTU by peer public key (MSS clamp)

    def apply(
        self, netmap: NetMap, *, keys: Collection[str] | None = None, repair: bool = False
    ) -> tuple[str, ...]:
        """Bring the table to ``netmap`` (its peers with ``keys``); return problems.

        Never raises for a missing or failing ``nft``: that is a problem to report.
        """
        rules = peer_rules(netmap, keys, self.path_mtu)
        rendered = render(self.interface, rules, clamp=self.clamp)
        if rendered.script == self._applied and not repair:
            return rendered.problems
        try:
            self._run(rendered.script)
        except NftMissing as exc:
            self._applied, self.enforced = None, False
            if not rendered.restricted:
                return rendered.problems
            return (*rendered.problems, f"{NOT_ENFORCED}: {exc.message} ({exc.hint})")
        except DataPlaneError as exc:
            self._applied, self.enforced = None, False
            log.warning("packet filter not applied", error=exc.message)
            return (*rendered.problems, f"{NOT_ENFORCED}: {exc.message}")
        self._applied, self.enforced = rendered.script, True
        return rendered.problems

    def teardown(self) -> None:
        """Delete the table (nothing to do if it, or nft, is not there)."""
        self._applied, self.enforced = None, False
        try:
            self._run(f"table inet {TABLE}\ndelete table inet {TABLE}\n")
        except NftMissing:
            return
        except DataPlaneError as exc:
            log.warning("packet filter not removed", error=exc.message)
