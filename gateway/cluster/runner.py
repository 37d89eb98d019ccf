"""The peer Services controller: keeps the cluster's Services and EndpointSlices in step
with the device list (see :mod:`gateway.cluster.peers` for what it writes).

One gateway replica does the work: the one holding the ``peer-services`` lease in the
store (the mechanism the expiry sweeper uses). Each round (every ``tick`` seconds):

* renew the lease (every ``LEASE_RENEW_S``); a replica without it forgets its state
  and starts with a full resync when it gets it;
* a **full resync** when due (at start, every ``resync`` seconds, after any failure):
  the devices from the store and the managed objects listed from the API, planned
  and applied, which also removes drift (objects edited or deleted by hand, objects
  of devices removed while no replica held the lease);
* otherwise, when the broker's map version moved (an enrollment, a revocation, a
  rename, new addresses), the store's change feed since the last version applied
  updates the devices, and the plan against the objects last seen is applied.

API faults: a 409 on create (the name exists) re-reads the object: one this
controller manages is replaced, anyone else's is left alone and reported; a 409 on
replace (a concurrent write) re-reads and retries with the new ``resourceVersion``
(a few times); a 404 on delete means done. A 403 (missing RBAC) or an unreachable API
stops the round: logged once with its hint, counted, reported by
``wiregate_peer_services_forbidden`` / :meth:`PeerServices.status`, retried with a
doubling back-off (up to the resync interval) as a full resync.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from aiohttp import web
from prometheus_client import Counter, Gauge

from gateway.appkeys import BROKER, STORE
from gateway.cluster.kubeclient import PeerApi, connect
from gateway.cluster.peers import (
    LABEL_SERVICE_NAME,
    Create,
    Delete,
    Desired,
    Kind,
    Observed,
    Operation,
    Replace,
    Selection,
    desired,
    merged,
    observed,
    owned,
    parse_port,
    plan,
)
from gateway.store.records import DeviceRecord
from gateway.store.replication import ChangeKind, ChangeRow
from wiregate.clock import Clock
from wiregate.errors import Conflict, Forbidden, NotFound, Unavailable, WiregateError
from wiregate.logging import get_logger
from wiregate.model import Device
from wiregate.settings import GatewaySettings
from wiregate.tasks import cancel_and_wait

__all__ = [
    "LEASE",
    "PEER_SERVICES",
    "DeviceSource",
    "PeerServices",
    "peer_services_ctx",
    "selection_of",
]

_DEVICE_CHANGES = frozenset({ChangeKind.UPSERT, ChangeKind.REMOVE})

LEASE = "peer-services"
LEASE_RENEW_S = 10.0
LEASE_TTL_S = 30.0  # another replica takes over this long after the holder stops renewing
TICK_S = 0.5  # how often the broker's version is looked at (no I/O unless it moved)
RETRIES = 3  # replaces retried after a 409 conflict
BACKOFF_MIN_S = 5.0  # after a failed round; doubled each time, up to the resync interval

OPERATIONS = Counter(
    "wiregate_peer_services_operations",
    "Writes to the Kubernetes API by the peer Services controller",
    ["op", "kind", "result"],
)
OBJECTS = Gauge("wiregate_peer_services_objects", "Managed objects in the cluster", ["kind"])
FORBIDDEN = Gauge(
    "wiregate_peer_services_forbidden", "1 while the Kubernetes API refuses the controller (403)"
)
FAILING = Gauge("wiregate_peer_services_failing", "1 while the last round failed (any fault)")
LEADER = Gauge("wiregate_peer_services_leader", "1 while this replica holds the lease")
SKIPPED = Gauge(
    "wiregate_peer_services_skipped_devices", "Selected devices without a Service (bad names)"
)
NAME_TAKEN = Counter(
    "wiregate_peer_services_name_taken",
    "Creates refused because an object wiregate does not manage has the name",
)

_log = get_logger("gateway.cluster")

ApiFactory = Callable[[], PeerApi]


class DeviceSource(Protocol):
    """What the controller reads from the store (:class:`~gateway.store.Store`)."""

    async def map_version(self) -> int: ...

    async def list_devices(self) -> list[DeviceRecord]: ...

    async def changes_since(
        self, version: int
    ) -> tuple[int, list[tuple[ChangeRow, DeviceRecord | None]]] | None: ...

    async def take_lease(self, name: str, holder: str, ttl: float) -> bool: ...


_T = TypeVar("_T")


def selection_of(settings: GatewaySettings) -> Selection:
    """The devices, namespace and ports the settings choose."""
    ports = tuple(parse_port(p) for p in settings.peer_services_ports)
    return Selection(settings.peer_services_namespace, settings.peer_services_tag, ports)


@dataclass
class _State:
    """What the lease holder knows: devices at ``version`` and the objects last seen."""

    version: int
    devices: dict[str, Device]
    objects: dict[tuple[Kind, str], Observed]


class PeerServices:
    """The controller (see the module docstring); :meth:`step` is one round."""

    def __init__(
        self,
        store: DeviceSource,
        selection: Selection,
        api_factory: ApiFactory,
        *,
        map_version: Callable[[], int],
        holder: str,
        resync: float = 300.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._store = store
        self._selection = selection
        self._factory = api_factory
        self._map_version = map_version
        self._holder = holder
        self._resync = resync
        self._clock = clock
        self._api: PeerApi | None = None
        self._state: _State | None = None
        self._leader = False
        self._lease_at = float("-inf")
        self._next_full = float("-inf")
        self._backoff = 0.0
        self._retry_at = float("-inf")
        self.last_error: WiregateError | None = None
        self.skipped: tuple[str, ...] = ()

    # -- rounds ----------------------------------------------------------------------

    async def step(self) -> bool:
        """One round; whether this replica did any work (it holds the lease and was due)."""
        now = self._clock()
        if not await self._lease(now) or now < self._retry_at:
            return False
        try:
            if self._state is None or now >= self._next_full:
                await self.resync()
            elif self._map_version() > self._state.version:
                await self._follow(self._state)
            else:
                return False
        except WiregateError as exc:
            self._failed(exc, now)
            return True
        except Exception as exc:  # a client or store fault of another kind: same back-off
            _log.exception("peer_services_round_failed")
            self._failed(Unavailable(f"peer Services round failed: {exc!r}"), now)
            return True
        self._recovered()
        return True

    async def resync(self) -> None:
        """Read everything (devices, managed objects), then fix every difference."""
        version = await self._store.map_version()  # first: later changes are re-applied
        devices = {r.device.id: r.device for r in await self._store.list_devices()}
        objects: dict[tuple[Kind, str], Observed] = {}
        for kind in Kind:
            objects |= observed(kind, await self._run(self._client().list, kind))
        self._state = _State(version, devices, objects)
        await self._reconcile(self._state)
        self._next_full = self._clock() + self._resync

    async def _follow(self, state: _State) -> None:
        found = await self._store.changes_since(state.version)
        if found is None:  # pruned past our version
            await self.resync()
            return
        head, changes = found
        for change, record in changes:
            if change.kind not in _DEVICE_CHANGES:  # a policy, a node's pods: no device row
                continue
            if record is None:
                state.devices.pop(change.device_id, None)
            else:
                state.devices[change.device_id] = record.device
        state.version = head
        await self._reconcile(state)

    async def _reconcile(self, state: _State) -> None:
        want = desired(state.devices.values(), self._selection)
        self._report_skipped(want)
        taken: set[str] = set()  # Service names someone else has: their slices wait too
        for op in plan(want, state.objects):
            if not isinstance(op, Delete) and _service_of(op) in taken:
                continue
            if await self._apply(state.objects, op) == "name_taken":
                taken.add(op.name)
        for kind in Kind:
            OBJECTS.labels(kind.value).set(sum(1 for k, _ in state.objects if k is kind))

    # -- one operation -----------------------------------------------------------------

    async def _apply(self, objects: dict[tuple[Kind, str], Observed], op: Operation) -> str:
        key = (op.kind, op.name)
        verb = type(op).__name__.lower()
        try:
            if isinstance(op, Delete):
                gone = await self._run(self._client().delete, op.kind, op.name)
                objects.pop(key, None)
                result = "done" if gone else "absent"
            elif isinstance(op, Create):
                result = await self._create(objects, op)
            else:
                result = await self._replace(objects, op.kind, op.name, op.body)
        except WiregateError:
            OPERATIONS.labels(verb, op.kind.value, "failed").inc()
            raise
        OPERATIONS.labels(verb, op.kind.value, result).inc()
        _log.info("peer_object", op=verb, kind=op.kind.value, name=op.name, result=result)
        return result

    async def _create(self, objects: dict[tuple[Kind, str], Observed], op: Create) -> str:
        try:
            created = await self._run(self._client().create, op.kind, op.body)
        except Conflict:  # the name exists: ours (not seen yet) or someone else's
            current = await self._run(self._client().read, op.kind, op.name)
            if current is None:
                raise
            mine = observed(op.kind, [current]).get((op.kind, op.name))
            if mine is None:
                NAME_TAKEN.inc()
                _log.warning("peer_name_taken", kind=op.kind.value, name=op.name,
                             namespace=self._selection.namespace,
                             hint="an object wiregate does not manage has this name;"
                             " rename the device or remove that object")  # fmt: skip
                return "name_taken"
            objects[(op.kind, op.name)] = mine
            if owned(mine.document) == owned(op.body):
                return "exists"
            return await self._replace(objects, op.kind, op.name, op.body)
        objects[(op.kind, op.name)] = _seen(op.kind, created)
        return "done"

    async def _replace(
        self,
        objects: dict[tuple[Kind, str], Observed],
        kind: Kind,
        name: str,
        body: Mapping[str, Any],
    ) -> str:
        """PUT ``body`` (merged onto the object last seen); on 409 re-read and retry."""
        for attempt in range(RETRIES + 1):
            current = objects.get((kind, name))
            merged_body = merged(current.document, body) if current is not None else body
            try:
                written = await self._run(self._client().replace, kind, name, merged_body)
            except (Conflict, NotFound) as exc:
                fresh = await self._run(self._client().read, kind, name)
                if fresh is None:  # deleted under us: create it again
                    objects.pop((kind, name), None)
                    return await self._create(objects, Create(kind, name, body))
                seen = observed(kind, [fresh]).get((kind, name))
                if seen is None or attempt == RETRIES:
                    raise Conflict(f"{kind} {name!r} keeps changing under the controller") from exc
                objects[(kind, name)] = seen
                if owned(seen.document) == owned(body):
                    return "exists"
                continue
            objects[(kind, name)] = _seen(kind, written)
            return "done" if attempt == 0 else "retried"
        raise AssertionError("unreachable")  # pragma: no cover

    # -- plumbing ----------------------------------------------------------------------

    def _client(self) -> PeerApi:
        if self._api is None:
            self._api = self._factory()
        return self._api

    async def _run(self, call: Callable[..., _T], *args: Any) -> _T:
        """A blocking client call, in a thread."""
        return await asyncio.to_thread(call, *args)

    async def _lease(self, now: float) -> bool:
        if now - self._lease_at < LEASE_RENEW_S:
            return self._leader
        self._leader = await self._store.take_lease(LEASE, self._holder, LEASE_TTL_S)
        self._lease_at = now
        LEADER.set(1 if self._leader else 0)
        if not self._leader:
            self._state = None  # another replica does the work; start afresh if it stops
        return self._leader

    def _failed(self, exc: WiregateError, now: float) -> None:
        self._state = None  # the next round is a full resync
        self._backoff = min(max(2 * self._backoff, BACKOFF_MIN_S), max(self._resync, BACKOFF_MIN_S))
        self._retry_at = now + self._backoff
        FORBIDDEN.set(1 if isinstance(exc, Forbidden) else 0)
        FAILING.set(1)
        if self.last_error is None or self.last_error.message != exc.message:
            _log.error("peer_services_failed", error=exc.message, hint=exc.hint,
                       retry_in=self._backoff)  # fmt: skip
        self.last_error = exc

    def _recovered(self) -> None:
        if self.last_error is not None:
            _log.info("peer_services_recovered")
        self.last_error, self._backoff, self._retry_at = None, 0.0, float("-inf")
        FORBIDDEN.set(0)
        FAILING.set(0)

    def _report_skipped(self, want: Desired) -> None:
        names = tuple(f"{s.name} ({s.reason})" for s in want.skipped)
        SKIPPED.set(len(names))
        if names != self.skipped and names:
            hint = "device names must be DNS labels: letters, digits and '-'"
            _log.warning("peer_services_skipped", devices=list(names), hint=hint)
        self.skipped = names

    def status(self) -> dict[str, Any]:
        """For health reports: leadership, the last fault, objects and skipped devices."""
        return {
            "leader": self._leader,
            "error": None if self.last_error is None else self.last_error.message,
            "forbidden": isinstance(self.last_error, Forbidden),
            "objects": 0 if self._state is None else len(self._state.objects),
            "skipped": list(self.skipped),
        }

    async def run(self, tick: float = TICK_S) -> None:
        """Rounds every ``tick`` seconds until cancelled."""
        while True:
            await asyncio.sleep(tick)
            try:
                await self.step()
            except Exception:  # taking the lease failed (the store): the next round retries
                _log.exception("peer_services_lease_failed")

    def close(self) -> None:
        if self._api is not None:
            self._api.close()
            self._api = None


def _service_of(op: Create | Replace) -> str:
    """The Service an operation's object belongs to (itself, or a slice's Service)."""
    if op.kind is Kind.SERVICE:
        return op.name
    return str(op.body["metadata"]["labels"].get(LABEL_SERVICE_NAME, ""))


def _seen(kind: Kind, document: Mapping[str, Any]) -> Observed:
    meta = document.get("metadata") or {}
    return Observed(kind, str(meta.get("name")), str(meta.get("resourceVersion", "")), document)


PEER_SERVICES = web.AppKey("peer_services", PeerServices)


def peer_services_ctx(
    settings: GatewaySettings, *, holder: str, api_factory: ApiFactory | None = None
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry running the controller (after the store's entry)."""
    selection = selection_of(settings)
    factory = api_factory or (
        lambda: connect(settings.peer_services_kubeconfig, selection.namespace)
    )

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        factory().close()  # an unusable configuration refuses the start
        broker = app[BROKER]
        controller = PeerServices(app[STORE], selection, factory, holder=holder,
                                  map_version=lambda: broker.version,
                                  resync=settings.peer_services_resync)  # fmt: skip
        app[PEER_SERVICES] = controller
        task = asyncio.create_task(controller.run(), name="peer-services")
        yield
        await cancel_and_wait(task)
        controller.close()

    return ctx
