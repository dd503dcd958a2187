"""Azure Functions entry point (Python v2 programming model).

Declarations only: routes, methods, auth levels and the rollup schedule. Every
handler delegates to ``gateway_lib.http.api``. Nothing here does I/O at import time, and
heavy SDKs are imported where first used, so the host indexes the functions fast.

HTTP streams are enabled for the whole app (``azurefunctions-extensions-http-fastapi``):
handlers take and return FastAPI/Starlette types, which lets chat completions stream
Server-Sent Events through the Functions host.
"""

import azure.functions as func
from azurefunctions.extensions.http.fastapi import Request, Response

from gateway_lib.http import api

# Function keys guard the function endpoint (APIM holds one as a named value);
# callers are still authenticated by their Entra token inside every handler.
app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

# Routes carry their "api/" themselves (host.json's routePrefix is ""): the Functions host refuses any
# route *template* that starts with "admin" or "runtime", whatever the prefix, because its own management
# API lives there. "admin/limits" would not register in Azure; "api/admin/limits" does, at the same URL.


@app.route(route="api/v1/chat/completions", methods=["POST"])
async def chat_completions(req: Request) -> Response:
    return await api.chat_completions(req)


@app.route(route="api/v1/models", methods=["GET"])
async def list_models(req: Request) -> Response:
    return await api.list_models(req)


@app.route(route="api/generate", methods=["POST"])
async def generate(req: Request) -> Response:
    return await api.generate(req)


@app.route(route="api/v1/usage", methods=["GET"])
async def usage(req: Request) -> Response:
    return await api.usage(req)


@app.route(route="api/admin/limits", methods=["GET", "PUT"])
async def admin_limits(req: Request) -> Response:
    return await api.admin_limits(req)


@app.route(route="api/admin/alerts", methods=["GET"])
async def admin_alerts(req: Request) -> Response:
    return await api.admin_alerts(req)


@app.route(route="api/health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def health(req: Request) -> Response:
    return await api.health(req)


@app.timer_trigger(schedule="%BUDGET_ROLLUP_SCHEDULE%", arg_name="timer", run_on_startup=False)
async def budget_rollup(timer: func.TimerRequest) -> None:
    await api.budget_rollup(past_due=timer.past_due)
