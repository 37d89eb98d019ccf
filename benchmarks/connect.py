"""Connect time: agent start → first packet across the tunnel, direct, relayed, over TCP.

One lab: a gateway and two relays (``r1``, ``r2``, as in the NAT matrix; each also
listens for TLS on 443 with a lab CA's certificate) on the internet, and one
long-running ("warm") peer per case that every round connects to.
Each round adds a fresh host and starts its agent cold: no state, no interface, an
enrollment key. The clock starts when the agent process is spawned and stops at the
first ICMP echo reply from the warm peer's tunnel address, seen by a prober that
sends an echo request every 10 ms from the fresh host (a raw socket, unconnected, so
every request takes the route of the moment: the tunnel as soon as it exists). After
each round the device is removed at the gateway and the agent stopped. Cases:

- ``direct``: the fresh host behind an endpoint-independent NAT (the matrix's home
  router, unsolicited packets dropped), the warm peer an open host on the internet;
- ``relayed``: the fresh host and the warm peer each behind a symmetric NAT
  (``MASQUERADE --random-fully``): only a relay joins them;
- ``tcp``: the fresh host behind a firewall that drops all UDP and lets only TCP to
  the relays' 443 and to the gateway out (lab/nat.py ``tcp_only``), the warm peer the
  open host: WireGuard over TLS to a relay, bridged onto its UDP side.

Agents run with the product's defaults (path probe timeout 5 s, netcheck every
60 s) and the lab's two STUN servers. ``python -m benchmarks.connect`` prints one
JSON object: ``connect_direct_p50_s``, ``connect_direct_p99_s`` (target < 2),
``connect_relayed_p50_s``, ``connect_relayed_p99_s`` (target < 5),
``connect_tcp_p50_s``, ``connect_tcp_p99_s`` (target < 5), and per case the rounds
measured and the rounds whose path state, read from the fresh agent's ``wiregate
status`` right after the first reply, was the expected one (``direct``,
``relayed``, ``relayed_tcp``: ``*_rounds``, ``*_on_path``). The p99 of a dozen
rounds is, in effect, their maximum. Per round, stderr shows where the time went:
seconds from the start to the agent's log events (enrolled, data plane up, first
netcheck, path decisions about the warm peer, relay bound).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

from lab.demo import agent_environment, use_relays
from lab.harness import (
    Agent,
    Host,
    Lab,
    Process,
    Router,
    Wiregate,
    lab_requirements,
    poll,
)
from lab.nat import drop_unsolicited, start_relays, tcp_only
from lab.tls import LabCA

__all__ = ["Case", "first_reply", "percentile", "run"]

PROBE_INTERVAL = 0.01  # s between echo requests of the prober
ROUND_TIMEOUT = 60.0  # s a fresh agent gets to carry a first packet
SLOW_ROUND = 5.0  # s: a round slower than the targets prints the warm peer's log about it
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
# agent log events worth a timestamp in the per-round breakdown
MILESTONES = ("enrolled", "data plane up", "netcheck", "path", "relay bound", "relay path failed")


@dataclass
class Case:
    """One kind of pair: where the fresh hosts sit, the warm peer, the path expected."""

    name: str
    router: Router
    peer: Agent
    peer_addr: str
    peer_id: str
    expect: str  # the path state the fresh agent must report
    ca_file: Path | None = None  # trusted for the relays' TLS (the TCP case)


# --------------------------------------------------------------------------- the prober


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def _echo_request(ident: int, seq: int) -> bytes:
    payload = b"wiregate-connect"
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, seq)
    checksum = _checksum(header + payload)
    return struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum, ident, seq) + payload


def _is_reply(data: bytes, ident: int) -> bool:
    ihl = (data[0] & 0x0F) * 4
    if len(data) < ihl + 8:
        return False
    kind, _code, _sum, rid, _seq = struct.unpack("!BBHHH", data[ihl : ihl + 8])
    return bool(kind == ICMP_ECHO_REPLY and rid == ident)


def first_reply(addr: str, timeout: float, interval: float = PROBE_INTERVAL) -> float | None:
    """Send ICMP echo requests to ``addr`` every ``interval`` until one is answered;
    return ``time.monotonic()`` at that reply (None after ``timeout``). Send errors
    (no route yet) are ignored: the next request takes the route of that moment."""
    ident = os.getpid() & 0xFFFF
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        deadline = time.monotonic() + timeout
        seq = 0
        while time.monotonic() < deadline:
            seq = (seq + 1) & 0xFFFF
            with contextlib.suppress(OSError):
                sock.sendto(_echo_request(ident, seq), (addr, 0))
            until = time.monotonic() + interval
            while (left := until - time.monotonic()) > 0:
                if not select.select([sock], [], [], left)[0]:
                    break
                data, (src, _port) = sock.recvfrom(4096)
                if src == addr and _is_reply(data, ident):
                    return time.monotonic()
    return None


def _probe_main(addr: str, timeout: float) -> int:
    print("ready", flush=True)
    at = first_reply(addr, timeout)
    print(f"reply {at!r}" if at is not None else "no reply", flush=True)
    return 0 if at is not None else 1


# --------------------------------------------------------------------------- the lab


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation between order statistics."""
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _log_docs(agent: Agent) -> Iterator[tuple[float, dict[str, Any]]]:
    """(wall-clock time, document) of each JSON log line of ``agent`` that has a time."""
    assert agent.proc is not None
    for line in agent.proc.output().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and "timestamp" in doc:
            at = datetime.fromisoformat(doc.pop("timestamp").replace("Z", "+00:00"))
            yield at.timestamp(), doc


