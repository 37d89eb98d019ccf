"""The fragmentation heatmap end to end: real agents on wireguard-go probe a path with
a 1280-byte hop (the topology of ``test_mtu.py``), report it on their map streams, and
the gateway's ``GET /api/v1/paths`` shows the pair's path MTU, the black hole ``a``
meets and the fragmentation-needed ``b`` meets, as the agents' own status does; the
metrics scrape agrees with the JSON.

Topology: ``a`` on the internet, ``b`` behind the plain router ``r`` whose WAN veth has
MTU 1280: ``b`` → ``a`` draws ICMP fragmentation-needed from ``r``, ``a`` → ``b`` is
dropped silently (a black hole).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from lab.harness import METRICS_PORT, Lab, Wiregate, poll

pytestmark = [pytest.mark.lab, pytest.mark.timeout(300)]

NARROW = 1280


def api_paths(gateway: Wiregate) -> list[dict[str, Any]]:
    """``GET /api/v1/paths`` over the admin unix socket."""
    out = gateway.lab.internet.run(
        ["curl", "-sS", "-f", "-m", "5", "--unix-socket", str(gateway.admin_socket),
         "http://gateway/api/v1/paths"], timeout=10,
    ).stdout  # fmt: skip
    return list(json.loads(out)["paths"])


def scrape(gateway: Wiregate) -> dict[str, float]:
    url = f"http://198.51.100.1:{METRICS_PORT}/metrics"
    text = gateway.lab.internet.run(["curl", "-sf", "-m", "5", url], timeout=10).stdout
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("wiregate_path_")
    }


def test_the_matrix_shows_the_narrow_pair_and_its_black_hole(lab: Lab) -> None:
    gateway = Wiregate(lab)
    gateway.start_gateway()
    router = lab.add_router("r", nat="none")
    a, b = lab.add_host("a"), lab.add_host("b", behind=router)
    router.run(["ip", "link", "set", router.wan_ifname, "mtu", str(NARROW)])
    key = gateway.create_key()
    agents = {h.name: gateway.start_agent(h, key, backend="userspace") for h in (a, b)}
    statuses = gateway.wait_mesh(list(agents.values()), timeout=90)
    ids = {name: st["device"]["id"] for name, st in statuses.items()}

    def reported() -> dict[str, dict[str, Any]] | None:
        pairs = {p["reporter"]["id"]: p for p in api_paths(gateway)}
        got = {name: pairs.get(ids[name]) for name in ids}
        done = all(p is not None and p["path_mtu"] is not None for p in got.values())
        return {k: v for k, v in got.items() if v is not None} if done else None

    pairs = poll(reported, timeout=150, interval=2.0, what="both agents' path MTU at the gateway")
    print("paths", json.dumps(pairs, indent=1))
    limit = NARROW - 60  # the 1280 hop minus WireGuard over IPv4
    for name, other in (("a", "b"), ("b", "a")):
        pair = pairs[name]
        assert pair["peer"]["id"] == ids[other]
        assert 1000 <= pair["path_mtu"] <= limit, pair
        assert pair["path"] == "direct" and pair["relay"] is None and not pair["stale"]
        assert pair["handshake_age"] is not None and pair["handshake_age"] < 180
        assert pair["rtt_ms"] is not None and pair["rtt_ms"] > 0
    assert pairs["a"]["black_hole"] and pairs["a"]["probe_failures"] >= 1  # a: no ICMP
    assert pairs["b"]["frag_needed"] >= 1  # b: ICMP fragmentation-needed from r
    docs = gateway.statuses(list(agents.values()))
    for name in ids:
        [peer] = docs[name]["peers"]
        assert peer["path_mtu"] == pairs[name]["path_mtu"]  # the agent's own status agrees

    def scraped() -> dict[str, float] | None:  # the figures are refreshed every 15 s
        samples = scrape(gateway)
        return samples if samples.get('wiregate_path_mtu_bucket{le="+Inf"}') == 2 else None

    samples = poll(scraped, timeout=40, interval=2.0, what="the metrics to count both pairs")
    assert samples["wiregate_path_black_holes"] == sum(p["black_hole"] for p in pairs.values())
    assert samples['wiregate_path_pairs{path="direct"}'] == 2
    assert samples['wiregate_path_mtu_bucket{le="1200"}'] == sum(
        1 for p in pairs.values() if p["path_mtu"] <= 1200
    )
