"""The soak driver: a bounded load run against real gateway replicas on PostgreSQL.

Everything runs on loopback and in the lab's own network namespaces
(lab/harness.py):

* a throwaway PostgreSQL (lab/pg.py); the gateways reach it through its unix
  socket, which no network namespace hides;
* ``replicas`` ``wiregate gateway`` processes on that one database, in the lab's
  internet namespace, with a policy that puts ``tag:sim`` devices in one peering
  group and ``tag:real``/``tag:probe`` devices in another;
* three real agents (wireguard-go) on lab hosts a, b, c: iperf3 a -> b and
  ``ping -i 0.02`` c -> a and c -> b through the tunnels for the whole churn, and
  ``wiregate rotate`` on a, b, c in turn;
* the simulated agents (tests/soak/sim.py) on an event loop whose thread lives in
  the internet namespace, spread over every replica;
* a sampler of each gateway's /proc figures and /metrics.

After the churn every live agent is brought online, the run waits for the map to
settle and checks the invariants (tests/soak/checks.py), then disconnects the
simulated agents and compares the gateways' fds and tasks with the baseline
taken before they came. :func:`run_soak` returns a report (a JSON-able dict)
whose ``failures`` list is empty when every invariant and bound held.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from lab.harness import (
    INTERNET_GATEWAY,
    Agent,
    Lab,
    Process,
    Wiregate,
    bare,
    lab_requirements,
    poll,
    write_secret,
)
from lab.pg import PgServer
from tests.soak import checks
from tests.soak.netns import run_in_netns
from tests.soak.probes import Sampler, fd_breakdown
from tests.soak.profile import PINGS, REAL_HOSTS, Profile, Rotation
from tests.soak.report import assemble, traffic_figures
from tests.soak.sim import Fleet, FleetConfig, connected
from wiregate.cli.admin_client import AdminClient
from wiregate.errors import RemoteError
from wiregate.model import NetMap

__all__ = ["run_soak"]

API_PORT, METRICS_PORT = 8180, 9190  # + replica index, in the lab's internet namespace


@dataclass
class Replica:
    """One ``wiregate gateway`` process of the run."""

    index: int
    proc: Process
    url: str
    metrics_url: str
    admin_socket: Path


# --------------------------------------------------------------------------- setup


def unix_database_url(pg: PgServer, database_url: str) -> str:
    """``database_url`` through the server's unix socket (reachable from any namespace)."""
    name = database_url.rsplit("/", 1)[1]
    return f"postgresql+asyncpg://{pg.user}@/{name}?host={pg.data}&port={pg.port}"


def start_replica(lab: Lab, index: int, env: dict[str, str]) -> Replica:
    directory = lab.workdir / f"gateway{index}"
    directory.mkdir(parents=True, exist_ok=True)
    listen = f"{INTERNET_GATEWAY}:{API_PORT + index}"
    metrics = f"{INTERNET_GATEWAY}:{METRICS_PORT + index}"
    admin_socket = directory / "gw.sock"
    proc = lab.internet.spawn(
        [*Wiregate(lab).cmd, "gateway", "--listen", listen, "--metrics-listen", metrics,
         "--state-dir", str(directory), "--admin-socket", str(admin_socket)],
        env=env, name=f"gateway{index}",
    )  # fmt: skip
    replica = Replica(index, proc, f"http://{listen}", f"http://{metrics}/metrics", admin_socket)

    def ready() -> bool:
        if not proc.alive():
            raise RuntimeError(f"gateway {index} exited:\n{proc.output(3000)}")
        probe = lab.internet.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  "-m", "2", f"{replica.url}/readyz"], check=False)  # fmt: skip
        return probe.stdout.strip() == "200"

    poll(ready, timeout=60, what=f"gateway {index} /readyz")
    return replica


async def create_keys(admin: AdminClient) -> dict[str, str]:
    specs = {
        "sim": {"tags": ["tag:sim"], "reusable": True},
        "ephemeral": {"tags": ["tag:sim"], "reusable": True, "ephemeral": True},
        "probe": {"tags": ["tag:probe"], "reusable": True},
        "real": {"tags": ["tag:real"], "reusable": True},
    }
    keys = {}
    for kind, spec in specs.items():
        doc = await admin.call("POST", "/api/v1/keys", {**spec, "expiry": 6 * 3600})
        keys[kind] = str(doc["secret"])
    return keys