def _milestones(agent: Agent, started_wall: float, peer_id: str) -> list[str]:
    """``EVENT +SECONDS`` for the agent's log events of interest since its start (those
    about a peer: about ``peer_id`` only)."""
    out = []
    for at, doc in _log_docs(agent):
        event = doc.get("event")
        if event not in MILESTONES or doc.get("peer", peer_id) != peer_id:
            continue
        extra = doc.get("state") or doc.get("nat_type") or doc.get("relay") or ""
        out.append(f"{event}{'=' + str(extra) if extra else ''} +{at - started_wall:.2f}")
    return out


def _about(agent: Agent, started_wall: float, peer_id: str) -> list[str]:
    """``+SECONDS EVENT {fields}`` for every log line of ``agent`` about ``peer_id`` since
    ``started_wall`` (what the warm side did in a slow round)."""
    out = []
    for at, doc in _log_docs(agent):
        if at >= started_wall and peer_id in json.dumps(doc):
            event = doc.pop("event", "")
            rest = {k: v for k, v in doc.items() if k not in ("level", "component", "peer")}
            out.append(f"+{at - started_wall:.2f} {event} {json.dumps(rest)}")
    return out


def _device_id(wiregate: Wiregate, agent: Agent) -> str | None:
    try:
        return str(wiregate.status(agent)["device"]["id"])
    except Exception:
        return None


def _peer_path(wiregate: Wiregate, agent: Agent, peer: str) -> dict[str, Any]:
    for doc in wiregate.status(agent)["peers"]:
        if doc["name"] == peer:
            return dict(doc.get("path") or {})
    return {}


def connect_once(wiregate: Wiregate, case: Case, host: Host, key: Path) -> tuple[float, str]:
    """Start a cold agent on ``host``; (seconds to the first reply from the warm peer,
    the path state the fresh agent then reports for it)."""
    prober = host.spawn(
        [sys.executable, "-m", "benchmarks.connect", "probe", case.peer_addr,
         "--timeout", str(ROUND_TIMEOUT)],
        name=f"probe-{host.name}",
    )  # fmt: skip
    poll(lambda: "ready" in prober.output(), timeout=20, what="the prober")
    started, started_wall = time.monotonic(), time.time()
    agent = wiregate.start_agent(host, key, ca_file=case.ca_file)
    try:
        took = _reply_at(prober, agent) - started
        path = _peer_path(wiregate, agent, case.peer.host.name)
        steps = " ".join(_milestones(agent, started_wall, case.peer_id))
        print(f"{case.name} {host.name}: {took:.2f} s, {path.get('state')} "
              f"({path.get('reason')}); {steps}", file=sys.stderr)  # fmt: skip
        if took > SLOW_ROUND and (fresh := _device_id(wiregate, agent)) is not None:
            print(f"  slow round, the warm peer about {fresh}:", file=sys.stderr)
            for line in _about(case.peer, started_wall, fresh):
                print(f"    {line}", file=sys.stderr)
        return took, str(path.get("state"))
    finally:
        device = _device_id(wiregate, agent)
        if device is not None:
            wiregate.admin("devices", "remove", device, check=False)
        assert agent.proc is not None
        agent.proc.stop()
        prober.stop()


def _netchecked(wiregate: Wiregate, agent: Agent) -> bool:
    return wiregate.status(agent).get("netcheck") is not None


def _reply_at(prober: Process, agent: Agent) -> float:
    """The prober's monotonic time of the first reply; fails when the prober gave up or
    the agent exited first."""
    assert agent.proc is not None
    proc = agent.proc
    poll(lambda: not (prober.alive() and proc.alive()), timeout=ROUND_TIMEOUT + 10,
         interval=0.05, what="the prober")  # fmt: skip
    for line in prober.output().splitlines():
        if line.startswith("reply "):
            return float(line.split()[1])
    if not proc.alive():
        raise RuntimeError(f"the agent exited {proc.returncode}:\n{proc.output(3000)}")
    raise RuntimeError(f"no reply within {ROUND_TIMEOUT:g} s")


