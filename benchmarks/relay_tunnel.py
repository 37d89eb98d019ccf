"""Relayed tunnel throughput: one wireguard-go pair, direct vs through the relay (UDP, TCP/443).

One lab: hosts ``h1`` and ``h2`` on the internet bridge joined by a hand-configured
wireguard-go tunnel, and the real ``wiregate relay`` process in the internet
namespace with its TLS listener on 443 (a lab CA's certificate). The benchmark
signs the relay tickets itself (as the gateway would) and binds with the agent's
own code: :func:`agent.paths.relaylink.bind_at_relay` from the WireGuard port for
UDP, :class:`agent.paths.tcplink.TcpLink` for TCP (a helper process in the host's
namespace keeps the link open). The same pair then runs iperf3 (TCP) with its
peer endpoints switched between:

- ``direct``: each side's address;
- ``udp``: both sides bound at the relay over UDP;
- ``tcp``: ``h1`` over TLS/TCP 443 (UDP blocked there), ``h2`` over UDP;
- ``tcp_both``: both sides over TLS/TCP 443.

The modes alternate every round (the order rotates) so that noise on the machine
hits all alike; each ratio is the median over rounds of mode / direct measured back
to back. The relay's per-device bandwidth quota is raised above line rate for the
run (its default, 100 Mbit/s per device, would be the figure otherwise).
``python -m benchmarks.relay_tunnel [--quick]`` prints one JSON object:
``relay_tunnel_ratio`` (target >= 0.9), ``relay_tcp_tunnel_mbps`` (target >= 200),
``relay_tcp_tunnel_ratio``, ``relay_tcp_both_tunnel_mbps``, ``relay_tunnel_direct_mbps``
and ``relay_tunnel_udp_mbps``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

from benchmarks.tunnel import hand_tunnel, iperf_mbps, start_iperf_server
from lab.harness import (
    INTERNET_GATEWAY,
    WG_PORT,
    Host,
    Lab,
    Process,
    lab_requirements,
    poll,
    wiregate_command,
    write_secret,
)
from lab.tls import LabCA

__all__ = ["run"]

RELAY = INTERNET_GATEWAY
CONTROL = (RELAY, 3480)
TCP = (RELAY, 443)
RELAY_ID = "r1"
TENANT = "default"
MODES = ("direct", "udp", "tcp", "tcp_both")
TUNNEL_MTU = 1440
FORWARD_PATH = ["auto"]  # the relay's forward_path (--forward-path)


@dataclass
class Side:
    host: Host
    public_key: str
    direct: str
    endpoints: dict[str, str]


def _public_key(host: Host) -> str:
    return host.run(["wg", "show", host.wg_ifname, "public-key"]).stdout.strip()


def _start_relay(lab: Lab, signing: SigningKey) -> Process:
    ca = LabCA.create(lab.workdir / "relay-ca")
    pair = ca.issue(lab.workdir / "relay-tls", [RELAY])
    keys = lab.workdir / "relay-signers.json"
    public = base64.b64encode(bytes(signing.verify_key)).decode()
    keys.write_text(json.dumps({"signers": [{"public_key": public, "tenants": [TENANT]}]}))
    env = {
        "WIREGATE_TCP_LISTEN": f"{TCP[0]}:{TCP[1]}",
        "WIREGATE_TLS_CERT": str(pair.cert),
        "WIREGATE_TLS_KEY": str(pair.key),
        "WIREGATE_BYTES_PER_SECOND": str(10**10),  # above line rate: measure the path, not
        "WIREGATE_BURST_BYTES": str(64 * 2**20),  # the quota
        "WIREGATE_FORWARD_PATH": FORWARD_PATH[0],
    }
    proc = lab.internet.spawn(
        [*wiregate_command(), "relay", "--stun-listen", f"{RELAY}:3478",
         "--relay-id", RELAY_ID, "--relay-listen", f"{CONTROL[0]}:{CONTROL[1]}",
         "--relay-ports", "40000-40015", "--verify-keys-file", str(keys),
         "--metrics-listen", "127.0.0.1:9393", "--log-format", "json"],
        env=env, name="relay",
    )  # fmt: skip
    poll(lambda: "relay tcp listening" in proc.output(), timeout=20, what="relay")
    (lab.workdir / "relay-ca.pem").write_bytes(ca.ca_file.read_bytes())
    return proc


def _tickets(lab: Lab, signing: SigningKey, a: Side, b: Side, label: str) -> tuple[Path, Path]:
    from relay.tickets import Node, issue_pair

    node_a, node_b = Node(f"h1-{label}", a.public_key), Node(f"h2-{label}", b.public_key)
    pair = issue_pair(signing, relay_id=RELAY_ID, tenant=TENANT, node_a=node_a, node_b=node_b,
                      now=time.time(), lifetime=300)  # fmt: skip
    paths = (lab.workdir / f"ticket-{label}-a", lab.workdir / f"ticket-{label}-b")
    for path, raw in zip(paths, pair, strict=True):
        write_secret(path, base64.b64encode(raw).decode())
    return paths


def _helper(host: Host, mode: str, ticket: Path, lab: Lab) -> tuple[str, Process | None]:
    """Bind ``host``'s WireGuard at the relay (``udp`` or ``tcp``); its peer endpoint."""
    cmd = [sys.executable, "-m", "benchmarks.relay_tunnel", mode, "--ticket-file", str(ticket),
           "--wg-port", str(WG_PORT), "--ca-file", str(lab.workdir / "relay-ca.pem")]  # fmt: skip
    if mode == "udp":
        out = host.run(cmd, timeout=30).stdout
        return json.loads(out.strip().splitlines()[-1])["endpoint"], None
    proc = host.spawn(cmd, name=f"link-{host.name}-{ticket.name}")
    poll(lambda: '"endpoint"' in proc.output(), timeout=30, what=f"tcp link of {host.name}")
    line = next(x for x in proc.output().splitlines() if '"endpoint"' in x)
    return json.loads(line)["endpoint"], proc


