#!/usr/bin/env bash
# Deploy the AI gateway to Azure: what-if, infrastructure, function package, then API Management.
#
#   scripts/deploy.sh -e dev|prod [-l LOCATION] [--yes] [--what-if-only] [--skip-publish]
#     -e ENV            parameters file infra/main.parameters.ENV.json
#     -l LOCATION       deployment metadata region (default: the parameters file's location)
#     --yes             do not ask for confirmation after the what-if
#     --what-if-only    show the what-if and stop
#     --skip-publish    infrastructure only (keep the deployed package)
#   Environment:
#     ALERT_WEBHOOK_URL optional; stored in Key Vault by the deployment, never printed
#
# Order matters on a fresh environment: APIM reads the function host key at deployment time, and the
# host only answers once code runs. So: infra without APIM -> publish -> full deployment (idempotent).
# Needs: az (logged in, bicep bundled), and func (Core Tools) or zip for the package.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TEMPLATE="$ROOT/infra/main.bicep"

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
die() { printf 'deploy: %s\n' "$*" >&2; exit 1; }
log() { printf '\n== %s\n' "$*"; }

ENV_NAME=""
LOCATION=""
ASSUME_YES=false
WHAT_IF_ONLY=false
PUBLISH=true
while [[ $# -gt 0 ]]; do
  case "$1" in
    -e|--env) ENV_NAME="${2:-}"; shift 2 ;;
    -l|--location) LOCATION="${2:-}"; shift 2 ;;
    --yes) ASSUME_YES=true; shift ;;
    --what-if-only) WHAT_IF_ONLY=true; shift ;;
    --skip-publish) PUBLISH=false; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done
[[ -n "$ENV_NAME" ]] || { usage >&2; die "-e ENV is required"; }
PARAMS="$ROOT/infra/main.parameters.$ENV_NAME.json"
[[ -f "$PARAMS" ]] || die "no parameters file $PARAMS"
command -v az >/dev/null || die "az CLI not found"
command -v python3 >/dev/null || die "python3 not found"

param_value() {  # param_value NAME -> value from the parameters file (empty if absent)
  python3 -c 'import json, sys; p = json.load(open(sys.argv[1]))["parameters"]; print(p.get(sys.argv[2], {}).get("value", ""))' "$PARAMS" "$1"
}
[[ -n "$LOCATION" ]] || LOCATION="$(param_value location)"
[[ -n "$LOCATION" ]] || die "no location: pass -l or set it in $PARAMS"
DEPLOYMENT="aigw-$(param_value environmentName)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
chmod 700 "$WORK"

# Secure parameters go through a private parameters file, never argv (visible in `ps`) or the log.
SECRET_PARAMS="$WORK/secret.parameters.json"
# shellcheck disable=SC2016  # the single quotes hold Python source, not shell expansions
ALERT_WEBHOOK_URL="${ALERT_WEBHOOK_URL:-}" python3 -c '
import json, os, sys
values = {"alertWebhookUrl": {"value": os.environ["ALERT_WEBHOOK_URL"]}} if os.environ["ALERT_WEBHOOK_URL"] else {}
json.dump({"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentParameters.json#",
           "contentVersion": "1.0.0.0", "parameters": values}, open(sys.argv[1], "w"))' "$SECRET_PARAMS"

SUBSCRIPTION="$(az account show --query '{name:name, id:id}' -o tsv)" || die "not logged in: run az login"
log "subscription: $SUBSCRIPTION | environment: $ENV_NAME | region: $LOCATION"

deploy() {  # deploy create|what-if DEPLOY_APIM [extra az args...]
  local verb="$1" with_apim="$2"; shift 2
  az deployment sub "$verb" --name "$DEPLOYMENT" --location "$LOCATION" --template-file "$TEMPLATE" \
    --parameters "@$PARAMS" --parameters "@$SECRET_PARAMS" --parameters "deployApim=$with_apim" "$@"
}

output() {  # output NAME -> a deployment output value
  az deployment sub show --name "$DEPLOYMENT" --query "properties.outputs.$1.value" -o tsv
}

