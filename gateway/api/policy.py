"""Admin routes for the policy in force: read it, set it, reset it to the policy file.

``PUT /api/v1/policy`` validates the document (fields, then its ``tests``) and
refuses it in one line (400) with the old one left in force; an accepted one is
stored at the next map version, audited (who, old hash, new hash) and applied by
every replica, whose agents get deltas (see :mod:`gateway.livepolicy`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import Field

from gateway.api.common import StrictModel, admin_actor, read_json, require_admin, rfc3339
from gateway.appkeys import POLICY, STORE
from gateway.livepolicy import ALLOW_ALL
from gateway.store.policies import PolicyWrite, StoredPolicy

__all__ = ["MAX_DOCUMENT", "PolicyBody", "routes"]

routes = web.RouteTableDef()
MAX_DOCUMENT = 512 * 1024  # characters: far above any policy a person writes


class PolicyBody(StrictModel):
    """``PUT /api/v1/policy`` request body: the document's text and its format."""

    document: Annotated[str, Field(min_length=1, max_length=MAX_DOCUMENT)]
    format: Literal["yaml", "json"] = "yaml"


def policy_json(stored: StoredPolicy | None) -> dict[str, Any]:
    """The policy in force as the API shows it (``source`` ``default``: none was set)."""
    if stored is None:
        return {"source": "default", "hash": ALLOW_ALL.hash, "format": ALLOW_ALL.format,
                "document": ALLOW_ALL.text, "version": 0, "set_by": None,
                "set_at": None}  # fmt: skip
    return {
        "source": stored.source.value,
        "hash": stored.hash,
        "format": stored.format,
        "document": stored.document,
        "version": stored.version,
        "set_by": stored.actor,
        "set_at": rfc3339(stored.at),
    }


def _answer(done: PolicyWrite) -> web.Response:
    stored = done.stored or done.previous
    previous = None if done.stored is None or done.previous is None else done.previous.hash
    body = {"policy": policy_json(stored), "changed": done.stored is not None,
            "previous_hash": previous}  # fmt: skip
    return web.json_response(body)


@routes.get("/api/v1/policy")
async def get_policy(request: web.Request) -> web.Response:
    """The policy document in force on every replica, its hash and where it came from."""
    require_admin(request)
    return web.json_response({"policy": policy_json(await request.app[STORE].policy())})


@routes.put("/api/v1/policy")
async def put_policy(request: web.Request) -> web.Response:
    """Validate and put a document in force; it wins over the policy files until reset."""
    actor = admin_actor(request)
    body = await read_json(request, PolicyBody)
    return _answer(await request.app[POLICY].set_document(body.document, body.format, actor))


@routes.delete("/api/v1/policy")
async def reset_policy(request: web.Request) -> web.Response:
    """Drop the API-set document: the policy file of the replica asked (validated), or
    without one every device peering with every other, is put in force."""
    actor = admin_actor(request)
    return _answer(await request.app[POLICY].reset(actor))
