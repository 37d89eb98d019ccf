"""Starting a sign-in: to the IdP, or first to the issuer chooser when there are several.

The login in progress (PKCE verifier, state, nonce, the page to return to) goes
into its own sealed cookie, never into a URL. The chooser's links are the same
page with ``provider=NAME`` added, so the page to return to survives the choice.
"""

from __future__ import annotations

from aiohttp import web

from gateway.appkeys import WEB
from gateway.web.context import render, set_pre_login
from gateway.web.sessions import PreLogin, safe_return_path

__all__ = ["sign_in"]


async def sign_in(request: web.Request) -> web.StreamResponse:
    """Send the browser to the IdP (or the chooser), to come back to this page."""
    ctx = request.app[WEB]
    if ctx.rp is None:
        return render(request, "not_configured.html", status=503)
    names = ctx.rp.providers
    provider = request.query.get("provider") or (names[0] if len(names) == 1 else None)
    here = request.rel_url.without_query_params("provider")
    if provider not in names:
        links = {n: str(here.update_query(provider=n)) for n in names}
        return render(request, "chooser.html", links=links)
    start = await ctx.rp.begin_login(provider)
    response = web.Response(status=303, headers={"Location": start.url})
    set_pre_login(ctx, response, PreLogin(start, safe_return_path(str(here))))
    return response
