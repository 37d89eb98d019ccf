"""Faults of a single gateway, in the lab: each test asserts on the data and on connectivity.

* ``kill -9`` of the gateway during an enrollment storm (SQLite): every acknowledged
  enrollment is there after the restart with the same id, addresses and key, no
  address is handed out twice, the database passes ``PRAGMA integrity_check`` and
  ``foreign_key_check``, the map version agrees with the devices, and two agents
  pinging each other throughout lose no packet and resume their streams.
* The IdP (and so its JWKS) unreachable: tunnels, signed-in web sessions, agent
  stream reconnects and key rotation carry on; a new sign-in fails with a 503
  naming the issuer; a workload token whose key is cached still enrolls, one that
  needs a JWKS fetch is refused clearly; once the IdP is back, sign-ins work again
  without restarting the gateway.
* An agent whose wall clock is 2 h ahead or behind at boot (libfaketime): it
  enrolls, applies its map, carries traffic (through a relay ticket), does not
  rotate its key at once, and ``wiregate status`` shows sane handshake ages.

Relay death and NAT mapping changes are in test_nat_matrix.py; gateway and agent
restarts without load in test_mesh.py. Figures are printed (run with ``-s``).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import signal
import sqlite3
import sys
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest

from lab.harness import (
    INTERNET_GATEWAY,
    METRICS_PORT,
    Agent,
    Host,
    Lab,
    Wiregate,
    bare,
    poll,
    write_secret,
)
from lab.nat import STUN, drop_unsolicited, start_relays
from lab.ping import ping_until, start_ping, stop_ping
from lab.sso import (
    enroll_by_workload_token,
    mint_workload_token,
    start_gateway,
    start_idp,
    start_sso_gateway,
)
from wiregate.keys import encode_key, generate_private_key, public_from_private

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- helpers


def two_agents(lab: Lab, wiregate: Wiregate, key_file: Path) -> dict[str, Agent]:
    hosts = {name: lab.add_host(name) for name in ("a", "b")}
    agents = {name: wiregate.start_agent(host, key_file) for name, host in hosts.items()}
    wiregate.wait_mesh(list(agents.values()), timeout=180)
    return agents


def all_connected(wiregate: Wiregate, agents: list[Agent]) -> bool:
    """Every agent's stream is up and its map has every other agent."""
    statuses = wiregate.statuses(agents)
    ids = {st["device"]["id"] for st in statuses.values()}
    return all(
        st["gateway"]["connected"] and ids - {st["device"]["id"]} <= {p["id"] for p in st["peers"]}
        for st in statuses.values()
    )


def new_public_key() -> str:
    return encode_key(public_from_private(generate_private_key()))


def v4(wiregate: Wiregate, agent: Agent) -> str:
    return wiregate.tunnel_addresses(agent)[0]


# --------------------------------------------------------------------------- 1. enrollment storm

STORM_SCRIPT = r"""
import asyncio, json, sys
import aiohttp
from wiregate.keys import encode_key, generate_private_key, public_from_private

server, key_file, prefix, total, clients, out = sys.argv[1:7]
secret = open(key_file).read().strip()
todo = list(range(int(total)))

async def client(http, log):
    while todo:
        name = f"{prefix}-{todo.pop(0)}"
        public = encode_key(public_from_private(generate_private_key()))
        body = {"auth_key": secret, "public_key": public, "name": name}
        record = {"name": name, "public_key": public}
        try:
            async with http.post(server + "/api/v1/enroll", json=body) as resp:
                record["status"] = resp.status
                record["body"] = await resp.json(content_type=None)
        except Exception as exc:  # the gateway died: not acknowledged
            record["error"] = type(exc).__name__
        log.write(json.dumps(record) + "\n")
        log.flush()

async def main():
    timeout = aiohttp.ClientTimeout(total=15)
    with open(out, "a") as log:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            await asyncio.gather(*(client(http, log) for _ in range(int(clients))))

asyncio.run(main())
"""

STORM_SIZE = 150  # enrollments per round
STORM_CLIENTS = 30
STORM_ROUNDS = 3


