# The gateway's Function App as a container image, for Azure Functions on Azure Container Apps or an
# Elastic Premium plan. The same code and host.json as the Flex Consumption package; every gateway setting
# comes from the environment at run time (docs/runbook.md, "Container image").
FROM mcr.microsoft.com/azure-functions/python:4-python3.11

# Host settings only. PYTHON_ENABLE_INIT_INDEXING=1 is what the HTTP-streams extension needs (as in
# local.settings.example.json and infra/app/function.bicep); port 8080 because a non-root user cannot bind 80.
ENV AzureWebJobsScriptRoot=/home/site/wwwroot \
    AzureFunctionsJobHost__Logging__Console__IsEnabled=true \
    FUNCTIONS_WORKER_RUNTIME=python \
    PYTHON_ENABLE_INIT_INDEXING=1 \
    ASPNETCORE_URLS=http://+:8080 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY requirements.txt constraints.txt /tmp/
RUN pip install --no-cache-dir -r /tmp/requirements.txt && rm /tmp/requirements.txt /tmp/constraints.txt

# The host writes under HOME (/home: data/, LogFiles/) and may keep function keys in Secrets/; the
# app's code stays owned by root, read-only to the user that runs it.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --shell /usr/sbin/nologin gateway \
    && mkdir -p /home/site/wwwroot /home/data /home/LogFiles /azure-functions-host/Secrets \
    && chown gateway:gateway /home /home/data /home/LogFiles /azure-functions-host/Secrets

COPY host.json function_app.py /home/site/wwwroot/
COPY gateway_lib/ /home/site/wwwroot/gateway_lib/

USER 10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/api/health', timeout=4)"]
