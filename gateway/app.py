"""The gateway process: app factories (API and metrics) and :func:`run_gateway`.

The public API app is served on ``settings.listen`` (TCP) and on the admin unix
socket ``settings.admin_socket`` (mode 0600, its requests are trusted as admin).
Prometheus metrics are on their own listener, ``settings.metrics_listen``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web, web_response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    generate_latest,
)

from gateway.api import error_middleware, setup_routes
from gateway.api.workload import build_verifier
from gateway.appkeys import (
    ADMIN_TOKEN,
    BROKER,
    CLOCK,
    DRAINING,
    FOLLOWER,
    METRICS,
    POLICY,
    REQUESTS,
    SETTINGS,
    STORE,
    WORKLOAD,
)
from gateway.cluster import peer_services_ctx
from gateway.lifecycle.expiry import people_lifetime
from gateway.lifecycle.sweeper import replica_id, sweeper_ctx
from gateway.livepolicy import LivePolicy
from gateway.mapping.broker import Broker
from gateway.mapping.follower import Follower, asyncpg_dsn
from gateway.mapping.ipam import Pool
from gateway.memory import trim_ctx
from gateway.preflight import check_admin_socket
from gateway.store import Store
from gateway.web import setup as setup_web
from identity.policy import Policy
from identity.policy_file import PolicyFile, load_policy_file
from identity.principals import lifetime_rule
from wiregate.clock import Clock
from wiregate.diagnostics import ASYNCIO_TASKS  # noqa: F401 (registers the gauge)
from wiregate.errors import ConfigError
from wiregate.files import check_private_mode, credential_path
from wiregate.logging import get_logger
from wiregate.net import parse_hostport
from wiregate.settings import GatewaySettings
from wiregate.tasks import cancel_and_wait
from wiregate.tls import CertReloader, server_context

__all__ = [
    "BrokerFactory",
    "create_app",
    "create_metrics_app",
    "create_redirect_app",
    "run_gateway",
]

BrokerFactory = Callable[[Policy | None], Broker]
_log = get_logger("gateway.app")


def create_app(
    settings: GatewaySettings,
    *,
    broker_factory: BrokerFactory = Broker,
    clock: Clock = time.time,
) -> web.Application:
    """The public API app; its cleanup context opens the Store and loads the Broker.

    ``broker_factory`` and ``clock`` are for tests (a fake broker, a fake clock).
    """
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        middlewares=[_count_requests, error_middleware],
    )
    app[SETTINGS] = settings
    app[ADMIN_TOKEN] = read_admin_token(settings.admin_token_file)
    app[CLOCK] = clock
    app[DRAINING] = asyncio.Event()
    app[METRICS], app[REQUESTS] = _api_metrics()
    app[WORKLOAD] = build_verifier(settings, clock)  # [[gateway.workload_issuers]]
    setup_routes(app)
    setup_web(app)  # the SSO pages (gateway/web); not part of /api/v1
    app.on_shutdown.append(_drain)  # before aiohttp waits for open requests to finish
    app.on_response_prepare.append(_hsts)
    app.on_response_prepare.append(_server_header)
    app.cleanup_ctx.append(_state(settings, broker_factory, clock))
    app.cleanup_ctx.append(sweeper_ctx(settings.expiry_sweep_interval))
    app.cleanup_ctx.append(trim_ctx())  # RSS follows what is in use (gateway/memory.py)
    if settings.peer_services:  # Services for devices in the cluster (gateway/cluster)
        app.cleanup_ctx.append(peer_services_ctx(settings, holder=replica_id()))
    return app


def _state(
    settings: GatewaySettings, broker_factory: BrokerFactory, clock: Clock
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def state(app: web.Application) -> AsyncIterator[None]:
        if not settings.database_url:
            settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pool = Pool.parse(settings.ipv4_pool, settings.ipv6_pool)
        store = await Store.open(settings.effective_database_url(), pool=pool, clock=clock)
        store.set_key_lifetime(people_lifetime(settings.key_expiry))
        try:
            live = LivePolicy(store, settings.policy_file, on_document=_lifetimes(store, settings))
            document = await live.start()  # the file validated (and stored), or the stored one
            app[POLICY] = live
            broker = broker_factory(document.policy)
            broker.set_dns(settings.mesh_dns())  # names: every self view carries the domain
            broker.set_pool(str(pool.ipv4), str(pool.ipv6))  # agents route it as one prefix
            version = await store.map_version()  # first: newer devices are only re-applied
            devices = [record.device for record in await store.list_devices()]
            broker.load(devices, version, pods=await store.list_pods())
            app[STORE], app[BROKER] = store, broker
            live.attach(broker)
            app[FOLLOWER] = follower = _follower(settings, store, broker, live)
            follower.start()
            watcher = asyncio.create_task(live.watch(), name="policy-watch")
            yield
            await cancel_and_wait(watcher)
            await broker.close()
            await follower.stop()
        finally:
            await store.close()

    return state


def _lifetimes(store: Store, settings: GatewaySettings) -> Callable[[PolicyFile], None]:
    """Key lifetimes of new devices follow the policy in force: its ``key_expiry``
    replaces the settings' rule, which applies again when a policy has none."""

    def follow(document: PolicyFile) -> None:
        if document.key_expiry:
            store.set_key_lifetime(lifetime_rule(document))
        else:
            store.set_key_lifetime(people_lifetime(settings.key_expiry))

    return follow