@dataclass
class Run:
    """Everything a run holds while it churns."""

    profile: Profile
    lab: Lab
    pg: PgServer
    database: str
    replicas: list[Replica]
    keys: dict[str, str]
    wiregate: Wiregate
    agents: dict[str, Agent]
    addresses: dict[str, str]  # real host -> tunnel IPv4
    rotations: list[Rotation]

    async def db_version(self, conn: asyncpg.Connection) -> int:
        return int(await conn.fetchval("SELECT map_version FROM meta"))

    async def connect_db(self) -> asyncpg.Connection:
        return await asyncpg.connect(
            host=str(self.pg.data), port=self.pg.port, user=self.pg.user, database=self.database
        )


def start_real_agents(
    lab: Lab, wiregate: Wiregate, key: str, replicas: Sequence[Replica]
) -> dict[str, Agent]:
    """The real agents, each given every replica (``URL,URL``), starting at a different one."""
    key_file = lab.workdir / "real.key"
    write_secret(key_file, key)
    agents = {}
    for i, name in enumerate(REAL_HOSTS):
        urls = [r.url for r in replicas]
        wiregate.server = ",".join(urls[i % len(urls) :] + urls[: i % len(urls)])
        agents[name] = wiregate.start_agent(lab.add_host(name), key_file)
    wiregate.wait_mesh(list(agents.values()), timeout=120)
    return agents


def start_traffic(run: Run) -> list[Process]:
    """iperf3 a -> b and the pings, for the churn plus a margin."""
    p, a, b = run.profile, run.agents["a"].host, run.agents["b"].host
    seconds = str(int(p.churn_s) + 5)
    procs = [b.spawn(["iperf3", "-s", "-1", "-B", run.addresses["b"]], name="iperf3-server")]
    time.sleep(0.5)
    procs.append(a.spawn(
        ["iperf3", "-c", run.addresses["b"], "-t", seconds, "-b", f"{p.iperf_mbps}M",
         "-i", "10", "-J", "--connect-timeout", "5000"], name="iperf3-client",
    ))  # fmt: skip
    for src, dst in PINGS:
        procs.append(run.agents[src].host.spawn(
            ["ping", "-n", "-D", "-i", str(1 / p.ping_pps), "-w", seconds, run.addresses[dst]],
            name=f"ping-{src}-{dst}",
        ))  # fmt: skip
    return procs


# --------------------------------------------------------------------------- the churn


async def rotate_real_agents(run: Run, stop: asyncio.Event) -> None:
    """``wiregate rotate`` on a, b, c in turn every ``rotate_every_s``."""
    turn = 0
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), run.profile.rotate_every_s)
        if stop.is_set():
            return
        name = REAL_HOSTS[turn % len(REAL_HOSTS)]
        turn += 1
        agent = run.agents[name]
        cmd = [*run.wiregate.cmd, "rotate", "--run-dir", str(agent.run_dir)]
        start = time.time()
        out = await asyncio.to_thread(agent.host.run, cmd, check=False, timeout=60)
        detail = (out.stdout + out.stderr).strip()[-300:]
        run.rotations.append(Rotation(name, start, time.time(), out.returncode == 0, detail))


async def snapshot(run: Run, conn: asyncpg.Connection) -> tuple[int, dict[str, checks.Live]]:
    """The database's map version and live devices (the version read on both sides of the
    device list, so the two belong together)."""
    admin = AdminClient(socket=run.replicas[0].admin_socket)
    while True:
        version = await run.db_version(conn)
        docs = await admin.call("GET", "/api/v1/devices")
        if await run.db_version(conn) == version:
            return version, checks.live_devices(docs["devices"])


async def map_problems(
    run: Run, fleet: Fleet, version: int, live: dict[str, checks.Live]
) -> dict[str, list[str]]:
    removed = set(fleet.deleted)
    sims = fleet.live()
    online = connected(sims)
    sim_problems = [f"{a.name}: not connected" for a in sims if a not in online]
    for agent in online:
        assert agent.enrollment is not None and isinstance(agent.session.netmap, NetMap)
        sim_problems += checks.check_map(
            agent.enrollment.device_id, agent.session.netmap, live, version, removed
        )
    return {
        "simulated agents' maps": sim_problems,
        "real agents": await check_real_agents(run, live, version),
    }


