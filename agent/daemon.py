"""The agent daemon: enroll once, hold the map stream, keep the data plane reconciled.

Fail static: the data plane is only ever changed by a map; losing the gateway
changes nothing, and a restarted agent re-applies its last map before it even
reaches the gateway. On reconnect it asks to resume from its version.
"""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from agent.control import TunnelSwitch, control_routes, forget_prefs, load_wanted, save_wanted
from agent.dataplane.facade import DataPlane, PeerStatus
from agent.discovery.candidates import merge_candidates
from agent.discovery.endpoints import candidates, local_addresses, local_networks
from agent.discovery.netcheck import NatType, NetReport, fetch_relays, run_netcheck
from agent.discovery.rawudp import send_burst
from agent.dns.service import Names
from agent.gateway_client import (
    ControlClient,
    connector,
    read_auth_key,
    read_workload_token,
    server_urls,
    workload_token_source,
)
from agent.hostinfo import agent_info
from agent.hostsetup import advertised_host_routes, gateway_addresses, host_policy
from agent.keyfile import KEY_FILE, load_or_create_key
from agent.metrics import serve_metrics
from agent.pathreport import PathReporter, entry_for
from agent.paths.driver import PathBook, PathRunner, RelayHooks
from agent.paths.machine import LocalNat, PathTimers
from agent.paths.predict import PredictionPlan
from agent.paths.relaylink import Addr, RelayBinding, RelayGrant, bind_at_relay
from agent.paths.tcplink import TcpFallback
from agent.pmtu.prober import PmtuProber
from agent.podreport import PodReporter
from agent.privileges import require_net_admin
from agent.rotation import KeyRotator
from agent.session import Action, MapSession
from agent.state import Enrollment, StateDir
from agent.status import serve_status
from relay.client.probe import ping_relay
from relay.endpoints import RelayEndpoint
from wiregate.errors import LocalError, Unauthorized, Unavailable, WiregateError
from wiregate.keys import encode_key, public_from_private
from wiregate.logging import get_logger
from wiregate.mapwire import build_endpoints
from wiregate.model import NetMap
from wiregate.net import parse_hostport
from wiregate.pathwire import PathEntry
from wiregate.settings import AgentSettings

__all__ = ["Agent", "DeviceRevoked"]

log = get_logger("agent")


DATAPLANE_SETUP_TIMEOUT = 60.0  # seconds; the backends' own steps time out sooner
WHOIS_TIMEOUT = 5.0  # seconds; `wiregate whois` then shows the device without its owner


def _pod_reporter(settings: AgentSettings) -> PodReporter:
    """The pods of this node (``kubernetes = true``), reported on the map stream."""
    from agent.kubepods import KubePodApi, PodWatcher

    api = KubePodApi(settings.node_name, settings.kubeconfig)
    return PodReporter(PodWatcher(api, settings.pod_labels))


class DeviceRevoked(Exception):
    """The gateway removed this device; the agent has torn its interface down."""


