"""The agent's connection to the gateway: enrollment (REST) and the map stream (WebSocket)."""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agent.paths.relaylink import RelayGrant
from agent.state import Enrollment
from wiregate.errors import ConfigError, Unauthorized, Unavailable, from_api_response
from wiregate.net import parse_endpoint
from wiregate.tls import client_context, tls_refusal

__all__ = [
    "KUBERNETES_TOKEN_PATH",
    "ControlClient",
    "LoginPoll",
    "LoginStart",
    "connector",
    "read_auth_key",
    "read_workload_token",
    "server_urls",
    "unreachable",
    "workload_token_source",
]

# the projected ServiceAccount token (audience: the gateway) of deploy/kubernetes
KUBERNETES_TOKEN_PATH = "/var/run/secrets/wiregate.io/gateway-token/token"  # noqa: S105

_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)
_CLEAN_CLOSE = (1000,)  # anything else (gone, 1006, restarting 1012, 1013) fails over


def read_auth_key(spec: str) -> str:
    """Resolve an enrollment key given as ``file:PATH`` or ``env:VAR`` (no literal key)."""
    if spec.startswith("file:"):
        path = Path(spec[5:])
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read enrollment key file {path}: {exc.strerror}") from exc
    elif spec.startswith("env:"):
        value = os.environ.get(spec[4:], "").strip()
    else:
        value = spec.strip()
    if not value:
        raise ConfigError(
            "no enrollment key", hint="pass --auth-key file:PATH or env:VAR (or set auth_key)"
        )
    return value


def workload_token_source(spec: str, *, kubernetes: bool, auth_key: str) -> str | None:
    """Where the agent's workload token is (``file:PATH``), or None: enroll with the auth key.

    With ``kubernetes`` and neither a workload token nor an auth key configured,
    the projected token of deploy/kubernetes (:data:`KUBERNETES_TOKEN_PATH`).
    """
    if spec:
        if not spec.startswith("file:") or len(spec) == 5:
            raise ConfigError(
                "workload_token must be file:PATH",
                hint="a token in an environment variable or argv is visible to others",
            )
        return spec
    if kubernetes and not auth_key:
        return "file:" + KUBERNETES_TOKEN_PATH
    return None


def read_workload_token(spec: str) -> str:
    """The current token in ``file:PATH`` (re-read each time: projected tokens rotate)."""
    path = Path(spec.removeprefix("file:"))
    try:
        value = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read workload token file {path}: {exc.strerror}") from exc
    if not value:
        raise ConfigError(f"the workload token file {path} is empty")
    return value


@dataclass(frozen=True, slots=True)
class LoginStart:
    """A device-login request the gateway created (``POST /api/v1/login/requests``)."""

    request_id: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str
    poll_token: str
    interval: int
    expires_in: int

    def __repr__(self) -> str:  # the poll token never reaches logs or tracebacks
        return f"LoginStart(request_id={self.request_id!r})"


@dataclass(frozen=True, slots=True)
class LoginPoll:
    """One poll's answer; ``enrollment`` only when ``status`` is ``approved``."""

    status: str  # pending | slow_down | approved | denied | expired
    interval: int | None
    enrollment: Enrollment | None = None


def unreachable(server: str, exc: BaseException) -> Unavailable:
    """The error for a request to ``server`` that failed with ``exc``: one line, naming
    the TLS failure when the gateway's certificate was refused."""
    refusal = tls_refusal(server, exc)
    if refusal is not None:
        return Unavailable(refusal, code="tls")
    return Unavailable(f"cannot reach the gateway at {server}: {exc}")


def connector(ca_file: Path | None) -> aiohttp.TCPConnector:
    """A connector whose HTTPS verifies the gateway with the system store plus ``ca_file``."""
    return aiohttp.TCPConnector(ssl=client_context(ca_file))


def server_urls(spec: str) -> tuple[str, ...]:
    """The gateway base URLs in ``spec``: one, or several separated by commas (replicas
    reached without a load balancer); :class:`~wiregate.errors.ConfigError` if none or
    one is not ``http(s)://``."""
    urls = tuple(u.strip().rstrip("/") for u in spec.replace(" ", ",").split(",") if u.strip())
    if not urls:
        raise ConfigError("server: no gateway URL given")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"server: {url!r} is not an http:// or https:// URL")
    return urls


