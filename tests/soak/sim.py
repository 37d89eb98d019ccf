"""Simulated agents: the real agent's protocol against real gateways, without a data plane.

Each :class:`SimAgent` enrolls with :class:`~agent.gateway_client.ControlClient`
(the agent's own client), holds its map stream through the same client and
applies every message with :class:`~agent.session.MapSession` (the
agent's own state machine), advertises endpoints as the agent does (after every
full map, and when they change), rotates its key through
``POST /api/v1/devices/self/rotate`` and switches when its ``self`` carries the
new key, disconnects and comes back with ``?since=``. A stream that ends by
itself is resumed with the agent's backoff. :class:`Fleet` runs them all on one
event loop with a random schedule and a bound on concurrent requests, deletes
devices through the admin API and replaces departed ephemeral agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent.gateway_client import ControlClient
from agent.rotation import ROTATE_PATH
from agent.session import Action, MapSession
from agent.state import Enrollment
from wiregate.cli.admin_client import AdminClient
from wiregate.errors import RemoteError, Unauthorized, Unavailable, WiregateError
from wiregate.keys import encode_key, generate_private_key, public_from_private

__all__ = ["Fleet", "FleetConfig", "SimAgent"]

# Endpoints the simulated agents advertise: lab internet addresses no host uses.
FAKE_HOSTS = range(200, 255)
ACTIONS = ("endpoints", "rotate", "reconnect")
ACTION_WEIGHTS = (0.45, 0.3, 0.25)


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """What the fleet connects to and how hard it churns."""

    gateways: tuple[str, ...]  # base URLs, one per replica
    admin_sockets: tuple[Path, ...]
    keys: Mapping[str, str]  # kind (sim, probe, ephemeral) -> enrollment key secret
    agents: int
    probes: int  # agents tagged tag:probe (they peer with the real agents)
    ephemeral: int  # agents enrolled with an ephemeral key; they depart for good
    mean_action_s: float  # mean time between two actions of one agent
    mean_delete_s: float  # mean time between two admin deletions
    seed: int = 1
    max_inflight: int = 12  # concurrent enroll/rotate/admin requests
    min_rotation_s: float = 6.0  # the gateway refuses rotations within 5 s


@dataclass
class Tally:
    """Counters of everything the fleet did and saw, and the unexpected errors."""

    counts: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    departed_at: float = 0.0  # when the last ephemeral agent departed (time.time())

    def error(self, what: str) -> None:
        self.counts["errors"] += 1
        if len(self.errors) < 50:
            self.errors.append(what)


def fake_endpoints(rng: random.Random) -> list[str]:
    hosts = rng.choices(FAKE_HOSTS, k=rng.randint(1, 3))
    return [f"198.51.100.{host}:{rng.randint(20000, 60000)}" for host in hosts]


class SimAgent:
    """One simulated agent (see the module docstring)."""

    def __init__(self, fleet: Fleet, index: int, kind: str) -> None:
        self.fleet = fleet
        self.index = index
        self.kind = kind  # sim, probe or ephemeral
        self.name = f"{kind}{index}"
        self.rng = random.Random(fleet.config.seed * 100_003 + index)
        self.private = generate_private_key()
        self.pending: tuple[bytes, str] | None = None  # next key, registered, not yet in map
        self.enrollment: Enrollment | None = None
        self.session = MapSession()
        self.endpoints = fake_endpoints(self.rng)
        self.state = "new"  # new, online, offline, revoked, departed
        self.ws: Any = None
        self.task: asyncio.Task[None] | None = None
        self.last_rotation = 0.0
        self.opened = asyncio.Event()  # set by the first message of each stream
        self.opened_kind: str | None = None

    @property
    def public_key(self) -> str:
        return encode_key(public_from_private(self.private))

    @property
    def tally(self) -> Tally:
        return self.fleet.tally

    # -- enrollment and the stream ------------------------------------------------

    async def enroll(self) -> None:
        self.private, self.pending = generate_private_key(), None
        self.session = MapSession()
        self.enrollment = await self.fleet.control().enroll(
            self.fleet.config.keys[self.kind], self.public_key, self.name, self.endpoints, []
        )
        self.state = "offline"
        self.tally.counts["enroll"] += 1

    def connect(self) -> None:
        self.state = "online"
        self.opened.clear()
        self.task = asyncio.create_task(self._stream_forever(), name=f"stream-{self.name}")

    async def disconnect(self, final: str = "offline") -> None:
        """Stop streaming as a stopping agent does: its stream task is cancelled, which
        closes the WebSocket (close frame) on the way out."""
        self.state = final
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.ws = None

    async def _stream_forever(self) -> None:
        delay = 0.5
        while self.state == "online":
            try:
                await self._stream_once(self.fleet.control(self.rng))
                delay = 0.5
            except Unauthorized:
                self.state = "revoked"
            except Unavailable as exc:
                self.tally.counts["stream_unavailable"] += 1
                self.tally.error(f"{self.name}: {exc.message}")
            if self.state != "online":
                return
            self.tally.counts["stream_resumed"] += 1  # ended by itself: resume as the agent does
            await asyncio.sleep(delay * (0.5 + self.rng.random()))
            delay = min(delay * 2, 30.0)

    async def _stream_once(self, control: ControlClient) -> None:
        assert self.enrollment is not None
        since = self.session.version
        first = True
        async for message, ws in control.stream(self.enrollment.token, since):
            self.ws = ws
            kind = message.get("type") if isinstance(message, dict) else None
            self.tally.counts[f"msg_{kind}"] += 1
            if first:
                self.tally.counts[f"open_{'fresh' if since is None else 'since'}_{kind}"] += 1
                self.opened_kind, first = kind, False
                self.opened.set()
            outcome = self.session.receive(message)
            if outcome.action is Action.APPLY:
                self._switch_key()
            elif outcome.action is Action.REVOKED:
                self.state = "revoked"
                self.tally.counts["revoked_seen"] += 1
                return
            elif outcome.action is Action.RESYNC:
                self.tally.error(f"{self.name}: resync: {outcome.reason}")
                self.session = MapSession(self.session.netmap)
                await ws.close()
                return
            if kind == "full":
                await self._advertise()
        self.ws = None

    def _switch_key(self) -> None:
        """The map names our next key: the agent sets it in this apply."""
        netmap = self.session.netmap
        pending = self.pending
        if pending is not None and netmap is not None and netmap.self_view.public_key == pending[1]:
            self.private, self.pending = pending[0], None
            self.tally.counts["rotate_switched"] += 1

    async def _advertise(self) -> None:
        ws = self.ws
        if ws is not None and not ws.closed:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await ws.send_json({"type": "endpoints", "endpoints": self.endpoints})

    async def verify_resume(self) -> str:
        """Reconnect with ``since``: the gateway must agree with the map we hold (``sync``,
        or a full map equal to it); a problem, or "" when it does."""
        held = self.session.netmap
        await self.disconnect()
        self.connect()
        try:
            await asyncio.wait_for(self.opened.wait(), 15)
        except TimeoutError:
            return f"{self.name}: no message within 15 s of resuming"
        now = self.session.netmap
        if self.opened_kind == "sync":
            return ""
        same = (
            held is not None
            and now is not None
            and (now.self_view, now.peers)
            == (
                held.self_view,
                held.peers,
            )
        )
        if self.opened_kind == "full" and same:
            return ""
        return f"{self.name}: resumed at {held and held.version} with a {self.opened_kind} message"

    # -- actions ------------------------------------------------------------------

    async def act(self, action: str) -> None:
        if action == "endpoints" and self.state == "online":
            self.endpoints = fake_endpoints(self.rng)
            await self._advertise()
            self.tally.counts["endpoints"] += 1
        elif action == "rotate":
            await self.rotate()
        elif action == "reconnect":
            await self.disconnect()
            await asyncio.sleep(self.rng.uniform(0.5, 8.0))
            if self.state == "offline":
                self.connect()
                self.tally.counts["reconnect"] += 1

    async def rotate(self) -> None:
        now = time.monotonic()
        if self.enrollment is None or now - self.last_rotation < self.fleet.config.min_rotation_s:
            return
        nxt = generate_private_key()
        public = encode_key(public_from_private(nxt))
        self.pending = (nxt, public)
        url = self.fleet.config.gateways[self.rng.randrange(len(self.fleet.config.gateways))]
        headers = {"Authorization": f"Bearer {self.enrollment.token}"}
        async with self.fleet.http.post(
            url + ROTATE_PATH, json={"public_key": public}, headers=headers
        ) as resp:
            body = await resp.json(content_type=None)
        if resp.status == 200:
            self.last_rotation = now
            self.tally.counts["rotate"] += 1
            self._switch_key()  # the delta may have come first
        elif resp.status in (401, 404):  # deleted meanwhile
            self.pending = None
        else:
            self.pending = None
            self.tally.error(f"{self.name}: rotate answered {resp.status}: {body}")

    async def life(self, stop: asyncio.Event) -> None:
        """Enroll, stream, and act on a random schedule until ``stop``."""
        cfg = self.fleet.config
        while not stop.is_set():
            if self.state in ("new", "revoked"):
                if self.state == "revoked":  # a removed device's owner enrolls it again later
                    await asyncio.sleep(self.rng.uniform(1.0, 5.0))
                await self._guarded(self.enroll())
                if self.state == "offline":
                    self.connect()
                continue
            pause = self.rng.expovariate(1 / cfg.mean_action_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
            if stop.is_set() or self.state in ("revoked", "departed"):
                continue
            if self.kind == "ephemeral" and self.rng.random() < 0.15:
                await self.disconnect("departed")
                self.tally.counts["departed"] += 1
                self.tally.departed_at = time.time()
                self.fleet.replace(self)
                return
            action = self.rng.choices(ACTIONS, ACTION_WEIGHTS)[0]
            await self._guarded(self.act(action))

    async def _guarded(self, work: Awaitable[None]) -> None:
        async with self.fleet.slots:
            try:
                await work
            except (WiregateError, aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.tally.error(f"{self.name}: {type(exc).__name__}: {exc}")
                if self.state == "new":
                    await asyncio.sleep(1.0)


class Fleet:
    """Every simulated agent, their schedule and the admin deletions."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.tally = Tally()
        self.agents: list[SimAgent] = []
        self.deleted: set[str] = set()  # device ids removed by the admin
        self.rng = random.Random(config.seed)
        self.slots = asyncio.Semaphore(config.max_inflight)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=30, connect=5),
        )
        self._next_index = 0

    def control(self, rng: random.Random | None = None) -> ControlClient:
        """A client of one replica (chosen at random: agents spread over every replica)."""
        gateways = self.config.gateways
        return ControlClient(gateways[(rng or self.rng).randrange(len(gateways))], self.http)

    def admin(self) -> AdminClient:
        sockets = self.config.admin_sockets
        return AdminClient(socket=sockets[self.rng.randrange(len(sockets))])

    def _spawn(self, kind: str) -> SimAgent:
        agent = SimAgent(self, self._next_index, kind)
        self._next_index += 1
        self.agents.append(agent)
        self._tasks.append(asyncio.create_task(agent.life(self._stop), name=f"life-{agent.name}"))
        return agent

    def replace(self, departed: SimAgent) -> None:
        """A departed ephemeral agent makes room for a new one (the population stays)."""
        if not self._stop.is_set():
            self._spawn(departed.kind)

    async def start(self, ramp_s: float) -> None:
        """Start every agent, spread over ``ramp_s`` seconds."""
        cfg = self.config
        kinds = ["probe"] * cfg.probes + ["ephemeral"] * cfg.ephemeral
        kinds += ["sim"] * (cfg.agents - len(kinds))
        for kind in kinds:
            self._spawn(kind)
            await asyncio.sleep(ramp_s / max(1, len(kinds)))
        self._tasks.append(asyncio.create_task(self._deleter(), name="deleter"))

    async def _deleter(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                pause = self.rng.expovariate(1 / self.config.mean_delete_s)
                await asyncio.wait_for(self._stop.wait(), pause)
            if self._stop.is_set():
                return
            victims = [a for a in self.agents if a.state == "online" and a.kind != "ephemeral"]
            if not victims or (victim := self.rng.choice(victims)).enrollment is None:
                continue
            device_id = victim.enrollment.device_id
            async with self.slots:
                try:
                    await self.admin().call("DELETE", f"/api/v1/devices/{device_id}")
                except RemoteError as exc:
                    self.tally.error(f"admin delete {device_id}: {exc.message}")
                    continue
            self.deleted.add(device_id)
            self.tally.counts["admin_delete"] += 1

    async def stop(self) -> None:
        """Stop the schedule; every agent finishes the action it is in."""
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def live(self) -> list[SimAgent]:
        """Agents whose device should exist (enrolled, neither revoked nor departed)."""
        return [a for a in self.agents if a.enrollment and a.state in ("online", "offline")]

    def settle(self) -> None:
        """Bring every live agent online (the offline ones reconnect with ``since``)."""
        for agent in self.live():
            if agent.state == "offline":
                agent.connect()

    async def close(self) -> None:
        """Disconnect every agent and close the HTTP session."""
        await asyncio.gather(*(a.disconnect() for a in self.agents if a.task is not None))
        await self.http.close()

    def versions(self) -> dict[str, int | None]:
        return {a.name: a.session.version for a in self.live()}

    def summary(self) -> dict[str, Any]:
        states = Counter(a.state for a in self.agents)
        return {"agents_ever": len(self.agents), "states": dict(states),
                "counts": dict(sorted(self.tally.counts.items())),
                "errors": list(self.tally.errors)}  # fmt: skip


def connected(agents: Sequence[SimAgent]) -> list[SimAgent]:
    return [a for a in agents if a.state == "online" and a.ws is not None and not a.ws.closed]