# APIM reads the host key, which exists only once the app runs code: so not a first run only after a
# *successful* deployment whose app has a published package (its functions are listed). A failed or
# half-done earlier run is a first run again.
FIRST_RUN=true
STATE="$(az deployment sub show --name "$DEPLOYMENT" --query properties.provisioningState -o tsv 2>/dev/null || true)"
if [[ "$STATE" == "Succeeded" ]]; then
  EXISTING_APP="$(output AZURE_FUNCTION_NAME 2>/dev/null || true)"
  EXISTING_RG="$(output AZURE_RESOURCE_GROUP 2>/dev/null || true)"
  if [[ -n "$EXISTING_APP" && -n "$EXISTING_RG" ]]; then
    FUNCTIONS="$(az functionapp function list --resource-group "$EXISTING_RG" --name "$EXISTING_APP" \
      --query 'length(@)' -o tsv 2>/dev/null || echo 0)"
    [[ "${FUNCTIONS:-0}" =~ ^[1-9][0-9]*$ ]] && FIRST_RUN=false
  fi
fi
WITH_APIM=$([[ "$FIRST_RUN" == true ]] && echo false || echo true)

log "what-if (deployApim=$WITH_APIM)"
deploy what-if "$WITH_APIM"
$WHAT_IF_ONLY && exit 0

if ! $ASSUME_YES; then
  read -r -p "Apply these changes to '$ENV_NAME'? [y/N] " answer
  [[ "$answer" =~ ^[Yy]$ ]] || die "aborted"
fi

log "infrastructure (deployApim=$WITH_APIM)"
deploy create "$WITH_APIM" --only-show-errors -o none
APP="$(output AZURE_FUNCTION_NAME)"
RG="$(output AZURE_RESOURCE_GROUP)"

publish_package() {
  cd "$ROOT"
  make dashboard-assets  # MSAL for the dashboard, from npm, into the package (gitignored, not funcignored)
  if command -v func >/dev/null; then
    # Remote build: dependencies are installed for the Flex Consumption Linux image.
    func azure functionapp publish "$APP" --python
  else
    command -v zip >/dev/null || die "neither func (Core Tools) nor zip found"
    local package="$WORK/package.zip"
    local -a excludes=()
    while IFS= read -r pattern; do
      [[ -z "$pattern" || "$pattern" == \#* ]] && continue
      excludes+=(-x "${pattern%/}" -x "${pattern%/}/*")
    done < .funcignore
    zip -qr "$package" . "${excludes[@]}"
    az functionapp deployment source config-zip --resource-group "$RG" --name "$APP" --src "$package" \
      --build-remote true --only-show-errors -o none
  fi
}

# Role assignments made by this deployment can take minutes to take effect: until then publishing is
# refused (403). Retry with doubling waits, a bounded number of times.
publish_with_retry() {
  local attempt=1 attempts="${PUBLISH_ATTEMPTS:-6}" wait="${PUBLISH_BACKOFF_SECONDS:-15}"
  until (publish_package); do
    (( attempt < attempts )) || die "publishing failed $attempts times; roles may still be propagating: rerun later"
    log "publish failed (attempt $attempt/$attempts); retrying in ${wait}s"
    sleep "$wait"
    attempt=$((attempt + 1)) wait=$((wait * 2))
  done
}

if $PUBLISH; then
  log "publish package to $APP"
  publish_with_retry
fi

if [[ "$FIRST_RUN" == true ]]; then
  $PUBLISH || die "first deployment needs the package published before APIM; rerun without --skip-publish"
  log "API Management (first run, now that the host serves keys)"
  deploy create true --only-show-errors -o none
fi

log "done"
for name in FUNCTION_APP_URL APIM_GATEWAY_URL CHAT_COMPLETIONS_URL GATEWAY_IDENTITY_PRINCIPAL_ID; do
  printf '%-30s %s\n' "$name" "$(output "$name")"
done
echo "Smoke test: scripts/smoketest.sh \"\$(az deployment sub show -n $DEPLOYMENT --query properties.outputs.APIM_GATEWAY_URL.value -o tsv)/ai\" \"\$TOKEN\""