class ControlClient:
    """Talks to the gateway: one base URL (``http(s)://host:port``) or several replicas'.

    Requests go to the current URL; one that cannot be reached moves the client to
    the next (:meth:`failover`), so an agent follows the replicas that are up.
    """

    def __init__(self, server: str, session: aiohttp.ClientSession) -> None:
        self.servers = server_urls(server)
        self._current = 0
        self.session = session

    @property
    def server(self) -> str:
        """The base URL requests go to now."""
        return self.servers[self._current]

    def failover(self) -> None:
        """Move to the next gateway URL (no change with only one)."""
        self._current = (self._current + 1) % len(self.servers)

    async def enroll(
        self,
        auth_key: str,
        public_key: str,
        name: str,
        endpoints: list[str],
        routes: list[str],
        *,
        workload_token: str | None = None,
    ) -> Enrollment:
        """Enroll with an enrollment key, or with ``workload_token`` (then ``auth_key`` unused)."""
        credential = (
            {"auth_key": auth_key} if workload_token is None else {"workload_token": workload_token}
        )
        body = {
            **credential,
            "public_key": public_key,
            "name": name,
            "endpoints": endpoints,
            "routes": routes,
        }
        data = await self._post("/api/v1/enroll", body)
        device = data["device"]
        return Enrollment(
            device_id=str(device["id"]),
            name=str(device["name"]),
            addresses=tuple(str(a) for a in device["addresses"]),
            token=str(data["token"]),
        )

    async def start_login(self, public_key: str, name: str) -> LoginStart:
        """Create a device-login request for this host's public key."""
        data = await self._post("/api/v1/login/requests", {"public_key": public_key, "name": name})
        return LoginStart(
            request_id=str(data["request_id"]),
            user_code=str(data["user_code"]),
            verification_uri=str(data["verification_uri"]),
            verification_uri_complete=str(data["verification_uri_complete"]),
            poll_token=str(data["poll_token"]),
            interval=int(data["interval"]),
            expires_in=int(data["expires_in"]),
        )

    async def poll_login(self, poll_token: str) -> LoginPoll:
        """Poll a device-login request; an approved answer carries the enrollment, once."""
        data = await self._post("/api/v1/login/poll", {"poll_token": poll_token})
        status = str(data["status"])
        interval = data.get("interval")
        enrollment = None
        if status == "approved":
            device = data["device"]
            enrollment = Enrollment(
                device_id=str(device["id"]),
                name=str(device["name"]),
                addresses=tuple(str(a) for a in device["addresses"]),
                token=str(data["token"]),
            )
        return LoginPoll(status, None if interval is None else int(interval), enrollment)

    async def stream(self, token: str, since: int | None) -> AsyncIterator[tuple[Any, Any]]:
        """Open the map stream; yield ``(message, websocket)`` for each JSON message."""
        url = self.server + "/api/v1/stream"
        params = {} if since is None else {"since": str(since)}
        headers = {"Authorization": f"Bearer {token}"}
        try:
            ws = await self.session.ws_connect(url, params=params, headers=headers, heartbeat=20)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise Unauthorized("the gateway no longer accepts this device's token") from exc
            raise Unavailable(f"stream refused by the gateway (HTTP {exc.status})") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise unreachable(self.server, exc) from exc
        async with ws:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                yield json.loads(msg.data), ws
        if ws.close_code not in _CLEAN_CLOSE:  # gone, restarting or draining: go elsewhere
            raise Unavailable(
                f"the map stream from {self.server} ended (close code {ws.close_code})"
            )

    async def relay_ticket(self, token: str, peer_id: str, avoid: Sequence[str] = ()) -> RelayGrant:
        """A signed ticket to reach ``peer_id`` through the relay the gateway assigns
        (never one of ``avoid``, relays this agent found dead)."""
        body: dict[str, Any] = {"peer": peer_id}
        if avoid:
            body["avoid"] = list(avoid)
        data = await self._post("/api/v1/relay/tickets", body, token=token)
        try:
            relay = data["relay"]
            host, port = parse_endpoint(
                relay["control"], allow_names=True, from_peer=False, what="relay", error=ValueError
            ).pair
            ticket = base64.b64decode(str(data["ticket"]), validate=True)
            tcp = None  # the relay's TLS/TCP address, for networks that block UDP (optional)
            if relay.get("tcp"):
                tcp = parse_endpoint(
                    relay["tcp"], allow_names=True, from_peer=False, what="relay tcp",
                    error=ValueError,
                ).pair  # fmt: skip
            return RelayGrant(str(relay["id"]), (host, port), ticket, tcp)
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise Unavailable(f"the gateway sent a malformed relay ticket answer: {exc}") from exc

    async def whois(self, token: str, device_id: str) -> dict[str, Any]:
        """Who owns ``device_id`` (this device or a peer): ``{"device": ..., "owner": ...}``
        (``GET /api/v1/devices/self/whois``)."""
        headers = {"Authorization": f"Bearer {token}"}
        url = self.server + "/api/v1/devices/self/whois"
        try:
            async with self.session.get(
                url, params={"device": device_id}, headers=headers, timeout=_TIMEOUT
            ) as resp:
                data = await resp.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            raise unreachable(self.server, exc) from exc
        if resp.status >= 400:
            raise from_api_response(resp.status, data)
        return dict(data)

    async def logout(self, token: str) -> None:
        """Delete this device at the gateway (``POST /api/v1/devices/self/logout``)."""
        await self._post("/api/v1/devices/self/logout", {}, token)

    async def _post(
        self, path: str, body: dict[str, Any], token: str | None = None
    ) -> dict[str, Any]:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        for attempt in range(len(self.servers)):
            try:
                async with self.session.post(
                    self.server + path, json=body, headers=headers, timeout=_TIMEOUT
                ) as resp:
                    data = await resp.json(content_type=None)
                    if resp.status >= 400:
                        raise from_api_response(resp.status, data)
                    return dict(data)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                # Only a request that never reached a replica is sent to the next one
                # (an enrollment that timed out may have happened).
                last = attempt + 1 == len(self.servers)
                error = unreachable(self.server, exc)
                self.failover()
                if last or not isinstance(exc, aiohttp.ClientConnectorError):
                    raise error from exc
        raise AssertionError("unreachable")