async def check_invariants(run: Run, fleet: Fleet, conn: asyncpg.Connection) -> dict[str, Any]:
    """Wait until every map agrees with the database (at most ``settle_s``), then check
    the addresses, the maps, the replicas' versions and every agent's resume."""
    started = time.monotonic()
    while True:
        version, live = await snapshot(run, conn)
        problems = await map_problems(run, fleet, version, live)
        settled = not any(problems.values())
        if settled or time.monotonic() - started > run.profile.bounds.settle_s:
            break
        await asyncio.sleep(1.0)
    waited = time.monotonic() - started
    dupes = await conn.fetch(
        "SELECT ipv4 AS a FROM devices GROUP BY ipv4 HAVING count(*) > 1 UNION ALL "
        "SELECT ipv6 FROM devices GROUP BY ipv6 HAVING count(*) > 1"
    )
    problems["unique addresses"] = checks.check_addresses(live) + [
        f"database: {r['a']} held twice" for r in dupes
    ]
    samples = await Sampler([(r.proc.pid, r.metrics_url) for r in run.replicas], fleet.http).sample(
        "settled"
    )
    problems["replica versions"] = [
        f"replica {s.replica} holds version {s.version}, database {version}"
        for s in samples
        if s.version != version
    ]
    online = connected(fleet.live())

    async def resume(agent: Any) -> str:
        async with fleet.slots:
            return str(await agent.verify_resume())

    problems["resume with since"] = [p for p in await asyncio.gather(*map(resume, online)) if p]
    return {
        "version": version,
        "settle_seconds": round(waited, 1) if settled else None,
        "live_devices": len(live),
        "maps_checked": len(online) + len(run.agents),
        "resumed": len(online),
        "problems": problems,
    }


async def check_real_agents(run: Run, live: dict[str, checks.Live], version: int) -> list[str]:
    statuses = await asyncio.to_thread(run.wiregate.statuses, list(run.agents.values()))
    problems = []
    for name, status in statuses.items():
        device_id = str(status["device"]["id"])
        if not status["gateway"]["connected"] or status["gateway"]["map_version"] > version:
            problems.append(f"real {name}: connected {status['gateway']['connected']}, "
                            f"map version {status['gateway']['map_version']}")  # fmt: skip
        peers = {str(p["id"]): str(p["public_key"]) for p in status["peers"]}
        viewer = live.get(device_id)
        if viewer is None:
            problems.append(f"real {name}: not a live device")
            continue
        if viewer.public_key != status["device"]["public_key"]:
            problems.append(f"real {name}: its key is not the database's")
        want = {i: live[i].public_key for i in checks.expected_peers(viewer, live)}
        if peers != want:
            problems.append(f"real {name}: map peers or keys differ from the live devices")
        agent = run.agents[name]
        out = await asyncio.to_thread(agent.host.run, ["wg", "show", agent.iface, "peers"])
        keys = set(out.stdout.split())
        problems += checks.check_peer_keys(f"real {name}", keys, device_id, live)
    return problems


async def remove_simulated(run: Run) -> int:
    """Delete every simulated device (the real agents then stop asking for relay tickets
    to reach the probes): the gateways should hold what they held at the baseline."""
    admin = AdminClient(socket=run.replicas[0].admin_socket)
    docs = await admin.call("GET", "/api/v1/devices")
    ids = [str(d["id"]) for d in docs["devices"] if "tag:real" not in d["tags"]]
    slots = asyncio.Semaphore(8)

    async def delete(device_id: str) -> None:
        async with slots:
            try:
                await admin.call("DELETE", f"/api/v1/devices/{device_id}")
            except RemoteError as exc:  # an ephemeral one the sweeper removed meanwhile
                if exc.status != 404:
                    raise

    await asyncio.gather(*map(delete, ids))
    return len(ids)


