"""``wiregate netcheck`` for real: STUN from the WireGuard port behind each kind of NAT.

The lab: a relay serving STUN on two internet addresses (each answer carries the
other as OTHER-ADDRESS), an open host on the internet, and hosts behind an EIM
router, a symmetric router and a UDP-blocking router. wireguard-go holds UDP
51820 on every host, so netcheck must go through the raw socket.
"""

from __future__ import annotations

import json
import shutil
from typing import Any

import pytest

from lab.harness import (
    INTERNET_GATEWAY,
    WG_PORT,
    WG_RUN_DIR,
    Host,
    Lab,
    Process,
    poll,
    wiregate_command,
    write_secret,
)
from wiregate.keys import encode_key, generate_private_key, public_from_private

pytestmark = [pytest.mark.lab, pytest.mark.timeout(180)]

if shutil.which("wireguard-go") is None:
    pytest.skip("wireguard-go is not installed", allow_module_level=True)

STUN_SECOND = "198.51.100.254"  # a second address on the internet bridge
STUN_1, STUN_2 = f"{INTERNET_GATEWAY}:3478", f"{STUN_SECOND}:3479"


def start_relay(lab: Lab) -> Process:
    """The relay in the internet namespace, STUN on two addresses (IP and port differ)."""
    lab.internet.run(["ip", "addr", "add", f"{STUN_SECOND}/24", "dev", "br0"])
    relay = lab.internet.spawn(
        [*wiregate_command(), "relay", "--stun-listen", STUN_1, "--stun-listen", STUN_2,
         "--metrics-listen", "127.0.0.1:9091"],
        name="relay",
    )  # fmt: skip
    poll(lambda: "relay listening" in relay.output(), timeout=20, what="relay to listen")
    return relay


def start_wireguard(host: Host) -> str:
    """wireguard-go on ``host`` holding UDP 51820; returns its public key."""
    host.spawn(["wireguard-go", "-f", host.wg_ifname], name=f"wg-{host.name}")
    sock = WG_RUN_DIR / f"{host.wg_ifname}.sock"
    poll(sock.exists, timeout=10, what=f"wireguard-go on {host.name}")
    private = generate_private_key()
    key_file = host.lab.workdir / f"{host.name}.key"
    write_secret(key_file, encode_key(private))
    host.run(["wg", "set", host.wg_ifname, "private-key", str(key_file),
              "listen-port", str(WG_PORT)])  # fmt: skip
    host.run(["ip", "link", "set", host.wg_ifname, "up"])
    return encode_key(public_from_private(private))


def netcheck(host: Host, *stun: str) -> dict[str, Any]:
    flags = [arg for server in stun for arg in ("--stun", server)]
    cmd = [*wiregate_command(), "netcheck", *flags, "--port", str(WG_PORT), "--json"]
    return dict(json.loads(host.run(cmd, timeout=30).stdout))


def wireguard_endpoint_seen(server: Host, client: Host, client_key: str, server_key: str) -> str:
    """Have ``client``'s WireGuard handshake with ``server``; the endpoint ``server`` sees."""
    server.run(["wg", "set", server.wg_ifname, "peer", client_key, "allowed-ips", "10.77.0.2/32"])
    client.run(["wg", "set", client.wg_ifname, "peer", server_key, "allowed-ips", "10.77.0.1/32",
                "endpoint", f"{server.addr}:{WG_PORT}", "persistent-keepalive", "1"])  # fmt: skip

    def seen() -> str | None:
        out = server.run(["wg", "show", server.wg_ifname, "endpoints"]).stdout.split()
        return out[1] if len(out) == 2 and out[1] != "(none)" else None

    return poll(seen, timeout=15, what=f"a handshake from {client.name}")


@pytest.fixture
def world(lab: Lab) -> dict[str, Host]:
    start_relay(lab)
    hosts = {
        "open": lab.add_host("open"),
        "eim": lab.add_host("heim", behind=lab.add_router("reim", nat="eim")),
        "symmetric": lab.add_host("hsym", behind=lab.add_router("rsym", nat="symmetric")),
        "blocked": lab.add_host("hblk", behind=lab.add_router("rblk", block_udp=True)),
    }
    for host in hosts.values():
        start_wireguard(host)
    return hosts


def test_nat_types(world: dict[str, Host]) -> None:
    docs = {kind: netcheck(host, STUN_1) for kind, host in world.items()}
    assert {kind: doc["nat_type"] for kind, doc in docs.items()} == {
        "open": "open", "eim": "eim", "symmetric": "symmetric", "blocked": "udp-blocked",
    }  # fmt: skip
    # One server configured: its OTHER-ADDRESS was probed as the second.
    for doc in (docs["open"], docs["eim"], docs["symmetric"]):
        servers = [s["server"] for s in doc["servers"]]
        assert servers == [STUN_1, STUN_2] and all(s["reachable"] for s in doc["servers"])
        assert all(s["rtt_ms"] is not None for s in doc["servers"])
    assert docs["open"]["reflexive"] == f"{world['open'].addr}:{WG_PORT}"
    assert docs["blocked"]["reflexive"] is None
    assert not any(s["reachable"] for s in docs["blocked"]["servers"])
    sym = [s["mapped"] for s in docs["symmetric"]["servers"]]
    wan = world["symmetric"].behind.wan_addr  # type: ignore[union-attr]
    assert sym[0] != sym[1] and all(m.startswith(f"{wan}:") for m in sym)


def test_eim_reflexive_is_wireguards_own_mapping(world: dict[str, Host]) -> None:
    eim, peer = world["eim"], world["open"]
    keys = {h.name: h.run(["wg", "show", h.wg_ifname, "public-key"]).stdout.strip()
            for h in (eim, peer)}  # fmt: skip
    seen = wireguard_endpoint_seen(peer, eim, keys[eim.name], keys[peer.name])
    doc = netcheck(eim, STUN_1, STUN_2)
    router = eim.behind
    assert router is not None
    assert doc["nat_type"] == "eim"
    assert doc["reflexive"] == seen
    assert seen.startswith(f"{router.wan_addr}:")
    assert {s["mapped"] for s in doc["servers"]} == {seen}