@dataclass(frozen=True, slots=True)
class StormRound:
    acknowledged: list[dict[str, Any]]  # the 201 bodies the clients read in full
    refused: list[dict[str, Any]]  # an HTTP answer other than 201
    unanswered: int  # the connection failed or was cut: the gateway was down
    acked_at_kill: int


def storm_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def run_storm_and_kill(wiregate: Wiregate, host: Host, key_file: Path, index: int) -> StormRound:
    """Start a storm of enrollments from ``host``; SIGKILL the gateway at a random moment
    after at least a third were acknowledged; return what the clients saw."""
    out = wiregate.lab.workdir / f"storm-{index}.jsonl"
    storm = host.spawn(
        [
            sys.executable,
            "-c",
            STORM_SCRIPT,
            wiregate.server,
            str(key_file),
            f"s{index}",
            str(STORM_SIZE),
            str(STORM_CLIENTS),
            str(out),
        ],
        name=f"storm{index}",
    )
    threshold = random.randint(STORM_SIZE // 3, 2 * STORM_SIZE // 3)

    def acked() -> int:
        return sum(r.get("status") == 201 for r in storm_records(out))

    poll(
        lambda: acked() >= threshold or not storm.alive(),
        timeout=120,
        interval=0.02,
        what=f"{threshold} acknowledged enrollments",
    )
    assert wiregate.gateway is not None
    wiregate.gateway.signal(signal.SIGKILL)
    at_kill = acked()
    wiregate.gateway.wait(timeout=10)
    assert storm.wait(timeout=60) == 0, storm.output(3000)
    records = storm_records(out)
    assert len(records) == STORM_SIZE, f"{len(records)} of {STORM_SIZE} enrollments recorded"
    return StormRound(
        acknowledged=[r["body"] for r in records if r.get("status") == 201],
        refused=[r for r in records if r.get("status") not in (None, 201)],
        unanswered=sum("error" in r for r in records),
        acked_at_kill=at_kill,
    )


@contextmanager
def database(wiregate: Wiregate) -> Iterator[sqlite3.Connection]:
    """The gateway's SQLite file, opened by the sqlite3 module (the gateway may run)."""
    path = wiregate.dir / "wiregate.db"
    assert path.exists(), f"no database at {path}"
    with closing(sqlite3.connect(path, timeout=10)) as db:
        yield db


def check_database(wiregate: Wiregate, acknowledged: list[dict[str, Any]]) -> dict[str, Any]:
    """Every acknowledged enrollment is stored as acknowledged; the file is sound."""
    with database(wiregate) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        rows = db.execute("SELECT id, name, public_key, ipv4, ipv6, ip_index FROM devices")
        devices = {r[0]: r for r in rows.fetchall()}
        (version,) = db.execute("SELECT map_version FROM meta").fetchone()
        enrolls = db.execute("SELECT target FROM audit_log WHERE action = 'device.enroll'")
        audited = [r[0] for r in enrolls.fetchall()]
    missing, different = [], []
    for body in acknowledged:
        dev = body["device"]
        row = devices.get(dev["id"])
        if row is None:
            missing.append(dev["name"])
            continue
        want = (dev["name"], dev["public_key"], *(bare(a) for a in dev["addresses"]))
        if (row[1], row[2], bare(row[3]), bare(row[4])) != want:
            different.append(f"{dev['name']}: acknowledged {want}, stored {row[1:5]}")
    assert not missing, f"acknowledged enrollments lost: {missing}"
    assert not different, "\n".join(different)
    for column in (3, 4, 5):  # ipv4, ipv6, ip_index: never twice
        values = [r[column] for r in devices.values()]
        assert len(values) == len(set(values)), f"an address was handed out twice: {values}"
    acked_addresses = [a for b in acknowledged for a in b["device"]["addresses"]]
    assert len(acked_addresses) == len(set(acked_addresses)), "two acknowledgements, one address"
    # every enrollment bumps map_version in its own transaction, audited with it
    versions = [b["map_version"] for b in acknowledged]
    assert len(versions) == len(set(versions)), "two enrollments acknowledged one map version"
    assert not versions or max(versions) <= version, (max(versions), version)
    assert version >= len(devices), f"map v{version} for {len(devices)} enrolled devices"
    assert sorted(audited) == sorted(devices), "devices and their audit records disagree"
    return {"devices": devices, "map_version": version}


def metric(lab: Lab, name: str, *labels: str) -> float:
    """The gateway's series ``name`` whose labels include every ``labels`` (``k="v"``)."""
    text = lab.internet.run(
        ["curl", "-sf", "-m", "5", f"http://{INTERNET_GATEWAY}:{METRICS_PORT}/metrics"]
    ).stdout
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.partition("{")[0] == name and all(label in series for label in labels):
            return float(value)
    raise AssertionError(f"{name} {labels} not in the gateway's metrics")


def test_kill_9_during_an_enrollment_storm_loses_nothing_acknowledged(
    lab: Lab, gateway: Wiregate
) -> None:
    gateway.status_timeout = 90  # the CLI starts slowly on a loaded 2-core machine
    agents = two_agents(lab, gateway, gateway.create_key(tags="tag:lab"))
    storm_key = gateway.create_key(tags="tag:storm")
    storm_host = lab.add_host("storm")
    target = v4(gateway, agents["b"])
    assert ping_until(agents["a"].host, target), "no tunnel before the storm"
    reconnects = {n: gateway.status(a)["gateway"]["reconnects"] for n, a in agents.items()}
    ping = start_ping(agents["a"].host, target)
    acknowledged: list[dict[str, Any]] = []
    started = time.monotonic()
    for index in range(STORM_ROUNDS):
        storm = run_storm_and_kill(gateway, storm_host, storm_key, index)
        killed = time.monotonic()
        gateway.start_gateway()
        ready = time.monotonic() - killed
        acknowledged += storm.acknowledged
        stored = check_database(gateway, acknowledged)
        ours = sum(d[1].startswith(f"s{index}-") for d in stored["devices"].values())
        assert storm.refused == [], f"enrollments refused during the storm: {storm.refused[:3]}"
        print(
            f"round {index}: killed after {storm.acked_at_kill} acknowledged; "
            f"{len(storm.acknowledged)} acknowledged, {ours} stored "
            f"({ours - len(storm.acknowledged)} committed but unanswered), "
            f"{storm.unanswered} unanswered; gateway ready {ready:.2f} s after the kill"
        )

    # the agents resume their streams and converge on the stored map
    stored = check_database(gateway, acknowledged)

    def converged() -> bool:
        for name, agent in agents.items():
            assert agent.proc is not None
            if not agent.proc.alive():
                raise AssertionError(f"agent {name} exited:\n{agent.proc.output(1500)}")
        statuses = gateway.statuses(list(agents.values()))
        return all(
            st["gateway"]["connected"]
            and st["gateway"]["map_version"] == stored["map_version"]
            and len(st["peers"]) == len(stored["devices"]) - 1
            for st in statuses.values()
        )

    poll(converged, timeout=60, interval=0.5, what="agents on the stored map version")
    converged_after = time.monotonic() - started
    statuses = gateway.statuses(list(agents.values()))
    for name, st in statuses.items():
        assert st["gateway"]["reconnects"] >= reconnects[name] + STORM_ROUNDS, (name, st["gateway"])
    assert metric(lab, "wiregate_netmap_version") == stored["map_version"]
    result = stop_ping(ping)
    print(
        f"{STORM_ROUNDS} kills in {converged_after:.1f} s; {len(acknowledged)} acknowledged, "
        f"{len(stored['devices']) - 2} storm devices stored, map v{stored['map_version']}; "
        f"ping a->b: {result.transmitted} sent, {result.received} received, "
        f"lost {len(result.lost)} {list(result.lost)[:20]}"
    )
    assert result.lost == (), f"packets lost while the gateway was killed: {result.lost}"
    assert ping_until(agents["b"].host, v4(gateway, agents["a"]))


def test_an_agent_whose_enrollment_answer_was_lost_enrolls_on_its_next_start(
    lab: Lab, gateway: Wiregate
) -> None:
    """The window between the commit and the answer, made wide: the gateway's answer to
    the enrollment is dropped (large segments from its port), so the agent gives up
    after its timeout although the device was committed; then the agent starts again."""
    host = lab.add_host("a")
    key = gateway.create_key(tags="tag:lab")
    rule = ["OUTPUT", "-p", "tcp", "-s", INTERNET_GATEWAY, "--sport", "8080", "-d", host.addr,
            "-m", "length", "--length", "300:65535", "-j", "DROP"]  # fmt: skip
    lab.internet.run(["iptables", "-A", *rule])
    agent = gateway.start_agent(host, key)
    assert agent.proc is not None
    assert agent.proc.wait(timeout=60) != 0, "the agent enrolled although the answer was lost"
    committed = gateway.devices()
    assert [d["name"] for d in committed] == ["a"], "the enrollment was not committed"
    lab.internet.run(["iptables", "-D", *rule])
    agent = gateway.start_agent(host)
    assert agent.proc is not None
    poll(lambda: not agent.proc.alive() or all_connected(gateway, [agent]), timeout=60,
         what="the agent to connect or exit")  # fmt: skip
    assert agent.proc.alive(), f"the agent exited again: {agent.proc.output(400)}"
    assert [d["id"] for d in gateway.devices()] == [committed[0]["id"]]


# --------------------------------------------------------------------------- 2. IdP unreachable

BROWSER_SCRIPT = r"""
import asyncio, json, sys
from pathlib import Path
from urllib.parse import urljoin, urlsplit
import aiohttp
from lab.sso import _Forms

mode, jar_path, start = sys.argv[1:4]
STOP = "/oidc/callback"

async def main():
    jar = aiohttp.CookieJar(unsafe=True)
    if Path(jar_path).exists():
        jar.load(jar_path)
    timeout = aiohttp.ClientTimeout(30)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as http:
        url, method, data, result = start, "GET", None, None
        for _ in range(25):
            parts = urlsplit(url)
            origin = {"Origin": f"{parts.scheme}://{parts.netloc}"} if method == "POST" else {}
            async with http.request(method, url, data=data, headers=origin,
                                    allow_redirects=False) as resp:
                body, location = await resp.text(), resp.headers.get("Location")
            if location is not None and not (mode == "to-callback" and STOP in location):
                url, method, data = urljoin(url, location), "GET", None
                continue
            result = {"status": resp.status, "url": url, "location": location, "body": body}
            forms = _Forms()
            forms.feed(body)
            idp = [f for f in forms.forms if f[1] not in ("/logout", "/login/deny")]
            if mode == "get" or resp.status != 200 or STOP in (location or "") or not idp \
                    or urlsplit(url).port != 9400:
                break
            method, action, data = idp[0]
            url = urljoin(url, action)
    jar.save(jar_path)
    print(json.dumps(result))

asyncio.run(main())
"""


@dataclass(frozen=True, slots=True)
class Page:
    status: int
    url: str
    location: str | None
    body: str

    def error(self) -> str:
        """The text of an error page's message (``<p id="error">``)."""
        found = re.search(r'id="error"[^>]*>([^<]*)<', self.body)
        return found[1] if found else ""


def browse(lab: Lab, mode: str, jar: Path, url: str) -> Page:
    """A browser in the internet namespace (cookies kept in ``jar``):
    ``sign-in`` follows redirects and fills the IdP's forms; ``to-callback`` stops at
    the redirect back to the gateway; ``get`` fetches one URL."""
    done = lab.internet.run(
        [sys.executable, "-c", BROWSER_SCRIPT, mode, str(jar), url],
        timeout=90,
        env={"PYTHONPATH": str(ROOT)},
    )
    return Page(**json.loads(done.stdout))


def enroll_call(lab: Lab, wiregate: Wiregate, body: dict[str, Any]) -> tuple[int, Any]:
    """``POST /api/v1/enroll`` from the internet namespace; the body (a token) via a file."""
    path = lab.workdir / "enroll-body.json"
    path.write_text(json.dumps(body))
    path.chmod(0o600)
    done = lab.internet.run(
        [
            "curl",
            "-s",
            "-m",
            "20",
            "-w",
            "\n%{http_code}",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            f"@{path}",
            f"{wiregate.server}/api/v1/enroll",
        ]
    )
    path.unlink()
    text, _, status = done.stdout.rpartition("\n")
    return int(status), json.loads(text)


def with_kid(token: str, kid: str) -> str:
    """``token`` with another ``kid`` in its header (the signature is left as it is)."""
    head, payload, signature = token.split(".")
    header = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))
    raw = json.dumps({**header, "kid": kid}, separators=(",", ":")).encode()
    return ".".join((base64.urlsafe_b64encode(raw).decode().rstrip("="), payload, signature))