def _warm_peers(wiregate: Wiregate, hosts: list[Host], key: Path) -> list[tuple[Agent, str]]:
    """The long-running peers, each connected with its NAT measured before any round."""
    agents = [wiregate.start_agent(host, key) for host in hosts]
    wiregate.wait_mesh(agents, timeout=90)
    for agent in agents:
        poll(partial(_netchecked, wiregate, agent), timeout=90, what="a netcheck")
    return [(agent, wiregate.tunnel_addresses(agent)[0]) for agent in agents]


def _case(
    name: str,
    router: Router,
    warm: tuple[Agent, str],
    wiregate: Wiregate,
    expect: str,
    ca_file: Path | None = None,
) -> Case:
    agent, addr = warm
    peer_id = str(wiregate.status(agent)["device"]["id"])
    return Case(name, router, agent, addr, peer_id, expect, ca_file)


def build(lab: Lab) -> tuple[Wiregate, Path, list[Case]]:
    """Gateway, relays, routers and warm peers; the cases to measure."""
    wiregate = Wiregate(lab)
    use_relays(wiregate)
    wiregate.start_gateway()
    relay_ca = LabCA.create(lab.workdir / "relay-ca")  # the relays' TLS on 443
    start_relays(lab, wiregate, tcp_ca=relay_ca)
    os.environ.update(agent_environment())  # every agent's STUN servers
    key = wiregate.create_key(tags="tag:bench", expiry="2h", reusable=True)
    direct_nat = lab.add_router("rd", nat="eim")
    sym_cold = lab.add_router("rs", nat="symmetric")
    sym_warm = lab.add_router("rw", nat="symmetric")
    for router in (direct_nat, sym_cold, sym_warm):
        drop_unsolicited(router)
    tcp_router = lab.add_router("rt", nat="eim", block_udp=True)
    tcp_only(tcp_router)
    warm = [lab.add_host("open"), lab.add_host("sym", behind=sym_warm)]
    open_peer, sym_peer = _warm_peers(wiregate, warm, key)
    cases = [
        _case("direct", direct_nat, open_peer, wiregate, "direct"),
        _case("relayed", sym_cold, sym_peer, wiregate, "relayed"),
        _case("tcp", tcp_router, open_peer, wiregate, "relayed_tcp", relay_ca.ca_file),
    ]
    return wiregate, key, cases


def _measure(lab: Lab, rounds: int, only: Callable[[str], bool]) -> dict[str, float]:
    wiregate, key, cases = build(lab)
    figures: dict[str, float] = {}
    for case in (c for c in cases if only(c.name)):
        times, on_path = [], 0
        for index in range(rounds):
            host = lab.add_host(f"{case.name[0]}{index}", behind=case.router)
            took, path = connect_once(wiregate, case, host, key)
            times.append(took)
            on_path += path == case.expect
        figures |= {
            f"connect_{case.name}_p50_s": round(statistics.median(times), 2),
            f"connect_{case.name}_p99_s": round(percentile(times, 99), 2),
            f"connect_{case.name}_rounds": float(rounds),
            f"connect_{case.name}_on_path": float(on_path),
        }
    return figures


def run(rounds: int = 12, cases: tuple[str, ...] = ()) -> dict[str, float]:
    """Build the lab, measure ``rounds`` cold starts per case, tear down; the figures."""
    if reason := lab_requirements():
        raise RuntimeError(reason)
    with Lab() as lab:
        try:
            return _measure(lab, rounds, lambda name: not cases or name in cases)
        except Exception:
            print(lab.logs(), file=sys.stderr)
            raise


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["probe"]:
        probe = argparse.ArgumentParser(prog="python -m benchmarks.connect probe")
        probe.add_argument("addr")
        probe.add_argument("--timeout", type=float, default=ROUND_TIMEOUT)
        opts = probe.parse_args(args[1:])
        return _probe_main(opts.addr, opts.timeout)
    parser = argparse.ArgumentParser(description="agent start → first packet, p50/p99")
    parser.add_argument("--rounds", type=int, default=12, help="cold starts per case")
    parser.add_argument("--case", action="append", default=[], help="only this case (repeat)")
    parsed = parser.parse_args(args)
    try:
        figures = run(parsed.rounds, tuple(parsed.case))
    except Exception as exc:
        print(f"connect benchmark failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
