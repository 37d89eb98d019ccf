"""The peering broker: pushes each agent its network map over one WebSocket.

asyncio glue around the pure core in :mod:`gateway.mapping.netmap`. The store owns the
global, monotonically increasing map ``version``; the broker never invents one.

Per agent (from its first connection until its device is removed) the broker
keeps the version it last sent and a bounded history of the deltas it built for
it, connected or not, so a reconnect with ``?since=V`` can resume. A single
gateway forgets an agent that has been away for more deltas than its history
holds: it could only get a full map. A replica keeps it, as the agent may come
back from another replica with a later version that the history still reaches.

* ``since`` absent, unknown or too old → ``full``;
* ``since`` is the agent's latest version → ``sync``;
* ``since`` is the base of a delta in its history → the missed deltas, in order.

Each delta carries ``base`` (the previous version sent to that agent) and
``version``. A change's peer JSON is serialized once and each agent's message is
a short per-agent head joined to a shared body. Every connection has its own
bounded outbound queue and writer task: a slow agent never delays the others,
and one whose queue overflows is dropped (close 1013) and forgotten, so it
reconnects to a full map.

Changes are applied strictly in version order. Handlers hand a change over after
their commit, and two concurrent requests may do so out of order; a broker given a
feed reader (:meth:`Broker.fill_gaps`) holds a change that arrives ahead of a
missing version until the missing one arrives, and asks the store's change feed
for the gap (a version that had nothing to publish, or whose publisher failed
after its commit), so no committed change is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMessage, WSMsgType, web
from prometheus_client import Counter, Gauge, Histogram

from gateway.mapping.agentlog import AgentDelta, AgentLog, CloseItem, Item, Stream
from gateway.mapping.netmap import (
    AgentUpdate,
    Fanout,
    NetworkState,
    apply_remove,
    apply_upsert,
    encode_delta_body,
    encode_full,
    merge,
    signature,
)
from gateway.mapping.pods import PodMaps, PodTable, refresh, tails_around
from gateway.mapping.pods import encode_delta_body as encode_pod_delta_body
from gateway.mapping.pods import encode_full as encode_pod_full
from gateway.mapping.pods import swap as swap_pods
from gateway.mapping.policyswap import policy_fanout
from identity.policy import Policy
from wiregate.errors import BadInput, RemoteError
from wiregate.logging import get_logger
from wiregate.mapwire import (
    AgentEndpoints,
    AgentMessage,
    encode_revoked,
    encode_sync,
    parse_agent_frame,
)
from wiregate.model import Device, DnsConfig
from wiregate.pathwire import PathsReport
from wiregate.podwire import Pod, PodReport

__all__ = [
    "CONNECTED",
    "DELTAS_SENT",
    "FANOUT_SECONDS",
    "MAP_VERSION",
    "PODS_REFUSED",
    "POLICY_CHANGE",
    "Broker",
    "FeedChange",
    "OnEndpoints",
    "OnPaths",
    "OnPods",
    "read_agent_frame",
]

HEARTBEAT_S = 20.0
CLOSE_TIMEOUT_S = 5.0
MAX_AGENT_MESSAGE = 64 * 1024

CONNECTED = Gauge("wiregate_broker_connected_agents", "Agents with an open map stream")
DELTAS_SENT = Counter("wiregate_broker_deltas_sent", "Delta messages written to agent streams")
FANOUT_SECONDS = Histogram(
    "wiregate_broker_fanout_seconds",
    "Time from a map change to its delta being written to an agent's stream",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
MAP_VERSION = Gauge("wiregate_netmap_version", "Version of the network map held by the broker")
PODS_REFUSED = Counter(
    "wiregate_pods_refused",
    "Pods a node reported that the gateway refused, by reason",
    ["reason"],
)
PODS_HELD = Gauge("wiregate_pods", "Pods the gateway holds for the policy, over every node")

OnEndpoints = Callable[[str, AgentEndpoints], Awaitable[None]]
OnPaths = Callable[[str, PathsReport], Awaitable[None]]
OnPods = Callable[[str, PodReport], Awaitable[None]]


def read_agent_frame(msg: WSMessage) -> AgentMessage:
    """The message in an agent's WebSocket frame (``endpoints`` or ``paths``); only text
    frames carry one."""
    if msg.type is not WSMsgType.TEXT:
        raise BadInput(f"expected a text frame, got {msg.type.name}")
    return parse_agent_frame(msg.data)


@dataclass(frozen=True, slots=True)
class FeedChange:
    """One change read from the store's feed: ``device`` (its current record) for an
    upsert, ``removed`` with the ``reason`` its agent is told for a removal, ``policy``
    (the one that version put in force; ``device_id`` :data:`POLICY_CHANGE`) for a
    policy change, ``pods`` for a node's pod report (its ``device_id``)."""

    version: int
    device_id: str
    device: Device | None
    removed: bool = False
    reason: str | None = None
    policy: Policy | None = None
    pods: PodReport | None = None