def test_idp_unreachable_sessions_and_tunnels_carry_on_new_sign_ins_fail_clearly(
    lab: Lab,
) -> None:
    wiregate, issuer, public_url = start_sso_gateway(lab)
    wiregate.status_timeout = 90
    idp = next(p for p in lab.processes if p.name == "idp")
    a = enroll_by_workload_token(lab, wiregate, lab.add_host("a"), issuer, public_url)
    b = wiregate.start_agent(lab.add_host("b"), wiregate.create_key(tags="tag:lab"))
    wiregate.wait_mesh([a, b], timeout=180)
    keys_cached = time.monotonic()  # a enrolled: the workload verifier fetched the JWKS
    spare = mint_workload_token(lab, issuer, public_url, lab.workdir / "token-spare")
    session = lab.workdir / "session.jar"
    signed_in = browse(lab, "sign-in", session, f"{public_url}/devices")
    assert signed_in.status == 200 and "My devices" in signed_in.body, signed_in
    pending = lab.workdir / "pending.jar"  # a sign-in at the IdP, not yet back at the gateway
    callback = browse(lab, "to-callback", pending, f"{public_url}/devices").location
    assert callback and "/oidc/callback?" in callback, callback
    ping = start_ping(a.host, v4(wiregate, b))

    idp.stop()  # ---------------------------------------------------------- the IdP is gone
    down = time.monotonic()
    page = browse(lab, "get", session, f"{public_url}/devices")
    assert page.status == 200 and "My devices" in page.body, "the signed-in session stopped"
    back = browse(lab, "get", pending, urljoin(public_url, callback))
    assert back.status == 503, back
    assert "unreachable" in back.error() and issuer in back.error(), back.error()
    assert "Traceback" not in back.body
    print(f"sign-in completed while the IdP is down: {back.status} {back.error()!r}")

    # workload tokens: a cached key id enrolls, one that needs a JWKS fetch is refused
    status, doc = enroll_call(
        lab,
        wiregate,
        {"workload_token": spare.read_text().strip(), "name": "c", "public_key": new_public_key()},
    )
    assert status == 201, doc
    time.sleep(max(0.0, keys_cached + 31 - time.monotonic()))  # past the refetch cool-down
    forged = with_kid(spare.read_text().strip(), "rotated-key-1")
    status, doc = enroll_call(
        lab, wiregate, {"workload_token": forged, "name": "d", "public_key": new_public_key()}
    )
    print(f"workload token needing a JWKS fetch: {status} {doc}")
    assert status == 503 and doc["error"] == "jwks_unavailable", doc
    assert f"signing keys of issuer {issuer} unavailable" in doc["message"], doc
    refusals = ('method="workload_token"', 'reason="jwks_unavailable"')
    assert metric(lab, "wiregate_enrollment_refusals_total", *refusals) == 1

    # the agent's key rotates (device token only), its stream resumes after a gateway restart
    old = wiregate.status(a)["device"]["public_key"]
    a.host.run([*wiregate.cmd, "rotate", "--run-dir", str(a.run_dir)], timeout=60)
    new = wiregate.status(a)["device"]["public_key"]
    assert new != old
    poll(
        lambda: new in b.host.run(["wg", "show", b.iface, "peers"]).stdout,
        timeout=20,
        what="b to hold a's new key",
    )
    wiregate.stop_gateway()
    restart = time.monotonic()
    start_gateway(wiregate, lab.workdir / "gateway.toml")
    poll(lambda: all_connected(wiregate, [a, b]), timeout=60, what="agents to reconnect")
    print(
        f"agents reconnected {time.monotonic() - restart:.1f} s after a gateway restart "
        "with the IdP down"
    )
    page = browse(lab, "get", session, f"{public_url}/devices")
    assert page.status == 200 and "My devices" in page.body, "the session did not survive"
    fresh = lab.workdir / "fresh.jar"
    page = browse(lab, "sign-in", fresh, f"{public_url}/devices")
    print(f"new sign-in with the IdP down: {page.status} {page.error()!r}")
    assert page.status == 503, page
    assert "unreachable" in page.error() and issuer in page.error(), page.error()
    result = stop_ping(ping)
    print(
        f"ping a->b during the IdP outage: {result.transmitted} sent, "
        f"{result.received} received, lost {len(result.lost)}"
    )
    assert result.lost == ()

    # ---------------------------------------------------------------- the IdP comes back
    start_idp(lab, public_url)
    back_at = time.monotonic()
    fresh.unlink(missing_ok=True)

    def signs_in() -> Page | None:
        fresh.unlink(missing_ok=True)
        page = browse(lab, "sign-in", fresh, f"{public_url}/devices")
        return page if page.status == 200 and "My devices" in page.body else None

    poll(signs_in, timeout=60, interval=1.0, what="a new sign-in after the IdP came back")
    print(
        f"IdP down for {back_at - down:.1f} s; new sign-ins work "
        f"{time.monotonic() - back_at:.1f} s after it came back (no gateway restart)"
    )


