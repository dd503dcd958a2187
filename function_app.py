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

from gateway_lib.config.settings import check_worker_indexing
from gateway_lib.http import admin_reports, api, azure_dialect, dashboard_page, dialects

# Under the Functions host a wrong PYTHON_ENABLE_INIT_INDEXING fails indexing here, naming the setting,
# instead of every HTTP call hanging (an environment read, no I/O).
check_worker_indexing()

# Function keys guard the function endpoint (APIM holds one as a named value);
# callers are still authenticated by their Entra token inside every handler.
app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)

# Routes carry their "api/" themselves (host.json's routePrefix is ""): the Functions host refuses any
# route *template* that starts with "admin" or "runtime", whatever the prefix, because its own management
# API lives there. "admin/limits" would not register in Azure; "api/admin/limits" does, at the same URL.


@app.route(route="api/v1/chat/completions", methods=["POST"])
async def chat_completions(req: Request) -> Response:
    return await api.chat_completions(req)


@app.route(route="api/v1/embeddings", methods=["POST"])
async def embeddings(req: Request) -> Response:
    return await api.embeddings(req)


@app.route(route="api/v1/responses", methods=["POST"])
async def responses(req: Request) -> Response:
    return await dialects.responses(req)


@app.route(route="api/v1/responses/{response_id}", methods=["GET", "DELETE"])
async def stored_response(req: Request) -> Response:
    return await dialects.stored_response(req)


@app.route(route="api/v1/messages", methods=["POST"])
async def messages(req: Request) -> Response:
    return await dialects.messages(req)


@app.route(route="api/v1/messages/count_tokens", methods=["POST"])
async def count_tokens(req: Request) -> Response:
    return await dialects.count_tokens(req)


@app.route(route="api/v1/models", methods=["GET"])
async def list_models(req: Request) -> Response:
    return await api.list_models(req)


@app.route(route="api/v1/models/{model}", methods=["GET"])
async def retrieve_model(req: Request) -> Response:
    return await api.retrieve_model(req)


# Azure OpenAI's dialect (AzureOpenAI, AzureChatOpenAI): the deployment in the path is a gateway alias.
@app.route(route="api/openai/deployments/{deployment}/chat/completions", methods=["POST"])
async def azure_chat_completions(req: Request) -> Response:
    return await azure_dialect.deployment_chat(req)


@app.route(route="api/openai/deployments/{deployment}/embeddings", methods=["POST"])
async def azure_embeddings(req: Request) -> Response:
    return await azure_dialect.deployment_embeddings(req)


@app.route(route="api/openai/v1/chat/completions", methods=["POST"])
async def azure_v1_chat_completions(req: Request) -> Response:
    return await azure_dialect.v1_chat(req)


@app.route(route="api/openai/v1/embeddings", methods=["POST"])
async def azure_v1_embeddings(req: Request) -> Response:
    return await azure_dialect.v1_embeddings(req)


@app.route(route="api/openai/v1/responses", methods=["POST"])
async def azure_v1_responses(req: Request) -> Response:
    return await azure_dialect.v1_responses(req)


@app.route(route="api/openai/responses", methods=["POST"])
async def azure_responses(req: Request) -> Response:
    return await azure_dialect.preview_responses(req)


@app.route(route="api/openai/v1/responses/{response_id}", methods=["GET", "DELETE"])
async def azure_v1_stored_response(req: Request) -> Response:
    return await azure_dialect.v1_stored_response(req)


@app.route(route="api/openai/responses/{response_id}", methods=["GET", "DELETE"])
async def azure_stored_response(req: Request) -> Response:
    return await azure_dialect.preview_stored_response(req)


@app.route(route="api/generate", methods=["POST"])
async def generate(req: Request) -> Response:
    return await api.generate(req)


@app.route(route="api/v1/usage", methods=["GET"])
async def usage(req: Request) -> Response:
    return await api.usage(req)


@app.route(route="api/admin/limits", methods=["GET", "PUT"])
async def admin_limits(req: Request) -> Response:
    return await api.admin_limits(req)


# The dashboard's page and the routes it reads are anonymous to the Functions host: a browser holds no
# function key. Each data route still authenticates the Entra token and needs the admin or team lead role.
@app.route(route="api/admin/alerts", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def admin_alerts(req: Request) -> Response:
    return await api.admin_alerts(req)


@app.route(route="api/admin/spend", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def admin_spend(req: Request) -> Response:
    return await admin_reports.spend(req)


@app.route(route="api/admin/callers", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def admin_callers(req: Request) -> Response:
    return await admin_reports.callers(req)


@app.route(route="api/admin/chargeback", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def admin_chargeback(req: Request) -> Response:
    return await admin_reports.chargeback(req)


@app.route(route="api/admin/dashboard", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def admin_dashboard(req: Request) -> Response:
    return await dashboard_page.page(req)


@app.route(route="api/admin/dashboard/assets/{name}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def admin_dashboard_asset(req: Request) -> Response:
    return await dashboard_page.asset(req)


@app.route(route="api/health", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def health(req: Request) -> Response:
    return await api.health(req)


@app.timer_trigger(schedule="%BUDGET_ROLLUP_SCHEDULE%", arg_name="timer", run_on_startup=False)
async def budget_rollup(timer: func.TimerRequest) -> None:
    await api.budget_rollup(past_due=timer.past_due)