@dataclass(slots=True)
class Health:
    """What ``wiregate status`` shows about the control connection."""

    connected: bool = False
    last_sync: float | None = None
    last_error: str = ""
    problems: tuple[str, ...] = ()
    reconnects: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class Agent:
    """One agent process, owning one WireGuard interface."""

    def __init__(
        self, settings: AgentSettings, *, check_privileges: Callable[[], None] = require_net_admin
    ) -> None:
        self.settings = settings
        self._check_privileges = check_privileges  # before anything is spent (the enrollment)
        self.state = StateDir(settings.state_dir)
        self.health = Health()
        self.session = MapSession()
        self.enrollment: Enrollment | None = None
        self.dataplane: DataPlane | None = None
        self.public_key = ""
        self._apply_lock = asyncio.Lock()
        self.netreport: NetReport | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._advertised: dict[str, Any] | None = None  # None: not sent on this stream yet
        self._path_timers = PathTimers(
            probe_timeout=settings.path_probe_timeout,
            silence=settings.path_silence,
            retry_first=settings.path_retry,
        )
        self.paths = PathBook(self._path_timers)
        self._agent_info = agent_info()  # version and OS, sent with the endpoints
        self._runner: PathRunner | None = None
        self.control: ControlClient | None = None  # set once running
        self.rotation = KeyRotator(self)  # make-before-break key rotation
        self.pmtu: PmtuProber | None = None  # path-MTU probes through each tunnel
        self.path_reporter = PathReporter()  # the `paths` messages (agent/pathreport.py)
        self.pod_reporter: PodReporter | None = None  # kubernetes: `pods` (agent/podreport.py)
        # the latest handshake WireGuard reported per peer key: a peer removed and re-added
        # to probe a path starts at "never" in WireGuard, not in ``wiregate status``
        self._handshakes: dict[str, float] = {}
        self._gateway_addresses: frozenset[Any] = frozenset()  # host traffic: exempt
        self.names = Names(settings)  # the mesh domain's DNS server (docs/names.md)
        self.switch: TunnelSwitch | None = None  # `wiregate up` / `down` (agent.control)
        self.tunnel_up = False  # the interface exists and carries the map

    async def run_until_signalled(self) -> None:
        """Run until SIGTERM/SIGINT; the data plane is left running (fail static)."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await self.run()
        except asyncio.CancelledError:
            log.info("agent stopped; the tunnel stays up on its last map")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def gateway_url(self) -> str:
        """The gateway (replica) URL the agent talks to now."""
        if self.control is not None:
            return self.control.server
        return server_urls(self.settings.server)[0]

    async def run(self) -> None:
        """Enroll if needed, then run the tunnel while it is wanted (``wiregate up``/``down``)
        until cancelled or logged out; the status and control socket answers throughout."""
        self._check_privileges()
        self.state.ensure()
        private = load_or_create_key(self.settings.state_dir)
        self.public_key = encode_key(public_from_private(private))
        self.dataplane = self._make_dataplane(private)
        async with aiohttp.ClientSession(connector=connector(self.settings.ca_file)) as http:
            control = self.control = ControlClient(self.settings.server, http)
            self.enrollment = self.state.load_enrollment() or await self._enroll(control)
            cached = self.state.load_netmap()
            if cached is not None:
                self.session = MapSession(cached)
            self.switch = TunnelSwitch(load_wanted(self.state.path), self._run_tunnel,
                                       self._tunnel_down)  # fmt: skip
            if self.switch.wanted:  # the interface is up before the socket answers
                await self._bring_up(control)
            sock = self.settings.run_dir / "agent.sock"
            status = await serve_status(sock, self, control_routes(self))
            metrics = await serve_metrics(self)  # None unless metrics_listen is set
            try:
                await self.switch.run()
            finally:
                await status.cleanup()
                if metrics is not None:
                    await metrics.cleanup()
                sock.unlink(missing_ok=True)

    async def _bring_up(self, control: ControlClient) -> None:
        """The interface, and the last map on it before the gateway answers."""
        await self._setup_dataplane()
        from agent.kubenode import apply_forwarding, dns_pod_sources  # when kubernetes

        await apply_forwarding(self.settings)  # masquerade what is sent onward
        self.names.server.allow_also(await dns_pod_sources(self.settings))  # pods ask names
        self._runner = self._path_runner(control)
        self.tunnel_up = True
        if self.session.netmap is not None:
            await self._map_changed(self.session.netmap)

    async def _run_tunnel(self) -> None:
        """The tunnel while it is wanted: map stream, paths, netcheck, rotation, PMTU."""
        control, dataplane = self.control, self.dataplane
        assert control is not None and dataplane is not None
        if not self.tunnel_up:
            await self._bring_up(control)
        assert self._runner is not None
        tasks = [
            asyncio.create_task(self._reconcile_periodically()),
            asyncio.create_task(self._runner.run()),
        ]
        if self.settings.stun_servers:
            tasks.append(asyncio.create_task(self._netcheck_periodically()))
        tasks.append(asyncio.create_task(self.rotation.run()))
        tasks.append(asyncio.create_task(self._report_paths_periodically()))
        if self.settings.kubernetes:
            self.pod_reporter = _pod_reporter(self.settings)
            tasks.append(asyncio.create_task(self.pod_reporter.run()))
        if self.settings.host_traffic != "off":
            tasks.append(asyncio.create_task(self._host_traffic_periodically()))
        if self.settings.pmtu_interval > 0:
            self.pmtu = PmtuProber(
                dataplane, lambda: self.session.netmap, self._apply,
                fwmark=self.settings.fwmark, interval=self.settings.pmtu_interval,
            )  # fmt: skip
            tasks.append(asyncio.create_task(self.pmtu.run()))
        try:
            await self._stream_forever(control)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
            self.pod_reporter = None  # watched again on the next `up`
            await self.names.close()  # the host's resolver back before the server goes

    async def _tunnel_down(self) -> None:
        """``wiregate down``: the interface goes; key, enrollment and last map stay."""
        self.tunnel_up, self._runner, self._ws = False, None, None
        self.health.connected = False
        if self.dataplane is not None:
            async with self._apply_lock:
                await asyncio.to_thread(self.dataplane.teardown)
        self.paths = PathBook(self._path_timers)  # paths are found again after `up`
        log.info("tunnel down; enrollment and keys kept", interface=self.settings.interface)

    async def handle_control(self, op: str) -> dict[str, Any]:
        """A ``wiregate up`` / ``down`` / ``logout`` from the local socket."""
        assert self.switch is not None
        if op == "logout":
            return await self.logout()
        wanted = op == "up"
        save_wanted(self.state.path, wanted)  # a restarted agent stays as asked
        await self.switch.set(wanted)
        return {"state": self.tunnel_state(), "interface": self.settings.interface}

    async def logout(self) -> dict[str, Any]:
        """Tunnel down, the device deleted at the gateway if it answers, key and state
        deleted; the agent then exits."""
        assert self.switch is not None and self.enrollment is not None
        assert self.control is not None
        await self.switch.set(False)
        doc = await self._forget_device(self.control, self.enrollment)
        self.enrollment = None
        self.switch.stop()
        return doc

    async def logout_stopped(self) -> dict[str, Any]:
        """``wiregate logout`` with no agent running: the interface it left up (fail
        static) removed, then as :meth:`logout`."""
        enrollment = self.state.load_enrollment()
        if enrollment is None:
            raise LocalError(f"not enrolled: {self.state.path} holds no device.json")
        if (self.state.path / KEY_FILE).exists():
            dataplane = self._make_dataplane(load_or_create_key(self.state.path))
            await asyncio.to_thread(dataplane.teardown)
        async with aiohttp.ClientSession(connector=connector(self.settings.ca_file)) as http:
            return await self._forget_device(ControlClient(self.settings.server, http), enrollment)

    async def _forget_device(
        self, control: ControlClient, enrollment: Enrollment
    ) -> dict[str, Any]:
        deleted, note = True, ""
        try:
            async with asyncio.timeout(15):
                await control.logout(enrollment.token)
        except Unauthorized:
            note = "the gateway no longer knew this device"
        except (WiregateError, TimeoutError) as exc:
            deleted = False
            note = exc.message if isinstance(exc, WiregateError) else "the gateway timed out"
        self.state.forget()
        forget_prefs(self.state.path)
        doc = {"device_id": enrollment.device_id, "deleted_at_gateway": deleted, "note": note}
        log.info("logged out", **doc)
        return doc

    def current_map(self) -> NetMap | None:
        return self.session.netmap

    async def owner_of(self, device_id: str) -> dict[str, Any]:
        """Who owns ``device_id``, as the gateway says (``wiregate whois``)."""
        if self.control is None or self.enrollment is None:
            raise Unavailable("not connected to the gateway")
        try:
            async with asyncio.timeout(WHOIS_TIMEOUT):
                return await self.control.whois(self.enrollment.token, device_id)
        except TimeoutError:
            raise Unavailable(f"the gateway did not answer within {WHOIS_TIMEOUT:g} s") from None

    def tunnel_state(self) -> str:
        """``up``, ``starting`` (wanted, interface not there yet) or ``down``."""
        if self.switch is not None and not self.switch.wanted:
            return "down"
        return "up" if self.tunnel_up else "starting"

    async def enroll(self) -> Enrollment:
        """Enroll now unless enrolled (``wiregate up --auth-key``): key created, enrollment
        and gateway URL saved; no interface is touched."""
        self.state.ensure()
        self.public_key = encode_key(public_from_private(load_or_create_key(self.state.path)))
        existing = self.state.load_enrollment()
        if existing is not None:
            return existing
        async with aiohttp.ClientSession(connector=connector(self.settings.ca_file)) as http:
            enrollment = await self._enroll(ControlClient(self.settings.server, http))
        self.state.save_server(self.settings.server)
        return enrollment

    async def _setup_dataplane(self) -> None:
        """Create or adopt the interface; a setup that hangs is an error, not a silence."""
        assert self.dataplane is not None
        try:
            async with asyncio.timeout(DATAPLANE_SETUP_TIMEOUT):
                await asyncio.to_thread(self.dataplane.setup)
        except TimeoutError:
            raise Unavailable(
                f"setting up {self.settings.interface} took over {DATAPLANE_SETUP_TIMEOUT:g} s"
            ) from None
        log.info("data plane up", interface=self.settings.interface,
                 backend=self.dataplane.backend_name)  # fmt: skip

    def _path_runner(self, control: ControlClient) -> PathRunner:
        s = self.settings

        async def ticket(peer_id: str, avoid: Sequence[str]) -> RelayGrant:
            assert self.enrollment is not None
            return await control.relay_ticket(self.enrollment.token, peer_id, avoid)

        async def bind(grant: RelayGrant) -> RelayBinding:
            return await bind_at_relay(grant, s.listen_port)

        async def probe(relay: Addr) -> None:
            await ping_relay(relay, timeout=2.0)

        def udp_blocked() -> bool:
            return self.netreport is not None and self.netreport.nat_type is NatType.UDP_BLOCKED

        def udp_silent(relay_id: str) -> bool:  # netcheck: UDP blocked, that relay silent too
            relays = self.netreport.relays if self.netreport is not None and udp_blocked() else ()
            return any(r.relay.id == relay_id and not r.reachable for r in relays)

        # a relay that does not answer over UDP is reached over TLS/TCP when it has an address
        tcp = TcpFallback(udp_bind=bind, udp_probe=probe, wg_port=s.listen_port,
                          ca_file=s.ca_file, udp_blocked=udp_blocked,
                          udp_silent=udp_silent)  # fmt: skip

        async def read_status() -> Sequence[PeerStatus]:
            assert self.dataplane is not None
            async with self._apply_lock:  # never a read-back from before an endpoint write
                return await asyncio.to_thread(self.dataplane.status)

        async def reapply() -> None:
            if self.session.netmap is not None:
                await self._apply(self.session.netmap)

        async def predict_ports(plan: PredictionPlan) -> int:  # from the WireGuard port
            return await send_burst(plan.address, plan.ports, s.listen_port, plan.interval)

        hooks = RelayHooks(ticket, tcp.bind, tcp.probe, tcp.release, tcp.udp_back,
                           ping_interval=s.relay_ping_interval)  # fmt: skip
        return PathRunner(self.paths, hooks, read_status, reapply, predict=predict_ports)

    def _make_dataplane(self, private: bytes) -> DataPlane:
        s = self.settings
        return DataPlane(
            interface=s.interface,
            private_key=private,
            listen_port=s.listen_port,
            fwmark=s.fwmark,
            table=s.route_table,
            rule_priority=s.rule_priority,
            mtu=s.mtu,
            backend=s.backend,
            resync_interval=s.reconcile_interval,
            userspace_binary=s.userspace_binary,
            run_dir=s.run_dir,
            host_policy=host_policy(s, self._gateway_exempt()),
        )

    def _gateway_exempt(self) -> frozenset[Any]:
        """The gateway replicas' addresses (never routed into the tunnel); the last ones
        resolved are kept when a name does not resolve now."""
        if self.settings.host_traffic == "off":
            return frozenset()
        found = frozenset().union(
            *(gateway_addresses(u) for u in server_urls(self.settings.server))
        )
        self._gateway_addresses = found or self._gateway_addresses
        return self._gateway_addresses

    async def _enroll(self, control: ControlClient) -> Enrollment:
        s = self.settings
        source = workload_token_source(
            s.workload_token, kubernetes=s.kubernetes, auth_key=s.auth_key
        )
        auth_key = "" if source is not None else read_auth_key(s.auth_key)
        name = self.settings.hostname or socket.gethostname()
        routes = await self._routes()
        endpoints = await self._endpoints()
        token = None if source is None else read_workload_token(source)  # read now: it rotates
        enrollment = await control.enroll(
            auth_key, self.public_key, name, endpoints, routes=routes, workload_token=token
        )
        self.state.save_enrollment(enrollment)
        log.info("enrolled", device_id=enrollment.device_id, addresses=enrollment.addresses)
        return enrollment

    async def _routes(self) -> list[str]:
        """The routes to advertise: the pod CIDRs (and onward ones in gateway mode) when
        ``kubernetes`` is on, the host addresses when ``host_traffic`` is."""
        from agent.kubenode import advertised_routes  # pod CIDRs when kubernetes = true

        kube = await advertised_routes(self.settings)
        return list(dict.fromkeys([*kube, *await advertised_host_routes(self.settings)]))

    async def _endpoints(self) -> list[str]:
        local = await asyncio.to_thread(local_addresses)
        found = candidates(local, self.settings.listen_port, {self.settings.interface})
        reflexive = self.netreport.advertised_reflexive if self.netreport else None
        from agent.kubenode import advertised_endpoints  # the Node's, if kubernetes

        configured = [*self.settings.endpoints, *await advertised_endpoints(self.settings)]
        return merge_candidates(configured, reflexive, found)

    async def _netcheck_periodically(self) -> None:
        """Probe the WireGuard port's NAT mapping now and every ``netcheck_interval``;
        tell the gateway when the endpoint candidates change and the path machines
        what this side's NAT is. A failed probe keeps the last report (and so the
        last candidates)."""
        while True:
            try:
                servers = [
                    parse_hostport(s, what="STUN server") for s in self.settings.stun_servers
                ]
                relays = await self._relays()
                self.netreport = await run_netcheck(
                    servers, self.settings.listen_port, relays=relays
                )
                log.info("netcheck", **self.netreport.to_dict())
                await self._advertise()
                await self._paths_learn_nat(self.netreport)
            except (OSError, WiregateError, aiohttp.ClientError) as exc:
                log.warning("netcheck failed; candidates kept", error=str(exc))
            await asyncio.sleep(self.settings.netcheck_interval)

    async def _relays(self) -> tuple[RelayEndpoint, ...]:
        """The gateway's relays, for netcheck to PING (none when it cannot say)."""
        if self.enrollment is None:
            return ()
        try:
            return await fetch_relays(
                self.gateway_url(), self.enrollment.token, ca_file=self.settings.ca_file
            )
        except WiregateError as exc:
            log.debug("relay list unavailable for netcheck", error=exc.message)
            return ()

    async def _paths_learn_nat(self, report: NetReport) -> None:
        networks = await asyncio.to_thread(local_networks, {self.settings.interface})
        before = self.paths.local_reflexive()
        if self._runner is not None:
            if before is not None and report.usable_reflexive != before:
                self._runner.rebind_all()
            await self._runner.perform(self.paths.local_nat(LocalNat.from_report(report, networks)))

    async def _advertise(self) -> None:
        """Send the endpoint candidates (the measured NAT type, the advertised routes) on
        the map stream if they changed since last sent."""
        nat = None if self.netreport is None else str(self.netreport.nat_type)
        try:  # as at enrollment, read again: Node facts and the NodeList change
            routes: list[str] | None = await self._routes()
        except WiregateError as exc:
            log.info("advertised routes not read; kept as they were", error=exc.message)
            routes = None
        message = build_endpoints(await self._endpoints(), nat, routes, self._agent_info)
        if self._ws is None or self._ws.closed or message == self._advertised:
            return
        try:
            await self._ws.send_json(message)
        except (aiohttp.ClientError, ConnectionError) as exc:
            # the stream is going away (gateway killed, replica draining): the reader
            # sees it end and reconnects; the next stream gets the endpoints again
            log.info("endpoints not sent: the map stream is closing", error=str(exc))
            return
        self._advertised = message

    async def _stream_forever(self, control: ControlClient) -> None:
        delay = 0.5
        while True:
            try:
                await self._stream_once(control)
                delay = 0.5
            except (Unavailable, aiohttp.ClientError, ConnectionError) as exc:
                code = self._ws.close_code if self._ws else None
                if self.path_reporter.stream_ended(code):
                    log.warning(
                        "the gateway closed the stream over a path report; path reports"
                        " off until the agent restarts (a gateway older than the agent?)"
                    )
                if self.pod_reporter is not None and self.pod_reporter.stream_ended(code):
                    log.warning(
                        "the gateway closed the stream over a pods report; pod reports"
                        " off until the agent restarts (a gateway older than the agent?)"
                    )
                error = exc.message if isinstance(exc, Unavailable) else repr(exc)
                self.health.last_error = error
                log.warning("gateway unreachable; data plane kept as is", error=error)
                control.failover()  # another replica, if several are configured
                if self.health.connected:  # a stream that worked: back off from the start
                    delay = 0.5
            except Unauthorized:
                await self._revoked("the gateway no longer accepts this device")
            self.health.connected = False
            self.health.reconnects += 1
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 30.0)

    async def _stream_once(self, control: ControlClient) -> None:
        assert self.enrollment is not None
        since = self.session.version
        async for message, ws in control.stream(self.enrollment.token, since):
            self.health.connected = True
            self._ws = ws
            outcome = self.session.receive(message)
            if outcome.action is Action.APPLY and self.session.netmap is not None:
                await self._map_changed(self.session.netmap)
                self.state.save_netmap(self.session.netmap)
            elif outcome.action is Action.REVOKED:
                await self._revoked(outcome.reason)
            elif outcome.action is Action.RESYNC:
                log.warning("map stream out of step; resyncing", reason=outcome.reason)
                self.session = MapSession(self.session.netmap)
                await ws.close()
                return
            self.health.last_sync = time.time()
            if message.get("type") == "full":
                self._advertised = None
                self.path_reporter.restart()  # a new stream (or replica) hears every peer
                await self._advertise()
                if self.pod_reporter is not None:
                    await self.pod_reporter.stream_started(ws)

    async def _report_paths_periodically(self, every: float = 5.0) -> None:
        """Send the path to each peer when it changed (``paths``, agent/pathreport.py)."""
        while True:
            await asyncio.sleep(every)
            ws = self._ws
            if ws is None or ws.closed or self.dataplane is None:
                continue
            if not self.path_reporter.may_send(time.time()):
                continue
            live = {p.public_key: p for p in await asyncio.to_thread(self.dataplane.status)}
            try:
                for message in self.path_reporter.due(self._path_entries(live), time.time()):
                    await ws.send_json(message)
            except (aiohttp.ClientError, ConnectionError) as exc:
                self.path_reporter.restart()  # the next stream gets every entry
                log.info("paths not sent: the map stream is closing", error=str(exc))

    def _path_entries(self, live: dict[str, Any]) -> list[PathEntry]:
        netmap, now = self.session.netmap, time.time()
        peers = [] if netmap is None else list(netmap.peers.values())
        return [self._path_entry(p.id, p.public_key, live.get(p.public_key), now) for p in peers]

    def _path_entry(self, peer_id: str, key: str, live: Any, now: float) -> PathEntry:
        pmtu, seen = self.pmtu, self._last_handshake(key, live)
        if pmtu is None:
            return entry_for(peer_id, self.paths.report(peer_id), None, None, seen, None, now)
        result, counts = pmtu.book.results.get(key), pmtu.book.peer_counters.get(key)
        rtt = pmtu.rtt_ms.get(key)
        return entry_for(peer_id, self.paths.report(peer_id), result, counts, seen, rtt, now)

    async def _reconcile_periodically(self) -> None:
        """Re-apply the current map now and then: the data plane reads the interface back
        every ``resync_interval`` and repairs changes made behind the agent's back."""
        while True:
            await asyncio.sleep(self.settings.reconcile_interval)
            if self.session.netmap is not None:
                try:
                    await self._apply(self.session.netmap)
                except WiregateError as exc:
                    log.warning("periodic reconcile failed", error=exc.message)

    async def _host_traffic_periodically(self) -> None:
        """Every few seconds: re-resolve the gateway (exempt), re-read the handshakes and
        re-route host destinations whose peer went fresh or stale; nudge every peer node,
        so that a handshake starts (nonstrict sends nothing into the tunnel otherwise) and a
        live peer answers (its passive keepalive is the sign of life between rekeys)."""
        from agent.rotation import nudge

        dataplane, every = self.dataplane, min(5.0, self.settings.host_traffic_fresh / 6)
        assert dataplane is not None
        while True:
            await asyncio.sleep(every)
            netmap = self.session.netmap
            if netmap is None:
                continue
            try:
                exempt = await asyncio.to_thread(self._gateway_exempt)
                dataplane.host.set_policy(host_policy(self.settings, exempt))
                async with self._apply_lock:
                    shaped = self.paths.shape(netmap)
                    await asyncio.to_thread(dataplane.refresh_host_traffic, shaped)
                keys = dataplane.host.plan.peer_keys  # a live peer answers (passive keepalive)
                await asyncio.to_thread(
                    nudge, [p for p in netmap.peers.values() if p.public_key in keys]
                )
            except WiregateError as exc:
                log.warning("host traffic refresh failed", error=exc.message)

    async def _map_changed(self, netmap: NetMap) -> None:
        """A new map: the path machines learn of new, gone and moved peers first, so
        the data plane is written once with the endpoints they choose."""
        actions = self.paths.update_map(netmap, time.time())
        if self._runner is None:
            await self._apply(netmap)
        else:  # probes of peers with a session first reset them (see PathBook.needs_reset)
            await self._runner.perform(actions, apply=True)
        await self.names.update(netmap)

    async def _apply(self, netmap: NetMap) -> None:
        assert self.dataplane is not None
        async with self._apply_lock:
            await self.rotation.before_apply(netmap)  # a rotated key: switch in this apply
            result = await asyncio.to_thread(self.dataplane.apply, self.paths.shape(netmap))
            await self.rotation.after_apply(netmap)
        self.health.problems = tuple(result.problems)
        for problem in result.problems:
            log.warning("peer refused", problem=problem)
        emit = log.info if result.writes else log.debug
        emit("map applied", version=netmap.version, peers=result.peers, writes=result.writes)

    async def _revoked(self, reason: str) -> None:
        log.warning("device revoked; tearing down", reason=reason)
        await self.names.close()
        if self.dataplane is not None:
            await asyncio.to_thread(self.dataplane.teardown)
        self.state.forget()
        raise DeviceRevoked(reason)

    def status(self) -> dict[str, Any]:
        """The document ``wiregate status`` prints."""
        netmap = self.session.netmap
        dataplane = self.dataplane if self.tunnel_up else None  # no interface while down
        live = {p.public_key: p for p in dataplane.status()} if dataplane else {}
        peers = [] if netmap is None else list(netmap.peers.values())
        return {
            "device": _device_doc(self.enrollment, self.public_key, netmap),
            "interface": self.settings.interface,
            "state": self.tunnel_state(),
            "backend": self.dataplane.backend_name if self.dataplane else None,
            "gateway": {
                "server": self.gateway_url(),
                "connected": self.health.connected,
                "map_version": self.session.version,
                "last_sync": self.health.last_sync,
                "last_error": self.health.last_error,
                "reconnects": self.health.reconnects,
            },
            "problems": list(self.health.problems),
            "netcheck": self.netreport.to_dict() if self.netreport else None,
            "pmtu": self.pmtu.to_dict() if self.pmtu else None,
            "dns": self.names.to_dict(),
            "host_traffic": dataplane.host.to_dict() if dataplane else None,
            "pods": self.pod_reporter.to_dict() if self.pod_reporter else None,
            "peers": [
                _peer_doc(p, live.get(p.public_key), self.paths.report(p.id))
                | {"last_handshake": self._last_handshake(p.public_key, live.get(p.public_key))}
                | (self.pmtu.peer_doc(p.public_key) if self.pmtu else {"path_mtu": None})
                for p in peers
            ],
        }

    def _last_handshake(self, key: str, live: Any) -> float | None:
        """WireGuard's latest handshake with ``key``, kept across the peer's resets."""
        seen = getattr(live, "last_handshake", None)
        if seen:
            self._handshakes[key] = max(seen, self._handshakes.get(key, 0.0))
        return self._handshakes.get(key)


def _device_doc(enr: Enrollment | None, public_key: str, netmap: NetMap | None) -> dict[str, Any]:
    if enr is None:
        return {"public_key": public_key}
    addresses = list(netmap.self_view.addresses) if netmap else list(enr.addresses)
    name = netmap.self_view.name if netmap else enr.name  # the map's: renames reach it
    doc = {"id": enr.device_id, "name": name, "public_key": public_key, "addresses": addresses}
    return {**doc, "expires_at": netmap.self_view.expires_at if netmap else None}


def _peer_doc(peer: Any, live: Any, path: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "path": path,
        "id": peer.id,
        "name": peer.name,
        "public_key": peer.public_key,
        "addresses": list(peer.addresses),
        "endpoint": getattr(live, "endpoint", None),
        "last_handshake": getattr(live, "last_handshake", None),
        "rx_bytes": getattr(live, "rx", 0),
        "tx_bytes": getattr(live, "tx", 0),
    }