# --------------------------------------------------------------------------- 3. clock skew

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
KEY_LIFETIME = "24h"  # rotation due at 2/3 of it: 16 h, far beyond the +-2 h of skew


@contextmanager
def skewed_clock(offset: str) -> Iterator[dict[str, str]]:
    """Processes started inside see the clock moved by ``offset`` (libfaketime; it moves
    the monotonic clock by as much: leaving it alone makes its clock_nanosleep fail with
    EINVAL). Go programs (wireguard-go) read the clock through the vDSO: not affected."""
    if not LIBFAKETIME.exists():
        pytest.fail("libfaketime is missing: scripts/setup.sh installs faketime")
    env = {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def key_with_device_lifetime(wiregate: Wiregate, lifetime: str) -> Path:
    """A reusable enrollment key whose devices' WireGuard keys expire after ``lifetime``."""
    doc = wiregate.admin_json(
        "keys", "create", "--tags", "tag:lab", "--reusable", "--device-key-expiry", lifetime
    )
    path = wiregate.lab.workdir / f"key-{doc['key']['id']}"
    write_secret(path, str(doc["secret"]))
    return path


def agent_clock_offset(agent: Agent) -> float:
    """How far the agent process's wall clock is from ours, read from its JSON log."""
    assert agent.proc is not None
    for line in agent.proc.output().splitlines():
        if line.startswith("{") and '"timestamp"' in line:
            stamp = json.loads(line)["timestamp"]
            at = datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
            return at - agent.proc.log.stat().st_ctime
    raise AssertionError("no timestamped log line from the agent")


@pytest.mark.parametrize("offset", ["+2h", "-2h"])
def test_an_agent_whose_clock_is_wrong_at_boot_enrolls_and_carries_traffic(
    lab: Lab,
    gateway_with_relays: Wiregate,
    monkeypatch: pytest.MonkeyPatch,
    offset: str,
) -> None:
    wiregate = gateway_with_relays
    wiregate.status_timeout = 90  # the CLI starts slowly on a loaded 2-core machine
    start_relays(lab, wiregate)
    routers = {n: lab.add_router(f"r{n}", nat="symmetric") for n in ("s1", "s2")}
    for router in routers.values():
        drop_unsolicited(router)
    hosts = {n: lab.add_host(n, behind=r) for n, r in routers.items()}
    hosts["o"] = lab.add_host("o")  # an open host
    for name, value in (
        ("STUN_SERVERS", json.dumps(STUN)),
        ("PATH_PROBE_TIMEOUT", "3"),
        ("RELAY_PING_INTERVAL", "1"),
        ("NETCHECK_INTERVAL", "15"),
        ("ROTATION_CHECK_INTERVAL", "1"),
    ):
        monkeypatch.setenv(f"WIREGATE_{name}", value)
    key = key_with_device_lifetime(wiregate, KEY_LIFETIME)
    agents: dict[str, Agent] = {}
    with skewed_clock(offset):  # s1 boots with a wrong clock
        agents["s1"] = wiregate.start_agent(hosts["s1"], key)
    for name in ("s2", "o"):
        agents[name] = wiregate.start_agent(hosts[name], key)
    started = time.monotonic()
    statuses = wiregate.wait_mesh(list(agents.values()), timeout=180)
    skew = agent_clock_offset(agents["s1"])
    print(
        f"{offset}: agent clock {skew:+.0f} s off; enrolled and mapped "
        f"{time.monotonic() - started:.1f} s after start"
    )
    assert abs(abs(skew) - 7200) < 120, f"the agent's clock is not skewed: {skew:+.0f} s"
    keys = {n: st["device"]["public_key"] for n, st in statuses.items()}

    # the symmetric pair goes through a relay: tickets and bindings work with a wrong clock
    def relayed() -> dict[str, Any] | None:
        peers = {p["name"]: p for p in wiregate.status(agents["s1"])["peers"]}
        path = peers["s2"]["path"] or {}
        return path if path.get("path") == "relayed" else None

    path = poll(relayed, timeout=90, interval=0.5, what="s1<->s2 on a relay")
    addresses = {n: wiregate.tunnel_addresses(a) for n, a in agents.items()}
    failed = [
        f"{a}->{b}"
        for a, b in (("s1", "s2"), ("s2", "s1"), ("s1", "o"), ("o", "s1"))
        if not ping_until(hosts[a], addresses[b][0], timeout=30)
    ]
    assert not failed, f"no traffic: {failed}"
    paths_now = {
        f"{n}->{p['name']}": (p["path"] or {}).get("path")
        for n in ("s1", "o")
        for p in wiregate.status(agents[n])["peers"]
    }
    print(f"{offset}: s1<->s2 relayed via {path.get('relay')}; paths {paths_now}")

    # no key rotation fires (the check runs every second); the key expires in 24 h
    time.sleep(5)
    now = wiregate.statuses(list(agents.values()))
    assert {n: st["device"]["public_key"] for n, st in now.items()} == keys, "a key rotated"
    rotations = [
        e for e in wiregate.admin_json("audit")["events"] if e["action"] == "device.rotate"
    ]
    assert rotations == []

    # handshake ages: the agent passes WireGuard's own timestamps through
    for peer in now["s1"]["peers"]:
        age = time.time() - (peer["last_handshake"] or 0)
        assert 0 <= age < 180, f"s1->{peer['name']}: handshake {age:.0f} s ago"
    status_cmd = [*wiregate.cmd, "status", "--run-dir", str(agents["s1"].run_dir)]
    shown = hosts["s1"].run(status_cmd, timeout=90).stdout
    ages = [int(a) for a in re.findall(r" (-?\d+)s ago ", shown)]
    assert len(ages) == 2 and all(0 <= a < 180 for a in ages), shown
    with skewed_clock(offset) as env:  # the same command under the agent's wrong clock
        skewed = hosts["s1"].run(status_cmd, env=env, timeout=90).stdout
    print(f"{offset}: wiregate status:\n{shown}\nunder the agent's clock:\n{skewed}")
