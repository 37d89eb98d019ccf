"""The agent's control channel: ``wiregate down``, ``up``, ``logout`` and ``whois``.

Requests arrive on the agent's local socket (``RUN_DIR/agent.sock``, mode 0600,
the socket ``wiregate status`` reads), as tiny JSON over HTTP:

- ``POST /control`` with ``{"op": "up" | "down" | "logout"}``: answered once done
  (``down``: the interface is gone; ``up``: the tunnel is starting);
- ``GET /whois?address=ADDR``: the device holding a tunnel address or routed prefix
  in the agent's current map, and its owner as the gateway says
  (``GET /api/v1/devices/self/whois``: the person's or workload's issuer and
  subject); ``owner`` is null, with ``owner_note`` saying why, when the gateway
  cannot be asked.

Errors are ``{"error": {"code": ..., "message": ...}}`` with an HTTP status.
Whether the tunnel is wanted survives a restart: ``prefs.json`` in the state
dir (``{"want_running": false}`` after ``wiregate down``).

:class:`TunnelSwitch` runs the tunnel while it is wanted; parsing and
:func:`whois` are pure, :func:`with_owner` adds what the gateway says.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from wiregate.errors import BadInput, LocalError, NotFound, Unavailable, WiregateError
from wiregate.files import write_private
from wiregate.model import NetMap

__all__ = [
    "OPS",
    "PREFS_FILE",
    "TunnelSwitch",
    "call_agent",
    "control_routes",
    "forget_prefs",
    "load_wanted",
    "parse_request",
    "save_wanted",
    "whois",
    "with_owner",
]

OPS = ("up", "down", "logout")
PREFS_FILE = "prefs.json"
MAX_BODY = 1024
_CALL_TIMEOUT = aiohttp.ClientTimeout(total=90)  # a down waits for the teardown


# --------------------------------------------------------------------------- pure parts


def parse_request(body: bytes) -> str:
    """The operation a ``POST /control`` body asks for; :class:`BadInput` otherwise."""
    if len(body) > MAX_BODY:
        raise BadInput("control request too large")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"control request is not JSON: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"op"}:
        raise BadInput('a control request is {"op": "up" | "down" | "logout"}')
    op = doc["op"]
    if op not in OPS:
        raise BadInput(f"unknown control op {op!r}; expected one of {', '.join(OPS)}")
    return str(op)


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise BadInput(f"{text!r} is not an IP address or prefix") from None


def whois(netmap: NetMap | None, address: str) -> dict[str, Any]:
    """Which device of ``netmap`` holds ``address`` (an IP or a prefix): its tunnel
    address, else the most specific of its routes that covers it. :class:`NotFound`
    when none does."""
    query = _network(address)
    if netmap is None:
        raise NotFound("the agent has no network map yet")
    me = netmap.self_view
    if any(_covers(a, query) for a in me.addresses):
        return _whois_doc(address, "self", me.id, me.name, me.public_key, me.addresses, me.tags)
    best: tuple[int, dict[str, Any]] | None = None
    for peer in netmap.peers.values():
        for prefix in peer.allowed_ips:
            if not _covers(prefix, query):
                continue
            kind = "tunnel" if prefix in peer.addresses else "route"
            length = ipaddress.ip_network(prefix, strict=False).prefixlen
            if best is None or length > best[0]:
                doc = _whois_doc(address, kind, peer.id, peer.name, peer.public_key,
                                 peer.addresses, peer.tags, prefix)  # fmt: skip
                best = (length, doc)
    if best is None:
        raise NotFound(f"no device in this device's map holds {address}")
    return best[1]


def _covers(prefix: str, query: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    try:
        net = ipaddress.ip_network(prefix, strict=False)
    except ValueError:
        return False
    return net.version == query.version and query.subnet_of(net)  # type: ignore[arg-type]


def _whois_doc(
    address: str,
    kind: str,
    device_id: str,
    name: str,
    public_key: str,
    addresses: tuple[str, ...],
    tags: tuple[str, ...],
    match: str | None = None,
) -> dict[str, Any]:
    return {
        "address": address,
        "kind": kind,  # self | tunnel | route
        "match": match or next(iter(addresses), None),
        "device": {
            "id": device_id,
            "name": name,
            "public_key": public_key,
            "addresses": list(addresses),
            "tags": list(tags),
        },
        "tagged": bool(tags),  # a tagged device is owned by its tags (and its enroller)
        "owner": None,  # the map does not carry it: see with_owner
    }


async def with_owner(
    doc: dict[str, Any], owner_of: Callable[[str], Awaitable[dict[str, Any]]]
) -> dict[str, Any]:
    """:func:`whois`'s ``doc`` with the device's owner, as ``owner_of`` (the gateway)
    says; an error of ``owner_of`` leaves ``owner`` null and says why in ``owner_note``."""
    try:
        answer = await owner_of(doc["device"]["id"])
    except WiregateError as exc:
        return {**doc, "owner_note": f"the gateway did not say who owns it: {exc.message}"}
    owner = answer.get("owner")
    return {**doc, "owner": owner if isinstance(owner, dict) else None}


# --------------------------------------------------------------------------- prefs


def load_wanted(state_dir: Path) -> bool:
    """Whether the tunnel should run (True unless ``wiregate down`` said otherwise)."""
    try:
        doc = json.loads((state_dir / PREFS_FILE).read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError) as exc:
        raise LocalError(f"state file {state_dir / PREFS_FILE} is unreadable: {exc}") from exc
    return not (isinstance(doc, dict) and doc.get("want_running") is False)


def save_wanted(state_dir: Path, wanted: bool) -> None:
    write_private(state_dir / PREFS_FILE, json.dumps({"want_running": wanted}).encode())


def forget_prefs(state_dir: Path) -> None:
    (state_dir / PREFS_FILE).unlink(missing_ok=True)


# --------------------------------------------------------------------------- the switch


class TunnelSwitch:
    """Runs ``run_tunnel`` while the tunnel is wanted; ``down`` cancels it and runs
    ``tear_down``; :meth:`stop` ends :meth:`run` (after ``wiregate logout``)."""

    def __init__(
        self,
        wanted: bool,
        run_tunnel: Callable[[], Coroutine[Any, Any, None]],
        tear_down: Callable[[], Awaitable[None]],
    ) -> None:
        self.wanted = wanted
        self._run_tunnel = run_tunnel
        self._tear_down = tear_down
        self._changed = asyncio.Event()
        self._waiters: list[asyncio.Future[None]] = []
        self._stopping = False

    async def set(self, wanted: bool) -> None:
        """Want the tunnel up or down; return once :meth:`run` acted on it."""
        if self._stopping:
            raise Unavailable("the agent is stopping")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.wanted = wanted
        self._changed.set()
        await waiter

    def stop(self) -> None:
        self._stopping = True
        self._changed.set()

    async def run(self) -> None:
        """Until :meth:`stop`; what ends the tunnel (revoked, a fatal error) is raised.
        Cancelled (SIGTERM), it leaves the tunnel up: fail static."""
        tunnel: asyncio.Task[None] | None = None
        try:
            while not self._stopping:
                if self.wanted and tunnel is None:
                    tunnel = asyncio.create_task(self._run_tunnel())
                elif not self.wanted and tunnel is not None:
                    await self._down(tunnel)
                    tunnel = None
                self._settle()
                if await self._next_event(tunnel):
                    return
            if tunnel is not None:
                await self._down(tunnel)
                tunnel = None
            self._settle()
        finally:
            if tunnel is not None and not tunnel.done():
                tunnel.cancel()
                await asyncio.wait({tunnel})

    async def _next_event(self, tunnel: asyncio.Task[None] | None) -> bool:
        """Wait for a change or for the tunnel to end (True; its error raised)."""
        changed = asyncio.create_task(self._changed.wait())
        try:
            await asyncio.wait({changed, *([tunnel] if tunnel else [])},
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            changed.cancel()
        self._changed.clear()
        if tunnel is None or not tunnel.done():
            return False
        self._fail(tunnel)
        tunnel.result()
        return True

    async def _down(self, tunnel: asyncio.Task[None]) -> None:
        tunnel.cancel()
        await asyncio.wait({tunnel})
        await self._tear_down()

    def _settle(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, tunnel: asyncio.Task[None]) -> None:
        self._stopping = True  # the agent ends with the tunnel's error
        error = tunnel.exception() if not tunnel.cancelled() else None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(error or Unavailable("the tunnel stopped"))


# --------------------------------------------------------------------------- the socket


class ControlTarget(Protocol):
    """What the control routes need of the agent."""

    async def handle_control(self, op: str) -> dict[str, Any]: ...

    def current_map(self) -> NetMap | None: ...

    async def owner_of(self, device_id: str) -> dict[str, Any]:
        """The gateway's whois answer for ``device_id``."""
        ...


