"""The soak driver: a bounded load run against real gateway replicas on PostgreSQL.

Everything runs on loopback and in the lab's own network namespaces
(tests/lab/harness.py):

* a throwaway PostgreSQL (tests/pg.py); the gateways reach it through its unix
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from gateway.admin_client import AdminClient
from gateway.model import NetMap
from tests.lab.harness import (
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
from tests.pg import PgServer
from tests.soak import checks
from tests.soak.netns import run_in_netns
from tests.soak.probes import (
    Sample,
    Sampler,
    fd_breakdown,
    iperf_figures,
    parse_ping,
    rotation_window,
)
from tests.soak.sim import Fleet, FleetConfig, connected

__all__ = ["CI", "FULL", "Bounds", "Profile", "format_summary", "run_soak"]

API_PORT, METRICS_PORT = 8180, 9190  # + replica index, in the lab's internet namespace
REAL_HOSTS = ("a", "b", "c")
PINGS = (("c", "a"), ("c", "b"))  # (from, to): every rotating host is on a pinged path


@dataclass(frozen=True, slots=True)
class Bounds:
    """What the run must stay within (stated in docs/operations.md, "Soak")."""

    fd_slack: int = 10  # fds after the simulated agents left: at most baseline + this,
    # not counting unix-socket client connections (the PostgreSQL pool), which may grow
    db_pool: int = 10  # by the gateway's pool_size at most
    task_slack: int = 5  # asyncio tasks after they left: baseline +- this
    rss_growth: float = 0.20  # VmRSS growth from the 25 % mark of the churn to its end
    rotation_loss: int = 0  # echoes lost around a real agent's rotation
    ping_loss: float = 0.005  # echoes lost over the whole run, rotations or not
    settle_s: float = 90.0  # every map agrees with the database within this
    quiet_s: float = 30.0  # after the simulated devices are gone, before the "after" sample


@dataclass(frozen=True, slots=True)
class Profile:
    """How big and how long."""

    name: str
    minutes: float
    agents: int
    replicas: int = 2
    probes: int = 8  # simulated agents the real agents peer with
    ephemeral_share: float = 0.1
    mean_action_s: float = 20.0  # per simulated agent
    mean_delete_s: float = 20.0  # admin deletions (the agent re-enrolls)
    rotate_every_s: float = 30.0  # a real agent rotates (a, b, c in turn)
    iperf_mbps: int = 40
    ping_pps: int = 50
    sample_every_s: float = 10.0
    ephemeral_timeout_s: float = 10.0
    sweep_interval_s: float = 3.0
    seed: int = 1
    bounds: Bounds = Bounds()

    @property
    def churn_s(self) -> float:
        return self.minutes * 60


CI = Profile(
    "ci", minutes=1.5, agents=150, mean_action_s=15.0, rotate_every_s=8.0,
    bounds=Bounds(quiet_s=20.0),
)  # fmt: skip
FULL = Profile("full", minutes=10, agents=300)


@dataclass
class Replica:
    """One ``wiregate gateway`` process of the run."""

    index: int
    proc: Process
    url: str
    metrics_url: str
    admin_socket: Path


@dataclass
class Rotation:
    """One ``wiregate rotate`` on a real agent (wall-clock times, as ping -D prints)."""

    host: str
    start: float
    end: float
    ok: bool
    detail: str = ""
    registered: float | None = None  # from the agent's log: the next key registered
    switched: float | None = None  # and switched to

    def window(self) -> tuple[float, float]:
        """When a rotation could cost packets: from 1 s before the agent registered its
        next key to 5 s after it switched (a handshake retry is 5 s)."""
        if self.registered is None or self.switched is None:
            return self.start - 1, self.end + 5
        return self.registered - 1, self.switched + 5


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
            await admin.call("DELETE", f"/api/v1/devices/{device_id}")

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
        await fleet.settle()
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


# --------------------------------------------------------------------------- figures


def resource_figures(
    profile: Profile, result: dict[str, Any], replicas: int
) -> tuple[dict[str, Any], list[str]]:
    bounds = profile.bounds
    samples = [Sample(**s) for s in result["samples"]]
    figures: dict[str, Any] = {}
    failures = []
    start = result["churn_started"]
    for replica in range(replicas):
        mine = [s for s in samples if s.replica == replica]
        base = next(s for s in mine if s.label == "baseline")
        after = next(s for s in mine if s.label == "after")
        end = next(s for s in mine if s.label == "end")
        churning = [s for s in mine if s.label == "churn"]
        mark = start + 0.25 * profile.churn_s
        quarter = min(churning, key=lambda s: abs(s.t - mark)) if churning else base
        growth = end.rss_kb / quarter.rss_kb - 1
        peak = max(mine, key=lambda s: s.connected)
        figures[f"replica{replica}"] = {
            "baseline": {"fds": base.fds, "tasks": base.tasks, "rss_kb": base.rss_kb,
                         "connected": base.connected},
            "peak": {"fds": max(s.fds for s in mine), "tasks": max(s.tasks for s in mine),
                     "rss_kb": max(s.rss_kb for s in mine), "connected": peak.connected},
            "rss_kb_at_25pct": quarter.rss_kb,
            "rss_kb_at_end": end.rss_kb,
            "rss_growth_25_to_100": round(growth, 3),
            "after": {"fds": after.fds, "tasks": after.tasks, "rss_kb": after.rss_kb,
                      "connected": after.connected},
            "fds_baseline": result["fds_baseline"][replica],
            "fds_after": result["fds_after"][replica],
        }  # fmt: skip
        where = f"replica {replica}"
        pool = [result[k][replica].get("unix (unnamed)", 0) for k in ("fds_baseline", "fds_after")]
        if after.fds - pool[1] > base.fds - pool[0] + bounds.fd_slack:
            failures.append(f"{where}: {after.fds - pool[1]} fds after (not counting the "
                            f"database pool), baseline {base.fds - pool[0]} "
                            f"(bound +{bounds.fd_slack})")  # fmt: skip
        if pool[1] > pool[0] + bounds.db_pool:
            failures.append(f"{where}: {pool[1]} unix client sockets after, baseline "
                            f"{pool[0]} (bound +{bounds.db_pool}, the pool size)")  # fmt: skip
        if abs(after.tasks - base.tasks) > bounds.task_slack:
            failures.append(f"{where}: {after.tasks} tasks after, baseline {base.tasks} "
                            f"(bound +-{bounds.task_slack})")  # fmt: skip
        if after.connected != base.connected:
            failures.append(f"{where}: {after.connected} streams after, {base.connected} before")
        if growth >= bounds.rss_growth:
            failures.append(f"{where}: RSS grew {growth:.1%} from the 25 % mark to the end "
                            f"(bound {bounds.rss_growth:.0%})")  # fmt: skip
    return figures, failures


def traffic_figures(run: Run, procs: Sequence[Process]) -> tuple[dict[str, Any], list[str]]:
    failures = []
    by_name = {p.name: p for p in procs}
    iperf = iperf_figures(by_name["iperf3-client"].output())
    if "error" in iperf:
        failures.append(f"iperf3: {iperf['error']}")
    elif iperf["min_interval_mbps"] <= 0:
        failures.append("iperf3: an interval carried nothing (a tunnel stalled)")
    pings: dict[str, Any] = {}
    logs = {}
    for src, dst in PINGS:
        log = parse_ping(by_name[f"ping-{src}-{dst}"].output())
        logs[(src, dst)] = log
        pings[f"{src}->{dst}"] = {"sent": log.sent, "received": len(log.replies),
                                  "lost": len(log.lost())}  # fmt: skip
    rotations = []
    for r in run.rotations:
        agent = run.agents[r.host]
        assert agent.proc is not None
        r.registered, r.switched = rotation_window(agent.proc.output(), r.start) or (None, None)
        start, end = r.window()
        lost = {
            f"{src}->{dst}": log.lost_between(start, end)
            for (src, dst), log in logs.items()
            if r.host in (src, dst)
        }
        switch = None if r.switched is None or r.registered is None else r.switched - r.registered
        rotations.append({**asdict(r), "lost": lost, "cli_seconds": round(r.end - r.start, 2),
                          "switch_seconds": switch and round(switch, 3)})  # fmt: skip
        if not r.ok:
            failures.append(f"rotate on {r.host} failed: {r.detail}")
        if sum(lost.values()) > run.profile.bounds.rotation_loss:
            failures.append(f"rotate on {r.host} at {r.start:.1f}: lost {lost}")
    if len(run.rotations) < 3:
        failures.append(f"only {len(run.rotations)} rotations of real agents happened")
    for (src, dst), log in logs.items():
        name = f"{src}->{dst}"
        windows = [r.window() for r in run.rotations if r.host in (src, dst)]
        outside = [t for t in log.lost_at() if not any(a <= t <= b for a, b in windows)]
        pings[name]["lost_outside_rotations"] = len(outside)
        if len(log.lost()) > run.profile.bounds.ping_loss * max(1, log.sent):
            failures.append(f"ping {name}: lost {len(log.lost())} of {log.sent}")
    return {"iperf": iperf, "ping": pings, "rotations": rotations}, failures


def fleet_failures(fleet: dict[str, Any]) -> list[str]:
    counts = fleet["counts"]
    failures = [f"simulated agents: {e}" for e in fleet["errors"][:10]]
    for needed in ("enroll", "rotate", "rotate_switched", "endpoints", "reconnect",
                   "admin_delete", "revoked_seen", "departed"):  # fmt: skip
        if not counts.get(needed):
            failures.append(f"simulated agents never did {needed!r}")
    return failures


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
        report = assemble(run, result, traffic, started)
        for replica in replicas:
            if not replica.proc.alive():
                report["failures"].append(f"gateway {replica.index} exited")
    (workdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def assemble(
    run: Run, result: dict[str, Any], traffic: Sequence[Process], started: float
) -> dict[str, Any]:
    resources, failures = resource_figures(run.profile, result, len(run.replicas))
    tunnels, traffic_failures = traffic_figures(run, traffic)
    failures += traffic_failures + fleet_failures(result["fleet"])
    for name, problems in result["invariants"]["problems"].items():
        failures += [f"{name}: {p}" for p in problems[:10]]
    profile = asdict(run.profile)
    return {
        "profile": profile,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "wall_seconds": round(time.time() - started, 1),
        "resources": resources,
        "tunnels": tunnels,
        "fleet": result["fleet"],
        "invariants": {k: v for k, v in result["invariants"].items() if k != "problems"}
        | {"problems": {k: len(v) for k, v in result["invariants"]["problems"].items()}},
        "samples": result["samples"],
        "failures": failures,
    }


def format_summary(report: dict[str, Any]) -> str:
    """A human summary of a report."""
    p, inv, tun = report["profile"], report["invariants"], report["tunnels"]
    lines = [
        f"soak {p['name']}: {p['agents']} simulated agents, {p['replicas']} replica(s), "
        f"{p['minutes']} min churn, {report['wall_seconds']} s wall",
        f"  fleet: {json.dumps(report['fleet']['counts'])}",
        f"  invariants at version {inv['version']}: {inv['live_devices']} live devices, "
        f"{inv['maps_checked']} maps checked, settled in {inv['settle_seconds']} s, "
        f"{inv['resumed']} resumed with since; problems {inv['problems']}",
    ]
    for name, r in report["resources"].items():
        lines.append(
            f"  {name}: fds {r['baseline']['fds']} -> peak {r['peak']['fds']} -> "
            f"after {r['after']['fds']}; tasks {r['baseline']['tasks']} -> peak "
            f"{r['peak']['tasks']} -> after {r['after']['tasks']}; RSS {r['rss_kb_at_25pct']} "
            f"-> {r['rss_kb_at_end']} KiB ({r['rss_growth_25_to_100']:+.1%} from 25 % to end), "
            f"peak streams {r['peak']['connected']}"
        )
    iperf = tun["iperf"]
    lines.append(
        f"  iperf3 a->b: {iperf.get('received_mbps')} Mbit/s received, min 10 s interval "
        f"{iperf.get('min_interval_mbps')}, retransmits {iperf.get('retransmits')}"
    )
    lines.append(f"  ping: {json.dumps(tun['ping'])}")
    lost = [sum(r["lost"].values()) for r in tun["rotations"]]
    lines.append(
        f"  rotations of real agents: {len(lost)}, echoes lost around them: {lost}, "
        f"registered -> switched (s): {[r['switch_seconds'] for r in tun['rotations']]}"
    )
    lines.append("  PASSED" if not report["failures"] else "  FAILED:")
    lines += [f"    - {f}" for f in report["failures"]]
    return "\n".join(lines)


def profile_for(
    name: str, minutes: float | None, agents: int | None, replicas: int | None
) -> Profile:
    """A named profile with the command line's overrides."""
    base = {"ci": CI, "full": FULL}[name]
    changes: dict[str, Any] = {}
    if minutes is not None:
        changes["minutes"] = minutes
    if agents is not None:
        changes["agents"] = agents
    if replicas is not None:
        changes["replicas"] = replicas
    return replace(base, **changes)