POLICY_CHANGE = ""  # the device_id of a policy change, in the feed as here


def _subject(change: FeedChange) -> tuple[str, bool]:
    """What a feed change is the latest state of: a device, or a node's pods."""
    return change.device_id, change.pods is not None


log = get_logger("broker")


class Broker:
    """Network-map streams for every connected agent (see the module docstring)."""

    def __init__(
        self, policy: Policy | None = None, history: int = 64, queue_size: int = 256
    ) -> None:
        if history < 1 or queue_size <= history:
            raise ValueError("need history >= 1 and queue_size > history")
        self._policy = policy if policy is not None else Policy.allow_all()
        self._history = history
        self._queue_size = queue_size
        self._dns: DnsConfig | None = None  # the names' settings, in every self view
        self._pool: tuple[str, ...] = ()  # the tunnel address pool, in every self view
        self._state = NetworkState(self._policy)
        self._pods = PodMaps(self._policy)  # the nodes' pods, compiled per viewer
        self._version = 0
        self._logs: dict[str, AgentLog] = {}
        self._streams: dict[str, Stream] = {}
        self._wake: Callable[[], None] | None = None
        self._fill: Callable[[], None] | None = None
        self._pending: dict[int, FeedChange] = {}  # ahead of a missing version

    # -- changes from the store -------------------------------------------------

    def load(
        self,
        devices: Iterable[Device],
        version: int,
        policy: Policy | None = None,
        pods: Mapping[str, Iterable[Pod]] | None = None,
    ) -> None:
        """Replace the whole state (and the policy, if given; the nodes' pods, if given);
        connected agents get a full map (or revoked)."""
        if policy is not None:
            self._policy = policy
        self._state = NetworkState(self._policy, devices, dns=self._dns, pool=self._pool)
        table = self._pods.table
        if pods is not None:
            table = PodTable()
            for node, held in pods.items():
                if node in self._state:
                    table.apply(node, PodReport(True, tuple(held)), self._state.shown_routes(node))
        for node in table.nodes():
            if node in self._state:
                table.recheck(node, self._state.shown_routes(node))
            else:
                table.drop(node)
        self._pods = PodMaps(self._policy, table)
        PODS_HELD.set(len(table))
        self._set_version(version)
        self._logs.clear()
        for stream in list(self._streams.values()):
            if stream.device_id in self._state:
                self._push(stream, self._full(stream.device_id), None)
            else:
                self._revoke(stream.device_id, "device removed")
        self._settle()

    def set_dns(self, dns: DnsConfig | None) -> None:
        """The mesh domain and split-DNS zones that every map carries from the next :meth:`load`."""
        self._dns = dns

    def set_pool(self, ipv4: str, ipv6: str) -> None:
        """The tunnel address pool (the CIDRs IPAM allocates from) that every map carries
        from the next :meth:`load`: agents route it as one prefix per family."""
        self._pool = (ipv4, ipv6)

    def may_peer(self, a: Device, b: Device) -> bool:
        """Whether the policy the maps are built from lets ``a`` and ``b`` peer."""
        return self._policy.may_peer(signature(a), signature(b))

    @property
    def policy(self) -> Policy:
        """The policy the maps are built from."""
        return self._policy

    def set_policy(self, policy: Policy, version: int) -> None:
        """Put ``policy`` in force at ``version``, in version order with device changes:
        every agent whose map it changes gets a delta (peers added, removed, filtered
        anew; its own refused routes). A replica reads the change from the feed instead."""
        if self._wake is not None:
            self._wake()
            return
        self._offer(FeedChange(version, POLICY_CHANGE, None, policy=policy))

    def _swap_policy(self, policy: Policy, version: int) -> None:
        started = time.perf_counter()
        old = self._state
        self._policy = policy
        self._state = NetworkState(policy, old, dns=old.dns, pool=old.pool)  # the same devices
        fanout = policy_fanout(old, self._state)
        old_pods, self._pods = self._pods, PodMaps(policy, self._pods.table)
        if old_pods.table.nodes():
            fanout = merge(fanout, swap_pods(old, old_pods, self._state, self._pods))
        self._set_version(version)
        log.info("policy_applied", version=version, agents_told=len(fanout.updates))
        self._publish(fanout, version, started)

    def follow(self, wake: Callable[[], None]) -> None:
        """Replica mode: the store's change feed is the only source of changes.

        :meth:`upsert` and :meth:`remove` (called by this replica's handlers after
        their commit) only call ``wake``, so that the feed reads the change back
        with every other replica's, in version order (:meth:`apply_changes`).
        """
        self._wake = wake

    def fill_gaps(self, read: Callable[[], None]) -> None:
        """Single-gateway mode: :meth:`upsert` and :meth:`remove` apply changes in
        version order, holding one that arrives ahead of a missing version.

        ``read`` is called whenever a version is missing, so that the store's change
        feed fills the gap through :meth:`apply_changes`. Without a reader (a broker
        fed by hand) versions are taken as given.
        """
        self._fill = read

    @property
    def following(self) -> bool:
        """Whether changes come from the store's change feed (replica mode)."""
        return self._wake is not None

    def apply_changes(self, head: int, changes: Sequence[FeedChange]) -> None:
        """Apply the changes the feed read, all settled up to ``head``, from one snapshot.

        Each device's *last* change in the batch is applied (at its version): the
        records are the snapshot's, so an earlier upsert would otherwise carry a
        later state at an earlier version, and a replica's deltas would disagree
        with another's about what a version held.
        """
        last = {_subject(change): change.version for change in changes}
        for change in changes:
            if last[_subject(change)] != change.version or change.version <= self._version:
                continue
            self._apply(change)
        if head > self._version:
            self._set_version(head)
        self._settle()

    def upsert(self, device: Device, version: int) -> None:
        """Add or change a device at ``version`` and push the deltas it causes."""
        if self._wake is not None:
            self._wake()
            return
        self._offer(FeedChange(version, device.id, device))

    def _upsert(self, device: Device, version: int) -> None:
        started = time.perf_counter()
        state, pods = self._state, self._pods
        old = state.get(device.id)
        watch = pods.active and (
            old is None or signature(old) != signature(device) or old.routes != device.routes
        )
        before = tails_around(state, pods, [device.id]) if watch else {}
        fanout = apply_upsert(state, device)
        if watch:  # what the device's pods, or pods it sees, may open changed with it
            pods.table.recheck(device.id, state.shown_routes(device.id))
            pods.forget(device.id)
            fanout = merge(fanout, refresh(state, before, tails_around(state, pods, [device.id])))
        fanout = self._reclaimed(fanout, device.id)
        self._set_version(version)
        self._publish(fanout, version, started)

    def _reclaimed(self, fanout: Fanout, changed: str) -> Fanout:
        """Check again the pods of nodes whose approved routes another device let go of in
        ``fanout`` (their own view changed: fewer refused routes)."""
        state, pods = self._state, self._pods
        if not pods.active:
            return fanout
        for node, update in list(fanout.updates.items()):
            if node != changed and update.self_view is not None and node in pods.table:
                before = tails_around(state, pods, [node])
                pods.table.recheck(node, state.shown_routes(node))
                pods.forget(node)
                fanout = merge(fanout, refresh(state, before, tails_around(state, pods, [node])))
        return fanout

    def pods(self, device_id: str, report: PodReport, version: int) -> None:
        """A node's pod report, stored at ``version``: its pods inside its own approved pod
        CIDRs are kept; the viewers whose pod rules change get a delta. A replica reads
        the node's pods from the feed instead."""
        if self._wake is not None:
            self._wake()
            return
        self._offer(FeedChange(version, device_id, None, pods=report))

    def _apply_pods(self, node_id: str, report: PodReport, version: int) -> None:
        started = time.perf_counter()
        if node_id not in self._state:  # removed meanwhile
            self._set_version(version)
            return
        routes = self._state.shown_routes(node_id)
        result = self._pods.table.apply(node_id, report, routes)
        for pod, reason in result.refused:
            PODS_REFUSED.labels(reason="outside" if "outside" in reason else "too_many").inc()
            log.warning("pod_refused", device_id=node_id, pod=pod.key, ips=list(pod.ips),
                        reason=reason)  # fmt: skip
        fanout = self._pods.change(self._state, node_id, result.changes)
        PODS_HELD.set(len(self._pods.table))
        self._set_version(version)
        self._publish(fanout, version, started)

    def remove(self, device_id: str, version: int, reason: str = "device removed") -> None:
        """Remove a device at ``version``: its viewers drop it, its own stream is revoked
        (told ``reason``)."""
        if self._wake is not None:
            self._wake()
            return
        self._offer(FeedChange(version, device_id, None, removed=True, reason=reason))

    def _offer(self, change: FeedChange) -> None:
        if change.version <= self._version:  # the feed brought it first
            log.info("map change already applied", version=change.version, current=self._version)
            return
        if self._fill is not None and change.version > self._version + 1:
            self._pending.setdefault(change.version, change)
            log.info("map change held for a missing version", version=change.version,
                     current=self._version)  # fmt: skip
            self._fill()
            return
        self._apply(change)
        self._settle()

    def _apply(self, change: FeedChange) -> None:
        if change.policy is not None:
            self._swap_policy(change.policy, change.version)
        elif change.pods is not None:
            self._apply_pods(change.device_id, change.pods, change.version)
        elif change.device is not None:
            self._upsert(change.device, change.version)
        elif change.removed:
            self._remove(change.device_id, change.version, change.reason or "device removed")

    def _settle(self) -> None:
        """Apply the held changes that are next in order; read the feed for a gap left."""
        if not self._pending:
            return
        for version in [v for v in self._pending if v <= self._version]:
            del self._pending[version]  # applied from the feed, with a newer record
        while (change := self._pending.pop(self._version + 1, None)) is not None:
            self._apply(change)
        if self._pending and self._fill is not None:
            self._fill()

    def _remove(self, device_id: str, version: int, reason: str) -> None:
        started = time.perf_counter()
        fanout = apply_remove(self._state, device_id)
        self._pods.table.drop(device_id)  # its pods go with it
        self._pods.forget(device_id)
        fanout = self._reclaimed(fanout, device_id)
        PODS_HELD.set(len(self._pods.table))
        self._set_version(version)
        self._publish(fanout, version, started)
        self._revoke(device_id, reason)

    def device(self, device_id: str) -> Device:
        """The device as the broker knows it; :class:`~wiregate.errors.NotFound` if unknown."""
        return self._state.device(device_id)

    def route_owners(self, route: str) -> list[Device]:
        """The devices carrying a route that overlaps ``route``, by id."""
        return [self._state.device(i) for i in sorted(self._state.route_owners(route))]

    @property
    def version(self) -> int:
        """The map version the broker holds."""
        return self._version

    @property
    def connected(self) -> int:
        """How many agents have an open stream."""
        return len(self._streams)

    def connected_ids(self) -> frozenset[str]:
        """The devices whose agent has an open stream now."""
        return frozenset(self._streams)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._state

    def _set_version(self, version: int) -> None:
        self._version = version
        MAP_VERSION.set(version)

    # -- fan-out ----------------------------------------------------------------

    def _publish(self, fanout: Fanout, version: int, started: float) -> None:
        bodies: dict[object, str] = {}
        for agent, update in fanout.updates.items():
            agent_log = self._logs.get(agent)
            if agent_log is None:  # never connected, or away for good: a full map next
                continue
            delta = AgentDelta(
                agent_log.version,
                version,
                self._self_text(agent, update),
                self._body(bodies, agent, update),
            )
            if not agent_log.add(delta):  # away for good: no state for it
                del self._logs[agent]
                continue
            stream = self._streams.get(agent)
            if stream is not None:
                self._push(stream, delta, started)

    def _body(self, bodies: dict[object, str], agent: str, update: AgentUpdate) -> str:
        pods = self._pods
        if pods.active and update.upsert:  # pod rules are per viewer: shared by equal tails
            tails = tuple(pods.tail(self._state, agent, pid) for pid in update.upsert)
            if any(tail != ("", "") for tail in tails):
                key = (id(update), tails)
                body = bodies.get(key)
                if body is None:
                    body = bodies[key] = encode_pod_delta_body(self._state, update, tails)
                return body
        body = bodies.get(id(update))
        if body is None:
            body = bodies[id(update)] = encode_delta_body(self._state, update)
        return body

    def _self_text(self, agent: str, update: AgentUpdate) -> str | None:
        return None if update.self_view is None else self._state.self_text(agent)

    def _push(self, stream: Stream, item: str | AgentDelta, started: float | None) -> None:
        if stream.closing:
            return
        try:
            stream.queue.put_nowait((item, started))
        except asyncio.QueueFull:
            log.warning("agent too slow, dropping its stream", device_id=stream.device_id)
            self._logs.pop(stream.device_id, None)  # reconnect gets a full map
            self._drop(stream, WSCloseCode.TRY_AGAIN_LATER, "too slow, reconnect")

    def _revoke(self, device_id: str, reason: str) -> None:
        self._logs.pop(device_id, None)
        stream = self._streams.get(device_id)
        if stream is None or stream.closing:
            return
        self._unregister(stream)
        while not stream.queue.empty():  # nothing queued matters any more
            stream.queue.get_nowait()
        stream.queue.put_nowait((encode_revoked(reason), None))
        stream.queue.put_nowait((CloseItem(WSCloseCode.OK, reason), None))
        stream.closing = True

    # -- opening a stream -------------------------------------------------------

    def _opening(self, device_id: str, since: int | None) -> list[str | AgentDelta]:
        agent_log = self._logs.get(device_id)
        if agent_log is not None:
            agent_log.away_from = None
        if since is not None and agent_log is None and since == self._version:
            agent_log = self._logs[device_id] = self._new_log(since)
        if since is not None and agent_log is not None:
            if since == agent_log.version:
                return [encode_sync(since)]
            missed = agent_log.since(since)
            if missed is not None:
                return list(missed)
        return [self._full(device_id)]

    def _full(self, device_id: str) -> str:
        self._logs[device_id] = self._new_log(self._version)
        if self._pods.active:
            return encode_pod_full(self._state, self._pods, device_id, self._version)
        return encode_full(self._state, device_id, self._version)

    def _new_log(self, version: int) -> AgentLog:
        return AgentLog(version=version, entries=deque(maxlen=self._history))

    def _attach(
        self, device_id: str, request: web.Request, ws: web.WebSocketResponse, since: int | None
    ) -> Stream:
        old = self._streams.get(device_id)
        if old is not None:
            self._drop(old, WSCloseCode.OK, "replaced by a newer stream")
        queue: asyncio.Queue[Item] = asyncio.Queue(self._queue_size)
        stream = Stream(device_id, ws, request.transport, queue)
        for item in self._opening(device_id, since):
            queue.put_nowait((item, None))
        stream.writer = asyncio.create_task(self._write(stream))
        self._streams[device_id] = stream
        CONNECTED.inc()
        return stream

    # -- serving ----------------------------------------------------------------

    async def serve(
        self,
        request: web.Request,
        device_id: str,
        since: int | None,
        on_endpoints: OnEndpoints,
        on_paths: OnPaths | None = None,
        on_pods: OnPods | None = None,
    ) -> web.WebSocketResponse:
        """Run the map stream of ``device_id`` until it closes.

        The caller has authenticated the device. ``since`` is the version the
        agent holds (``?since=``), if any. Agent ``endpoints`` messages are
        passed to ``on_endpoints``, ``paths`` messages to ``on_paths`` and ``pods``
        messages to ``on_pods`` (each ignored without one); any other message closes
        the stream (1008).
        """
        ws = web.WebSocketResponse(
            heartbeat=HEARTBEAT_S,
            timeout=CLOSE_TIMEOUT_S,
            max_msg_size=MAX_AGENT_MESSAGE,
            compress=False,
        )
        await ws.prepare(request)
        if device_id not in self._state:
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"unknown device")
            return ws
        stream = self._attach(device_id, request, ws, since)
        try:
            await self._read(stream, on_endpoints, on_paths, on_pods)
        finally:
            await self._detach(stream)
        return ws

    async def _read(
        self,
        stream: Stream,
        on_endpoints: OnEndpoints,
        on_paths: OnPaths | None,
        on_pods: OnPods | None = None,
    ) -> None:
        async for msg in stream.ws:
            if stream.closing:
                return
            try:
                message = read_agent_frame(msg)
                if isinstance(message, AgentEndpoints):
                    await on_endpoints(stream.device_id, message)
                elif isinstance(message, PathsReport) and on_paths is not None:
                    await on_paths(stream.device_id, message)
                elif isinstance(message, PodReport) and on_pods is not None:
                    await on_pods(stream.device_id, message)
            except RemoteError as exc:
                log.warning(
                    "closing agent stream: bad message",
                    device_id=stream.device_id,
                    error=exc.message,
                )
                self._drop(stream, WSCloseCode.POLICY_VIOLATION, exc.message[:100])
                return

    async def _write(self, stream: Stream) -> None:
        try:
            while await self._send_next(stream):
                pass
        except ConnectionError as exc:
            log.info("agent stream write failed", device_id=stream.device_id, error=str(exc))

    async def _send_next(self, stream: Stream) -> bool:
        # A function of its own so that the message (a full map can be megabytes)
        # is released once written, not held while the writer waits for the next.
        item, started = await stream.queue.get()
        if isinstance(item, CloseItem):
            await self._shut(stream, item.code, item.reason)
            return False
        await stream.ws.send_str(item if isinstance(item, str) else item.render())
        if started is not None:
            DELTAS_SENT.inc()
            FANOUT_SECONDS.observe(time.perf_counter() - started)
        return True

    def _drop(self, stream: Stream, code: int, reason: str) -> None:
        """Stop sending to ``stream`` and close it in the background."""
        self._unregister(stream)
        if stream.closing:
            return
        stream.closing = True
        if stream.writer is not None:
            stream.writer.cancel()
        stream.closer = asyncio.create_task(self._shut(stream, code, reason))

    async def _shut(self, stream: Stream, code: int, reason: str) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(
                stream.ws.close(code=code, message=reason.encode()), CLOSE_TIMEOUT_S + 1
            )
        failed = stream.ws.close_code in (None, WSCloseCode.ABNORMAL_CLOSURE)
        if failed and stream.transport is not None:
            stream.transport.abort()  # a stalled peer: do not wait for its buffer to drain

    def _unregister(self, stream: Stream) -> None:
        if self._streams.get(stream.device_id) is stream:
            del self._streams[stream.device_id]
            CONNECTED.dec()

    async def _detach(self, stream: Stream) -> None:
        self._unregister(stream)
        agent_log = self._logs.get(stream.device_id)
        if agent_log is not None and stream.device_id not in self._streams and not self.following:
            agent_log.away_from = agent_log.version  # only this broker gives it versions
        if not stream.closing and stream.writer is not None:
            stream.writer.cancel()
        tasks = [t for t in (stream.writer, stream.closer) if t is not None]
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Close every stream with 1012 ("service restart"), for a graceful shutdown."""
        streams = list(self._streams.values())
        for stream in streams:
            self._drop(stream, WSCloseCode.SERVICE_RESTART, "service restart")
        closers = [s.closer for s in streams if s.closer is not None]
        await asyncio.gather(*closers, return_exceptions=True)