def _error(exc: WiregateError) -> web.Response:
    body = {"error": {"code": exc.code, "message": exc.message}}
    return web.json_response(body, status=exc.status if exc.status >= 400 else 500)


def control_routes(agent: ControlTarget) -> list[web.RouteDef]:
    """``POST /control`` and ``GET /whois`` for the agent's local socket."""

    async def control(request: web.Request) -> web.Response:
        try:
            op = parse_request(await request.content.read(MAX_BODY + 1))
            return web.json_response(await agent.handle_control(op))
        except WiregateError as exc:
            return _error(exc)

    async def whois_route(request: web.Request) -> web.Response:
        try:
            doc = whois(agent.current_map(), request.query.get("address", ""))
            return web.json_response(await with_owner(doc, agent.owner_of))
        except WiregateError as exc:
            return _error(exc)

    return [web.post("/control", control), web.get("/whois", whois_route)]


async def call_agent(
    sock: Path, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One request to a running agent's socket; its error document raised as an error."""
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock))) as http,
            http.request(
                method, f"http://agent{path}", json=body, timeout=_CALL_TIMEOUT
            ) as resp,  # fmt: skip
        ):
            doc = await resp.json(content_type=None)
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
        raise Unavailable(
            f"no agent answers on {sock}", hint="is `wiregate agent` running with this --run-dir?"
        ) from exc
    if resp.status >= 400:
        error = doc.get("error") if isinstance(doc, dict) else None
        error = error if isinstance(error, dict) else {}
        refused = WiregateError(
            str(error.get("message") or f"the agent refused (HTTP {resp.status})")
        )
        refused.code, refused.status = str(error.get("code") or "agent"), resp.status
        raise refused
    return dict(doc)
