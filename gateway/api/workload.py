"""Enrollment with a workload token (``POST /api/v1/enroll`` with ``workload_token``).

The gateway's trusted workload issuers come from ``[[gateway.workload_issuers]]``
(:func:`build_verifier`); a token is verified by :mod:`identity.workload`, the
device is granted the issuer's ``tags`` plus what the policy file's ``groups``
and ``tag_rules`` give its verified claims, and it is enrolled for the identity
(``iss``, ``sub``). Re-enrollment: a device of the same identity *and* the same
name is replaced (audited as ``device.replace``); a Kubernetes token bound to a
node may only enroll the device named after that node. The token is never
logged, stored or echoed.
"""

from __future__ import annotations

import re

from aiohttp import web

from gateway.appkeys import BROKER, POLICY, STORE, WORKLOAD
from gateway.store import EnrollRequest
from gateway.store.records import Enrolled
from identity.claims import IssuerConfig
from identity.policy_file import PolicyFile
from identity.principals import stored_tags
from identity.workload import (
    FetcherFactory,
    VerifiedWorkload,
    WorkloadIssuer,
    WorkloadVerifier,
    workload_actor,
    workload_grant,
)
from wiregate.clock import Clock
from wiregate.errors import ConfigError, Forbidden, Unauthorized
from wiregate.logging import get_logger
from wiregate.settings import GatewaySettings, WorkloadIssuerSettings

__all__ = ["build_verifier", "enroll_workload", "workload_issuer"]

_log = get_logger("gateway.api.workload")
_TAG = re.compile(r"tag:[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def workload_issuer(entry: WorkloadIssuerSettings, public_url: str) -> WorkloadIssuer:
    """A configured issuer, checked: https (or loopback http), asymmetric algorithms, tags."""
    for tag in entry.tags:
        if not _TAG.fullmatch(tag):
            raise ConfigError(f"workload issuer {entry.name!r}: {tag!r} is not a tag (tag:name)")
    issuer = IssuerConfig(
        issuer=entry.issuer,
        algorithms=tuple(entry.algorithms),
        max_lifetime=entry.max_lifetime,
        insecure_http=entry.insecure_http,
    )
    return WorkloadIssuer(
        name=entry.name,
        kind=entry.kind,
        issuer=issuer,
        audience=entry.audience or public_url,
        ca_bundle=None if entry.ca_bundle is None else str(entry.ca_bundle),
        tags=tuple(entry.tags),
        token_file=None if entry.token_file is None else str(entry.token_file),
    )


def build_verifier(
    settings: GatewaySettings,
    clock: Clock,
    *,
    fetcher: FetcherFactory | None = None,
) -> WorkloadVerifier:
    """The verifier of every ``[[gateway.workload_issuers]]`` entry (ConfigError if bad)."""
    issuers = [workload_issuer(e, settings.public_url) for e in settings.workload_issuers]
    return WorkloadVerifier(issuers, clock, fetcher=fetcher)


async def enroll_workload(request: web.Request, token: str, enroll: EnrollRequest) -> Enrolled:
    """Verify ``token``, then enroll ``enroll`` for its identity with its grant."""
    verifier = request.app.get(WORKLOAD)
    if not verifier:
        raise Unauthorized(
            "token refused: this gateway trusts no workload issuer",
            code="invalid_token",
            hint="configure [[gateway.workload_issuers]], or enroll with an auth_key",
        )
    try:
        workload = await verifier.verify(token)
    except Unauthorized as exc:
        _log.warning("workload_token_refused", reason=exc.message, name=enroll.name)
        raise
    _check_node_binding(workload, enroll.name)
    policy: PolicyFile = request.app[POLICY].document
    tags = stored_tags(workload_grant(policy, workload))
    identity = workload.identity
    detail = {"issuer_name": workload.source.name, "kind": workload.source.kind,
              "issuer": identity.issuer, "subject": identity.subject}  # fmt: skip
    if workload.node_name is not None:
        detail["node"] = workload.node_name
    enrolled, replaced = await request.app[STORE].enroll_identity(
        identity, tags, enroll, actor=workload_actor(identity), detail=detail
    )
    broker = request.app[BROKER]
    if replaced is not None:
        broker.remove(replaced.device_id, replaced.version, replaced.reason)
        _log.info("workload_device_replaced", device_id=replaced.device_id, name=enroll.name)
    broker.upsert(enrolled.record.device, enrolled.version)
    return enrolled


def _check_node_binding(workload: VerifiedWorkload, name: str) -> None:
    node = workload.node_name
    if node is not None and node != name:
        raise Forbidden(
            f"this ServiceAccount token is bound to node {node!r}: "
            "it may only enroll the device of that name",
            code="node_mismatch",
            hint="run the agent with hostname = the node name (NODE_NAME)",
        )
