"""TCP MSS clamping through the tunnel: the maps and chains of ``table inet wiregate`` (pure).

TCP SYNs and SYN-ACKs crossing the WireGuard interface have their MSS option
lowered (never raised: the kernel only ever lowers ``maxseg``):

* leaving through the tunnel (forwarded and locally sent): to the route MTU
  (``rt mtu``: the tunnel MTU, or a route's own ``mtu``), and for a peer whose
  path MTU was probed (:mod:`agent.pmtu.search`) to that path MTU;
* arriving from the tunnel (forwarded and locally received): to the probed path
  MTU of the peer they come from, so the far side sends segments that fit even
  when it does not clamp itself.

MSS = path MTU - 40 (IPv4: IP 20 + TCP 20) or - 60 (IPv6: IP 40 + TCP 20). The
MSS of each probed peer's sources is an element of a map (single addresses in
``mss4``/``mss6``, prefixes in the interval maps ``mss4_ranges``/``mss6_ranges``
keyed by address and protocol, a default route in ``mss_any`` keyed by family);
the chains never change::

    chain clamp_out {
        tcp option maxseg size set ip daddr map @mss4
        tcp option maxseg size set ip daddr . meta l4proto map @mss4_ranges
        ... ip6, meta nfproto map @mss_any ...
        tcp option maxseg size set rt mtu
    }
    chain clamp_in { the same with saddr, without rt mtu }
    chain mss_forward { type filter hook forward priority mangle; policy accept;
        oifname "wg0" tcp flags & (syn | rst) == syn jump clamp_out
        iifname "wg0" tcp flags & (syn | rst) == syn jump clamp_in }
    chain mss_output { ... hook output ...; oifname "wg0" ... jump clamp_out }
    chain mss_input  { ... hook input ...;  iifname "wg0" ... jump clamp_in }

A lookup that finds nothing ends its rule, so an unprobed peer is clamped to the
route MTU only.
"""

from __future__ import annotations

__all__ = ["MAPS", "MIN_PATH_MTU", "any_element", "chains", "element", "mss_for"]

_HEADERS = {4: 40, 6: 60}  # IP + TCP headers without options
MIN_PATH_MTU = 576  # below this a probed value is not believed (IPv4's minimum datagram)
_SYN = "tcp flags & (syn | rst) == syn"
_SET = "tcp option maxseg size set"
_VALUE = "tcp option maxseg size"

MAPS = {
    "mss4": f"typeof ip daddr : {_VALUE}",
    "mss4_ranges": f"typeof ip daddr . meta l4proto : {_VALUE}; flags interval",
    "mss6": f"typeof ip6 daddr : {_VALUE}",
    "mss6_ranges": f"typeof ip6 daddr . meta l4proto : {_VALUE}; flags interval",
    "mss_any": f"typeof meta nfproto : {_VALUE}",
}


def mss_for(path_mtu: int, version: int) -> int:
    """The MSS that fits a ``path_mtu``-byte packet of IP ``version`` (pure)."""
    return max(MIN_PATH_MTU, path_mtu) - _HEADERS[version]


def element(source: str, version: int, exact: bool, value: int) -> tuple[str, str]:
    """The map element clamping ``source`` (an address, or a prefix unless ``exact``)."""
    if exact:
        return (f"mss{version}", f"{source} : {value}")
    return (f"mss{version}_ranges", f"{source} . 6 : {value}")


def any_element(nfproto: str, value: int) -> tuple[str, str]:
    """The map element clamping every address of a family (a default route's path MTU)."""
    return ("mss_any", f"{nfproto} : {value}")


def chains(interface: str) -> dict[str, list[str]]:
    """The clamp chains (name -> lines), which look the MSS up in the maps."""

    def lookups(direction: str) -> list[str]:
        return [
            f"{_SET} ip {direction} map @mss4",
            f"{_SET} ip {direction} . meta l4proto map @mss4_ranges",
            f"{_SET} ip6 {direction} map @mss6",
            f"{_SET} ip6 {direction} . meta l4proto map @mss6_ranges",
            f"{_SET} meta nfproto map @mss_any",
        ]

    leave = f'oifname "{interface}" {_SYN} jump clamp_out'
    enter = f'iifname "{interface}" {_SYN} jump clamp_in'
    return {
        "clamp_out": [*lookups("daddr"), f"{_SET} rt mtu"],
        "clamp_in": lookups("saddr"),
        "mss_forward": [_hook("forward"), leave, enter],
        "mss_output": [_hook("output"), leave],
        "mss_input": [_hook("input"), enter],
    }


def _hook(hook: str) -> str:
    return f"type filter hook {hook} priority mangle; policy accept;"
