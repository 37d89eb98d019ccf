"""Every key of the gateway's aiohttp applications, in one place.

The app factory (:mod:`gateway.app`) and the setup functions of the API and the
web pages fill these in; handlers read them. Any gateway module may import this
one: it imports no handler, page or app factory, so reading a key never needs
an import back into the module that sets it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from gateway.livepolicy import LivePolicy
from gateway.mapping.broker import Broker
from gateway.mapping.follower import Follower
from gateway.packages import Wheelhouse
from gateway.pathmatrix import FleetPaths
from gateway.relays import Probe, RelayMonitor, RelaySelector, RelaySigner
from gateway.store import Store
from identity.workload import WorkloadVerifier
from relay.endpoints import RelayEndpoint
from wiregate.clock import Clock
from wiregate.settings import GatewaySettings

if TYPE_CHECKING:  # the web pages' context reads keys from here itself
    from gateway.web.context import WebContext

__all__ = [
    "ADMIN_TOKEN",
    "BROKER",
    "CLOCK",
    "DRAINING",
    "FOLLOWER",
    "METRICS",
    "PATHS",
    "POLICY",
    "RELAYS",
    "RELAY_MONITOR",
    "RELAY_PROBE",
    "RELAY_SELECTOR",
    "RELAY_SIGNER",
    "REQUESTS",
    "SETTINGS",
    "STORE",
    "WEB",
    "WHEELHOUSE",
    "WORKLOAD",
]

# -- the API app ---------------------------------------------------------------------
STORE = web.AppKey("store", Store)
BROKER = web.AppKey("broker", Broker)
SETTINGS = web.AppKey("settings", GatewaySettings)
ADMIN_TOKEN = web.AppKey("admin_token", bytes)  # empty: admin over TCP is refused
CLOCK: web.AppKey[Clock] = web.AppKey("clock")  # POSIX seconds; a fake in tests
DRAINING = web.AppKey("draining", asyncio.Event)  # set on SIGTERM: /readyz answers 503
FOLLOWER = web.AppKey("follower", Follower)  # the change feed (replicas; gaps when alone)
POLICY = web.AppKey("policy", LivePolicy)  # .document: the policy in force (tag rules, groups)
METRICS = web.AppKey("metrics", CollectorRegistry)  # the API's own metrics, scraped with the rest
REQUESTS = web.AppKey("requests_total", Counter)  # requests by method, route and status

# -- device login, workload enrollment -----------------------------------------------
WORKLOAD = web.AppKey("workload_verifier", WorkloadVerifier)

# -- relays ----------------------------------------------------------------------------
RELAY_SIGNER = web.AppKey("relay_signer", RelaySigner)
RELAYS = web.AppKey("relays", tuple[RelayEndpoint, ...])
RELAY_SELECTOR = web.AppKey("relay_selector", RelaySelector)
RELAY_MONITOR = web.AppKey("relay_monitor", RelayMonitor)
#: The probe the monitor uses; set it before the app starts to replace the real PING.
RELAY_PROBE: web.AppKey[Probe] = web.AppKey("relay_probe")

# -- the VM installation: set only when settings.wheelhouse_dir is -----------------------
WHEELHOUSE = web.AppKey("wheelhouse", Wheelhouse)

# -- agents' path reports (gateway/api/paths.py) ---------------------------------------
PATHS = web.AppKey("paths", FleetPaths)  # the report gate, the figures of the metrics

# -- the web pages ---------------------------------------------------------------------
WEB: web.AppKey[WebContext] = web.AppKey("web")  # the pages' context, built at start
