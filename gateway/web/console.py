"""The console's read-only views of the network: one device (``/admin/devices/{id}``),
the relays (``/admin/relays``), the audit log (``/admin/audit``), the policy in force
(``/admin/policy``) and the login requests waiting for approval (``/admin/logins``).

Admin groups only, as :mod:`gateway.web.admin`. Each page reads through the same
store, broker and selector functions as the REST API (``/api/v1/devices``,
``/relays``, ``/audit``, ``/policy``, ``/login/requests``); nothing here changes
anything: the forms are GET filters, and the policy page's draft check (a POST, CSRF
checked like every form) only validates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from multidict import MultiDictProxy

from gateway.api.audit import parse_since
from gateway.api.devices import online_test
from gateway.api.paths import fleet_pairs
from gateway.api.policy import MAX_DOCUMENT, policy_json
from gateway.appkeys import BROKER, CLOCK, POLICY, RELAY_MONITOR, RELAY_SELECTOR, STORE
from gateway.store.audit import MAX_LIMIT, AuditRecord
from gateway.web.admin import _require_admin as require_admin_page
from gateway.web.context import render
from gateway.web.devices import device_view
from gateway.web.guard import form_post, signed_in
from gateway.web.report import query_of
from gateway.web.sessions import Session
from identity.policy_file import FORMATS, PolicyFile, parse_policy_text
from wiregate.errors import BadInput, NotFound, WiregateError

__all__ = ["AUDIT_PAGE", "Validation", "audit_filter", "routes"]

routes = web.RouteTableDef()
AUDIT_PAGE = 50  # records per page of the audit log
_AUDIT_FIELDS = ("actor", "action", "target")


@routes.get("/admin/devices/{id}")
@signed_in
async def device_page(request: web.Request, session: Session) -> web.StreamResponse:
    """One device: identity, tags, presence, key; the peers the policy gives it and the
    path each side reported."""
    require_admin_page(request, session)
    store, device_id = request.app[STORE], request.match_info["id"]
    try:
        record = await store.get_device(device_id)
    except NotFound:
        record = None
    if record is None:
        raise NotFound("no such device", hint="see every device at /admin")
    online = online_test(request.app)
    view = device_view(record, request.app[CLOCK](), online(record))
    _, pairs = await fleet_pairs(request.app, device_id)
    paths = {(p.reporter.id, p.peer.id): p for p in pairs}
    broker, others = request.app[BROKER], await store.list_devices()
    peers = [
        {"device": device_view(o, 0.0, online(o)), "out": paths.get((device_id, o.device.id)),
         "back": paths.get((o.device.id, device_id))}
        for o in others
        if o.device.id != device_id and broker.may_peer(record.device, o.device)
    ]  # fmt: skip
    return render(request, "device.html", d=view, peers=peers)


@routes.get("/admin/relays")
@signed_in
async def relays_page(request: web.Request, session: Session) -> web.StreamResponse:
    """Every configured relay: up or down, RTT, load, the last probe's error."""
    require_admin_page(request, session)
    await request.app[RELAY_MONITOR].wait_first_round()
    relays = request.app[RELAY_SELECTOR].status()
    return render(request, "relays.html", relays=relays)


def audit_filter(query: dict[str, str]) -> tuple[float | None, float | None, dict[str, str]]:
    """The audit page's ``since``/``until`` (RFC 3339, a UTC day, or POSIX seconds) and
    its substring filters on ``actor``, ``action`` and ``target``."""
    since, until = parse_since(query.get("since")), parse_since(query.get("until"))
    if since is not None and until is not None and until < since:
        raise BadInput("until is before since")
    words = {k: query[k].strip() for k in _AUDIT_FIELDS if query.get(k, "").strip()}
    return since, until, words


def _kept(record: AuditRecord, until: float | None, words: dict[str, str]) -> bool:
    if until is not None and record.at > until:
        return False
    fields = {"actor": record.actor, "action": record.action, "target": record.target}
    return all(w.lower() in fields[k].lower() for k, w in words.items())


def _page_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise BadInput("page must be a positive integer")
    return int(text)


@routes.get("/admin/audit")
@signed_in
async def audit_page(request: web.Request, session: Session) -> web.StreamResponse:
    """The audit log, newest first, filtered and paginated (:data:`AUDIT_PAGE` a page)."""
    require_admin_page(request, session)
    query = dict(query_of(request))
    since, until, words = audit_filter(query)
    number = _page_number(query.get("page", "1"))
    records = await request.app[STORE].list_audit(since, MAX_LIMIT)
    kept = [r for r in records if _kept(r, until, words)]
    shown = kept[(number - 1) * AUDIT_PAGE : number * AUDIT_PAGE]
    form = {k: request.query.get(k, "") for k in (*_AUDIT_FIELDS, "since", "until")}
    return render(request, "audit.html", records=shown, form=form, number=number,
                  more=len(kept) > number * AUDIT_PAGE, capped=len(records) >= MAX_LIMIT,
                  links=_page_links(form, number))  # fmt: skip


def _page_links(form: dict[str, str], number: int) -> dict[str, str]:
    kept = [(k, v) for k, v in form.items() if v]
    return {name: "?" + urlencode([*kept, ("page", str(n))])
            for name, n in (("newer", number - 1), ("older", number + 1))}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Validation:
    """A policy document's check: its parse or field errors, else its tests' failures."""

    errors: tuple[str, ...]
    failures: tuple[str, ...]
    parsed: PolicyFile | None

    @classmethod
    def of(cls, text: str, fmt: str) -> Validation:
        """Validate ``text`` as ``PUT /api/v1/policy`` would (nothing is applied)."""
        try:
            parsed = parse_policy_text(text, fmt, check_tests=False)
        except WiregateError as exc:
            return cls((str(exc),), (), None)
        return cls((), tuple(parsed.failures()), parsed)


async def _policy_page(request: web.Request, **draft: Any) -> web.Response:
    stored = await request.app[STORE].policy()
    policy = policy_json(stored)
    file_path = request.app[POLICY].path
    return render(request, "policy.html", policy=policy, set_at=stored.at if stored else None,
                  check=Validation.of(policy["document"], policy["format"]), formats=FORMATS,
                  file_path=str(file_path) if file_path else None, **draft)  # fmt: skip


@routes.get("/admin/policy")
@signed_in
async def policy_page(request: web.Request, session: Session) -> web.StreamResponse:
    """The policy in force: where it came from, its hash and version, who set it and
    when, its text, whether it validates and the result of its tests; a form to check
    a draft."""
    require_admin_page(request, session)
    return await _policy_page(request, draft=None)


@routes.post("/admin/policy/check")
@form_post
async def check_policy(
    request: web.Request, session: Session, form: MultiDictProxy[str]
) -> web.StreamResponse:
    """Validate a draft document (fields, then its tests) and show the result with the
    policy in force; nothing is stored or applied."""
    require_admin_page(request, session)
    text, fmt = form.get("document", ""), form.get("format", "yaml")
    if fmt not in FORMATS or not text.strip() or len(text) > MAX_DOCUMENT:
        raise BadInput("give the draft's text and its format", hint="yaml, json or toml")
    draft = {"text": text, "format": fmt, "check": Validation.of(text, fmt)}
    return await _policy_page(request, draft=draft)


@routes.get("/admin/logins")
@signed_in
async def logins_page(request: web.Request, session: Session) -> web.StreamResponse:
    """The ``wiregate login`` requests waiting for approval, oldest first (never codes)."""
    require_admin_page(request, session)
    pending = await request.app[STORE].pending_login_requests(request.app[CLOCK]())
    return render(request, "logins.html", pending=pending)