async def churn(run: Run) -> dict[str, Any]:
    """The asyncio half of the run, on a thread inside the lab's internet namespace."""
    p = run.profile
    config = FleetConfig(
        gateways=tuple(r.url for r in run.replicas),
        admin_sockets=tuple(r.admin_socket for r in run.replicas),
        keys=run.keys,
        agents=p.agents,
        probes=p.probes,
        ephemeral=int(p.agents * p.ephemeral_share),
        mean_action_s=p.mean_action_s,
        mean_delete_s=p.mean_delete_s,
        seed=p.seed,
    )
    fleet = Fleet(config)
    sampler = Sampler([(r.proc.pid, r.metrics_url) for r in run.replicas], fleet.http)
    conn = await run.connect_db()
    try:
        baseline = await sampler.sample("baseline")
        fds_baseline = {r.index: fd_breakdown(r.proc.pid) for r in run.replicas}
        stop = asyncio.Event()
        background = [
            asyncio.create_task(sampler.run(p.sample_every_s, stop)),
            asyncio.create_task(rotate_real_agents(run, stop)),
        ]
        churn_started = time.monotonic()
        await fleet.start(ramp_s=min(30.0, p.churn_s / 4))
        await asyncio.sleep(max(0.0, churn_started + p.churn_s - time.monotonic()))
        stop.set()
        await fleet.stop()
        await asyncio.gather(*background)
        end = await sampler.sample("end")
        fleet.settle()
        # departed ephemeral devices are swept ephemeral_timeout after they left
        swept_by = fleet.tally.departed_at + p.ephemeral_timeout_s + 2 * p.sweep_interval_s + 2
        await asyncio.sleep(max(0.0, swept_by - time.time()))
        invariants = await check_invariants(run, fleet, conn)
        before_close = await sampler.sample("settled-online")
        await fleet.close()
        removed = await remove_simulated(run)
        await asyncio.sleep(p.bounds.quiet_s)
        async with aiohttp.ClientSession() as http:
            sampler.http = http
            after = await sampler.sample("after")
            fds_after = {r.index: fd_breakdown(r.proc.pid) for r in run.replicas}
    finally:
        await conn.close()
        if not fleet.http.closed:
            await fleet.http.close()
    return {
        "fleet": fleet.summary(),
        "invariants": invariants,
        "samples": [s.as_dict() for s in sampler.samples],
        "baseline": baseline,
        "end": end,
        "before_close": before_close,
        "after": after,
        "removed_at_end": removed,
        "fds_baseline": fds_baseline,
        "fds_after": fds_after,
        "churn_started": churn_started - sampler.started,
    }


# --------------------------------------------------------------------------- the run


def run_soak(profile: Profile, workdir: Path) -> dict[str, Any]:
    """Run ``profile`` in a lab under ``workdir``; the report (``failures`` empty: passed)."""
    reason = lab_requirements()
    if reason:
        raise RuntimeError(reason)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with PgServer() as pg, Lab(workdir=workdir / "lab") as lab:
        database_url = pg.create_database("soak")
        policy = lab.workdir / "policy.yaml"
        policy.write_text(checks.POLICY_YAML)
        env = {
            "WIREGATE_DATABASE_URL": unix_database_url(pg, database_url),
            "WIREGATE_POLICY_FILE": str(policy),
            "WIREGATE_EPHEMERAL_TIMEOUT": str(profile.ephemeral_timeout_s),
            "WIREGATE_EXPIRY_SWEEP_INTERVAL": str(profile.sweep_interval_s),
            "WIREGATE_LOG_FORMAT": "json",
        }
        replicas = [start_replica(lab, i, env) for i in range(profile.replicas)]
        keys = asyncio.run(create_keys(AdminClient(socket=replicas[0].admin_socket)))
        wiregate = Wiregate(lab)
        wiregate.server, wiregate.admin_socket = replicas[0].url, replicas[0].admin_socket
        agents = start_real_agents(lab, wiregate, keys.pop("real"), replicas)
        addresses = {n: bare(wiregate.tunnel_addresses(a)[0]) for n, a in agents.items()}
        run = Run(profile, lab, pg, "soak", replicas, keys, wiregate, agents, addresses, [])
        traffic = start_traffic(run)
        try:
            result = run_in_netns(lab.internet.netns, lambda: churn(run))
        except BaseException:
            print(lab.logs(3000))
            raise
        for proc in traffic:
            with contextlib.suppress(Exception):
                proc.wait(timeout=30)
        outputs = {proc.name: proc.output() for proc in traffic}
        logs = {name: a.proc.output() if a.proc else "" for name, a in agents.items()}
        tunnels, failures = traffic_figures(profile, run.rotations, outputs, logs)
        report = assemble(profile, result, tunnels, failures, started)
        for replica in replicas:
            if not replica.proc.alive():
                report["failures"].append(f"gateway {replica.index} exited")
    (workdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
