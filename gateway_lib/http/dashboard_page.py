"""The spend dashboard: one page and its assets, served by the function app itself (no CDN).

The page and its assets hold no data; everything it shows comes from the report routes, each of which
authenticates its bearer token. In Azure the page signs in with MSAL (``@azure/msal-browser``, installed
from npm at build time and copied beside the page by ``make dashboard-assets``); where the gateway's
audience names no Entra client id (the local stack) it asks for a dev token instead.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

from gateway_lib.config.settings import AuthSettings
from gateway_lib.http import edge
from gateway_lib.http.api import _serve
from gateway_lib.http.edge import Scope
from gateway_lib.runtime import Runtime

HERE = Path(__file__).parent / "dashboard"
MSAL = "msal-browser.min.js"
# The build copy first; a checkout that ran `npm install` but not the copy still serves the package's file.
MSAL_PLACES = (HERE / "vendor" / MSAL, Path(__file__).parents[2] / "node_modules/@azure/msal-browser/lib" / MSAL)
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", MSAL: "text/javascript"}
_GUID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")
# Same origin only, plus Entra's sign-in endpoint for MSAL's token requests.
CSP = ("default-src 'self'; connect-src 'self' https://login.microsoftonline.com; img-src 'self' data:; "
       "frame-src https://login.microsoftonline.com; object-src 'none'; base-uri 'none'; form-action 'none'")


def sign_in_config(auth: AuthSettings) -> dict[str, object]:
    """MSAL settings from the gateway's own audience (the page signs in to the gateway's app registration)."""
    client_id = next((m.group(0) for a in auth.audiences if (m := _GUID.search(a))), None)
    if client_id is None or not auth.tenant_ids:
        return {"mode": "dev-token"}
    app_uri = next((a for a in auth.audiences if a.startswith("api://")), f"api://{client_id}")
    return {"mode": "msal", "client_id": client_id, "authority": f"https://login.microsoftonline.com/{auth.tenant_ids[0]}",
            "scopes": [f"{app_uri.rstrip('/')}/.default"]}


async def page(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        config = html.escape(json.dumps(sign_in_config(rt.settings.auth)), quote=False)
        body = (HERE / "index.html").read_text(encoding="utf-8").replace("{{config}}", config)
        return Response(body, media_type="text/html; charset=utf-8", headers=_headers(scope))

    return await _serve(request, "admin_dashboard", handle)


async def asset(request: Request) -> Response:
    async def handle(rt: Runtime, scope: Scope) -> Response:
        name = str(request.path_params.get("name") or request.url.path.rsplit("/", 1)[-1])
        path = next((p for p in MSAL_PLACES if p.is_file()), None) if name == MSAL else HERE / name
        if name not in ASSETS or path is None or not path.is_file():
            return edge.json_response({"error": {"message": f"No dashboard asset '{name[:64]}'.", "type":
                                       "invalid_request_error", "param": "name", "code": "not_found"}}, scope, 404)
        return Response(path.read_bytes(), media_type=ASSETS[name], headers=_headers(scope) | {
            "cache-control": "public, max-age=300"})

    return await _serve(request, "admin_dashboard_asset", handle)


def _headers(scope: Scope) -> dict[str, str]:
    return scope.headers() | {"content-security-policy": CSP, "x-content-type-options": "nosniff",
                              "referrer-policy": "no-referrer"}
