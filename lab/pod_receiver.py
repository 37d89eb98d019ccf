"""A receiver's packet filter driven by map messages: ``python -m lab.pod_receiver IFACE``.

Run inside a network namespace. Each line on stdin is a map message as the gateway
sends it (``full`` or ``delta``); it goes through the agent's own path for a received
message, :class:`agent.session.MapSession` (parse, apply the delta), then
:meth:`agent.dataplane.firewall.Firewall.apply` on ``IFACE`` through libnftables
(the WireGuard device itself is left out: there is no kernel module here, and the pod
rules live in the filter only). Each message is answered with one JSON line:
``{"action", "problems", "scripts", "seconds"}``, ``seconds`` from the line's arrival
to nftables having committed the elements, ``scripts`` what was written to nftables.
``{"op": "dropped"}`` answers the filter's drop counter (``{"dropped": N}``);
``{"op": "repair"}`` applies the current map with a read-back of the kernel's table
(``scripts``: what it had to fix).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from agent.dataplane.firewall import Firewall
from agent.session import Action, MapSession
from wiregate.nft import Nft

__all__ = ["Recording", "handle", "main", "node_peer", "written"]


class Recording(Nft):
    """libnftables, keeping each script it ran."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []

    def run(self, script: str) -> None:
        self.scripts.append(script)
        super().run(script)


def handle(line: str, session: MapSession, firewall: Firewall, nft: Recording) -> dict[str, Any]:
    """One message: what it did."""
    arrived = time.monotonic()
    message = json.loads(line)
    if message.get("op") == "dropped":
        doc = nft.query_json("list counter inet wiregate dropped")
        counters = [i["counter"] for i in doc["nftables"] if "counter" in i]
        return {"dropped": int(counters[0]["packets"])}
    before = len(nft.scripts)
    repair = message.get("op") == "repair"
    outcome = session.receive(message) if not repair else None
    problems: tuple[str, ...] = ()
    if (repair or (outcome and outcome.action is Action.APPLY)) and session.netmap is not None:
        problems = firewall.apply(session.netmap, repair=repair)
    return {
        "action": "repair" if outcome is None else outcome.action.value,
        "reason": "" if outcome is None else outcome.reason,
        "problems": list(problems),
        "scripts": nft.scripts[before:],
        "seconds": time.monotonic() - arrived,
    }


def node_peer(
    n: int, address: str, pod_cidr: str, pods_from: dict[str, list[str]]
) -> dict[str, Any]:
    """A node's PEER as a VM receives it: its own ``filter`` ``[]``, its pods' rules."""
    return {
        "id": f"node{n}", "name": f"node{n}", "public_key": f"{n:043d}=",
        "addresses": [f"{address}/32"], "allowed_ips": [f"{address}/32", pod_cidr],
        "endpoints": [], "keepalive": None, "tags": ["tag:node"], "filter": [],
        "pods_from": pods_from,
    }  # fmt: skip


def written(scripts: list[str]) -> list[tuple[str, str, str]]:
    """Each element the scripts add or delete: ``(verb, set, element)``."""
    out = []
    for script in scripts:
        for line in script.splitlines():
            if not line.startswith(("add element ", "delete element ")):
                continue  # the table's own lines
            verb, _, _, _, name, rest = line.split(" ", 5)
            body = rest.strip().removeprefix("{").removesuffix("}").strip()
            out += [(verb, name, text) for text in body.split(", ")]
    return out


def main() -> None:
    nft = Recording()
    firewall = Firewall(sys.argv[1], nft, clamp=False)
    session = MapSession()
    for line in sys.stdin:
        print(json.dumps(handle(line, session, firewall, nft)), flush=True)


if __name__ == "__main__":
    main()