HSTS = "max-age=31536000"
SERVER = "wiregate"  # the Server header: no product versions for a prober to match


async def _server_header(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = SERVER


async def _hsts(request: web.Request, response: web.StreamResponse) -> None:
    """Over TLS, tell browsers to use HTTPS only from now on."""
    if request.secure:
        response.headers.setdefault("Strict-Transport-Security", HSTS)


def create_redirect_app(public_url: str) -> web.Application:
    """The plain-HTTP listener's app: every request is sent (308) to ``public_url``."""
    base = public_url.rstrip("/")

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPPermanentRedirect(base + str(request.rel_url))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    return app


def tls_reloader(settings: GatewaySettings) -> CertReloader | None:
    """The API listener's TLS context (and its reloader), None without ``tls_cert``;
    :class:`~wiregate.errors.ConfigError` if the pair cannot be used."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    cert = credential_path(settings.tls_cert, "tls_cert")  # "%d/NAME": LoadCredential=
    key = credential_path(settings.tls_key, "tls_key")
    return CertReloader(server_context(cert, key), cert, key)


@asynccontextmanager
async def _reloading(tls: CertReloader | None, api: web.Application) -> AsyncIterator[None]:
    """While inside: the certificate is reloaded when its files change, and on SIGHUP the
    certificate and the policy file are (see :mod:`gateway.livepolicy`)."""
    loop = asyncio.get_running_loop()
    task = None if tls is None else asyncio.create_task(tls.run(), name="tls-reload")

    def hangup() -> None:
        if tls is not None:
            tls.reload()
        if POLICY in api:
            api[POLICY].request_reload()

    loop.add_signal_handler(signal.SIGHUP, hangup)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await cancel_and_wait(task)


async def _drain(app: web.Application) -> None:
    """Close every agent stream with 1012 ("service restart"): agents reconnect to
    another replica at once instead of waiting for this process to go away."""
    app[DRAINING].set()
    if BROKER in app:
        await app[BROKER].close()


def _follower(
    settings: GatewaySettings, store: Store, broker: Broker, live: LivePolicy
) -> Follower:
    """On PostgreSQL the gateway may have replicas: its broker follows the change feed.
    On SQLite it is alone: the feed fills the gaps its broker finds between versions.
    Policy changes in the feed are read through ``live``."""
    url = settings.effective_database_url()
    if not url.startswith("postgresql"):
        return Follower(store, broker, listen_dsn=None, replica=False, policy_at=live.policy_at)
    return Follower(store, broker, listen_dsn=asyncpg_dsn(url), policy_at=live.policy_at)


def read_admin_token(path: Path | None) -> bytes:
    """The admin bearer token from ``path`` (empty when none is configured)."""
    if path is None:
        return b""
    path = credential_path(path, "admin_token_file")
    check_private_mode(path, "admin_token_file")
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read admin_token_file {path}: {exc.strerror}") from exc
    if len(token) < 16:
        raise ConfigError(f"the admin token in {path} is shorter than 16 characters")
    return token


def load_policy_document(path: Path | None) -> PolicyFile:
    """The policy file (YAML, JSON, or legacy TOML); without one, everyone peers."""
    if path is None:
        return PolicyFile(policy=Policy.allow_all(), legacy=True)
    return load_policy_file(path)


def _api_metrics() -> tuple[CollectorRegistry, Counter]:
    registry = CollectorRegistry()
    requests = Counter(
        "wiregate_http_requests",
        "API requests by route and status",
        ["method", "route", "status"],
        registry=registry,
    )
    return registry, requests


@web.middleware
async def _count_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    request.app[REQUESTS].labels(request.method, name, str(response.status)).inc()
    return response


def create_metrics_app(api: web.Application) -> web.Application:
    """A separate app serving ``/metrics``: process and broker metrics, and ``api``'s own."""

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(REGISTRY) + generate_latest(api[METRICS])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    return app


async def run_gateway(settings: GatewaySettings, *, broker_factory: BrokerFactory = Broker) -> None:
    """Serve the API (TCP + admin unix socket) and metrics until cancelled or SIGTERM."""
    tls = tls_reloader(settings)  # an unusable certificate refuses the start
    # aiohttp's own answers (a malformed request's 400) carry this too
    web_response.SERVER_SOFTWARE = SERVER  # type: ignore[attr-defined]
    api = create_app(settings, broker_factory=broker_factory)
    api_runner = _runner(api, settings)
    metrics_runner = _runner(create_metrics_app(api), settings)
    redirect_runner = _runner(create_redirect_app(settings.public_url), settings)
    await api_runner.setup()
    try:
        await metrics_runner.setup()
        await _start_sites(settings, api_runner, metrics_runner, None if tls is None else tls.ctx)
        if settings.http_redirect_listen:
            await redirect_runner.setup()
            rhost, rport = parse_hostport(
                settings.http_redirect_listen, allow_port_zero=True, what="http_redirect_listen"
            )
            await web.TCPSite(redirect_runner, rhost, rport).start()
        async with _reloading(tls, api):
            await _wait_for_stop()
    finally:
        _log.info("gateway_stopping", drain_delay=settings.shutdown_delay)
        api[DRAINING].set()  # /readyz: 503, new agents go elsewhere
        await asyncio.sleep(settings.shutdown_delay)
        await redirect_runner.cleanup()
        await metrics_runner.cleanup()
        await api_runner.cleanup()


def _runner(app: web.Application, settings: GatewaySettings) -> web.AppRunner:
    """A runner whose connections must send a request head within ``header_timeout`` s
    of connecting or of their last response (aiohttp's keep-alive timer, which it arms
    at connect and which closes a connection waiting for a request; slow headers
    included). A request's JSON body has ``body_timeout`` (gateway.api.common)."""
    return web.AppRunner(app, handle_signals=False, keepalive_timeout=settings.header_timeout)


async def _start_sites(
    settings: GatewaySettings,
    api: web.AppRunner,
    metrics: web.AppRunner,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    host, port = parse_hostport(settings.listen, allow_port_zero=True, what="listen")
    await web.TCPSite(api, host, port, ssl_context=ssl_context).start()
    await _start_admin_socket(api, settings.admin_socket)
    mhost, mport = parse_hostport(
        settings.metrics_listen, allow_port_zero=True, what="metrics_listen"
    )
    await web.TCPSite(metrics, mhost, mport).start()
    _log.info("gateway_started", listen=settings.listen, admin_socket=str(settings.admin_socket),
              metrics=settings.metrics_listen, tls=ssl_context is not None)  # fmt: skip


async def _start_admin_socket(runner: web.AppRunner, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_admin_socket(path, replace=True)  # a live one is refused, a stale one replaced
    old = os.umask(0o177)  # the socket is created 0600: no window where others can connect
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)
    path.chmod(0o600)


async def _wait_for_stop() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