def _setup(lab: Lab) -> tuple[Side, Side]:
    h1, h2 = lab.add_host("h1"), lab.add_host("h2")
    hand_tunnel(lab, h1, h2)
    for host in (h1, h2):  # what the agent sets on a 1500-byte link (1500 - 60)
        host.run(["ip", "link", "set", host.wg_ifname, "mtu", str(TUNNEL_MTU)])
    signing = SigningKey.generate()
    _start_relay(lab, signing)
    a = Side(h1, _public_key(h1), f"{h1.addr}:{WG_PORT}", {})
    b = Side(h2, _public_key(h2), f"{h2.addr}:{WG_PORT}", {})
    for mode in MODES:
        if mode == "direct":
            a.endpoints[mode], b.endpoints[mode] = b.direct, a.direct
            continue
        ticket_a, ticket_b = _tickets(lab, signing, a, b, mode)
        link_a = "tcp" if mode in ("tcp", "tcp_both") else "udp"
        link_b = "tcp" if mode == "tcp_both" else "udp"
        # what each side's WireGuard sends to: its own relay endpoint
        a.endpoints[mode], _ = _helper(h1, link_a, ticket_a, lab)
        b.endpoints[mode], _ = _helper(h2, link_b, ticket_b, lab)
    start_iperf_server(h2)
    return a, b


def _use(mode: str, a: Side, b: Side) -> None:
    for side, peer in ((a, b), (b, a)):
        side.host.run(["wg", "set", side.host.wg_ifname, "peer", peer.public_key,
                       "endpoint", side.endpoints[mode]])  # fmt: skip
    poll(lambda: a.host.ping("100.64.250.2", timeout=1.0), timeout=15, what=f"ping via {mode}")


def _measure(lab: Lab, rounds: int, seconds: int) -> dict[str, list[float]]:
    a, b = _setup(lab)
    results: dict[str, list[float]] = {m: [] for m in MODES}
    order = list(MODES)
    for _ in range(rounds):
        for mode in order:
            _use(mode, a, b)
            results[mode].append(iperf_mbps(a.host, "100.64.250.2", seconds))
            time.sleep(0.3)
        order.append(order.pop(0))
    print(json.dumps(results), file=sys.stderr)
    return results


def _ratio(results: dict[str, list[float]], mode: str) -> float:
    pairs = zip(results[mode], results["direct"], strict=True)
    return round(statistics.median(m / d for m, d in pairs), 4)


def run(rounds: int = 5, seconds: int = 3) -> dict[str, float]:
    """Build the lab, measure every mode ``rounds`` times, tear down; the figures."""
    if reason := lab_requirements():
        raise RuntimeError(reason)
    with Lab() as lab:
        try:
            results = _measure(lab, rounds, seconds)
        except Exception:
            print(lab.logs(), file=sys.stderr)
            raise
    return {
        "relay_tunnel_ratio": _ratio(results, "udp"),
        "relay_tcp_tunnel_ratio": _ratio(results, "tcp"),
        "relay_tcp_tunnel_mbps": round(statistics.median(results["tcp"]), 1),
        "relay_tcp_both_tunnel_mbps": round(statistics.median(results["tcp_both"]), 1),
        "relay_tunnel_udp_mbps": round(statistics.median(results["udp"]), 1),
        "relay_tunnel_direct_mbps": round(statistics.median(results["direct"]), 1),
    }


# -- helpers run inside a host's namespace ------------------------------------------------


async def _udp_bind(ticket: bytes, wg_port: int) -> str:
    from agent.paths.relaylink import RelayGrant, bind_at_relay

    binding = await bind_at_relay(RelayGrant(RELAY_ID, CONTROL, ticket), wg_port)
    return binding.endpoint


async def _tcp_link(ticket: bytes, wg_port: int, ca_file: Path) -> None:
    from agent.paths.relaylink import RelayGrant
    from agent.paths.tcplink import open_link

    link = await open_link(TCP, wg_port, ca_file=ca_file)
    binding = await link.bind(RelayGrant(RELAY_ID, CONTROL, ticket))
    print(json.dumps({"endpoint": binding.endpoint}), flush=True)
    await link.closed
    print(json.dumps({"closed": link.refused or "by the relay", "dropped": link.dropped}))


def _helper_main(args: argparse.Namespace) -> int:
    ticket = base64.b64decode(Path(args.ticket_file).read_text())
    if args.mode == "udp":
        print(json.dumps({"endpoint": asyncio.run(_udp_bind(ticket, args.wg_port))}))
    else:
        asyncio.run(_tcp_link(ticket, args.wg_port, Path(args.ca_file)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="relayed vs direct tunnel throughput")
    parser.add_argument("mode", nargs="?", choices=("udp", "tcp"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 rounds of 2 s")
    parser.add_argument("--ticket-file", help=argparse.SUPPRESS)
    parser.add_argument("--wg-port", type=int, default=WG_PORT, help=argparse.SUPPRESS)
    parser.add_argument("--ca-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode is not None:
        return _helper_main(args)
    rounds, seconds = (2, 2) if args.quick else (args.rounds, args.seconds)
    try:
        figures = run(rounds, seconds)
    except Exception as exc:
        print(f"relay_tunnel benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
