"""TCP MSS clamping through the tunnel: the chains :mod:`agent.dataplane.firewall` adds.

Pure rendering, part of the one ``table inet wiregate`` script. TCP SYNs and
SYN-ACKs crossing the WireGuard interface have their MSS option lowered (never
raised: the kernel only ever lowers ``maxseg``):

* leaving through the tunnel (forwarded and locally sent): to the route MTU
  (``rt mtu``: the tunnel MTU, or a route's own ``mtu``), and for a peer whose
  path MTU was probed (:mod:`agent.pmtu.search`) to that path MTU;
* arriving from the tunnel (forwarded and locally received): to the probed path
  MTU of the peer they come from, so the far side sends segments that fit even
  when it does not clamp itself.

MSS = path MTU - 40 (IPv4: IP 20 + TCP 20) or - 60 (IPv6: IP 40 + TCP 20)::

    chain clamp_out {
        ip daddr { 100.64.0.2/32 } tcp option maxseg size > 1180 tcp option maxseg size set 1180
        tcp option maxseg size set rt mtu
    }
    chain clamp_in {
        ip saddr { 100.64.0.2/32 } tcp option maxseg size > 1180 tcp option maxseg size set 1180
    }
    chain mss_forward { type filter hook forward priority mangle; policy accept;
        oifname "wg0" tcp flags & (syn | rst) == syn jump clamp_out
        iifname "wg0" tcp flags & (syn | rst) == syn jump clamp_in }
    chain mss_output { ... hook output ...; oifname "wg0" ... jump clamp_out }
    chain mss_input  { ... hook input ...;  iifname "wg0" ... jump clamp_in }
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

__all__ = ["MIN_PATH_MTU", "mss_chains", "mss_for"]

_HEADERS = {4: 40, 6: 60}  # IP + TCP headers without options
_FAMILY = {4: "ip", 6: "ip6"}
MIN_PATH_MTU = 576  # below this a probed value is not believed (IPv4's minimum datagram)
_SYN = "tcp flags & (syn | rst) == syn"


def mss_for(path_mtu: int, version: int) -> int:
    """The MSS that fits a ``path_mtu``-byte packet of IP ``version`` (pure)."""
    return max(MIN_PATH_MTU, path_mtu) - _HEADERS[version]


def mss_chains(interface: str, peers: Iterable[tuple[Sequence[str], int | None]]) -> str:
    """The clamp chains (tab-indented, inside the table) for ``(sources, path MTU)`` peers."""
    out_rules: list[str] = []
    in_rules: list[str] = []
    for sources, path_mtu in peers:
        if path_mtu is None:
            continue
        for version, nets in _by_family(sources).items():
            mss = mss_for(path_mtu, version)
            clamp = f"tcp option maxseg size > {mss} tcp option maxseg size set {mss}"
            match = f"{{ {', '.join(nets)} }}"
            out_rules.append(f"{_FAMILY[version]} daddr {match} {clamp}")
            in_rules.append(f"{_FAMILY[version]} saddr {match} {clamp}")
    out_rules.append("tcp option maxseg size set rt mtu")
    leave = f'oifname "{interface}" {_SYN} jump clamp_out'
    enter = f'iifname "{interface}" {_SYN} jump clamp_in'
    return (
        _chain("clamp_out", "", out_rules)
        + _chain("clamp_in", "", in_rules)
        + _chain("mss_forward", _hook("forward"), [leave, enter])
        + _chain("mss_output", _hook("output"), [leave])
        + _chain("mss_input", _hook("input"), [enter])
    )


def _hook(hook: str) -> str:
    return f"type filter hook {hook} priority mangle; policy accept;"


def _chain(name: str, head: str, rules: Sequence[str]) -> str:
    lines = ([head] if head else []) + list(rules)
    return f"\tchain {name} {{\n" + "".join(f"\t\t{line}\n" for line in lines) + "\t}\n"


def _by_family(sources: Sequence[str]) -> dict[int, list[str]]:
    found: dict[int, set[str]] = {4: set(), 6: set()}
    for source in sources:
        try:
            net = ipaddress.ip_network(source, strict=False)
        except ValueError:  # the filter reports bad sources
            continue
        found[net.version].add(str(net))
    return {v: sorted(nets) for v, nets in found.items() if nets}
