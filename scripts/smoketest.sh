#!/usr/bin/env bash
# End-to-end smoke test of a running gateway: the local stack or a deployed instance.
#
#   scripts/smoketest.sh BASE_URL TOKEN
#     BASE_URL  http://127.0.0.1:7071/api (local host), https://<func>.azurewebsites.net/api,
#               or https://<apim>.azure-api.net/ai (through APIM)
#     TOKEN     an Entra access token for the gateway (locally: `make token`)
#   Optional environment:
#     SMOKE_MODEL           model to call (default: the first one /v1/models lists)
#     APIM_SUBSCRIPTION_KEY sent as Ocp-Apim-Subscription-Key when going through APIM
#     FUNCTIONS_KEY         sent as x-functions-key when calling a deployed function directly
#     SMOKE_TIMEOUT         seconds per request (default 60)
#
# Checks: health 200; models 200 with at least one model; one chat completion 200 with usage; one
# streamed completion ending with `data: [DONE]`; a request without a token is 401 with an
# OpenAI-shaped error. Needs only curl and python3. Secrets go to curl through a private header file,
# never on the command line or the terminal. Exit status: the number of failed checks (0 = all passed).
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }

if [[ $# -ne 2 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage >&2
  exit 2
fi
BASE="${1%/}"
TOKEN="$2"
TIMEOUT="${SMOKE_TIMEOUT:-60}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
chmod 700 "$WORK"

# Header files: one with the bearer token, one without (for the 401 check).
: > "$WORK/anon.h"
[[ -n "${APIM_SUBSCRIPTION_KEY:-}" ]] && printf 'Ocp-Apim-Subscription-Key: %s\n' "$APIM_SUBSCRIPTION_KEY" >> "$WORK/anon.h"
[[ -n "${FUNCTIONS_KEY:-}" ]] && printf 'x-functions-key: %s\n' "$FUNCTIONS_KEY" >> "$WORK/anon.h"
cp "$WORK/anon.h" "$WORK/auth.h"
printf 'Authorization: Bearer %s\n' "$TOKEN" >> "$WORK/auth.h"

passed=0
failed=0
results=()

record() {  # record PASS|FAIL name detail
  results+=("$(printf '%-4s  %-28s %s' "$1" "$2" "$3")")
  if [[ "$1" == PASS ]]; then passed=$((passed + 1)); else failed=$((failed + 1)); fi
}

# request METHOD PATH HEADERFILE [BODY] -> sets STATUS; body in $WORK/body
request() {
  local method="$1" path="$2" headers="$3" body="${4:-}"
  local args=(-sS -o "$WORK/body" -w '%{http_code}' --max-time "$TIMEOUT" -X "$method" -H "@$headers"
              -H "x-request-id: smoke-$RANDOM$RANDOM")
  if [[ -n "$body" ]]; then
    args+=(-H 'Content-Type: application/json' --data-binary "$body")
  fi
  STATUS="$(curl "${args[@]}" "$BASE$path" 2>"$WORK/curl.err" || true)"
  [[ -n "$STATUS" ]] || STATUS="000"
}

# json_check PYTHON_EXPR: evaluates EXPR with `b` bound to the parsed body; prints the result or fails.
json_check() {
  python3 -c '
import json, sys
try:
    b = json.load(open(sys.argv[1]))
    out = eval(sys.argv[2], {}, {"b": b})
except Exception as exc:
    print(f"unparseable: {type(exc).__name__}"); sys.exit(1)
if not out:
    sys.exit(1)
print(out)' "$WORK/body" "$1"
}

check_health() {
  request GET /health "$WORK/anon.h"
  if [[ "$STATUS" == 200 ]]; then record PASS "GET /health" "200"; else record FAIL "GET /health" "status $STATUS"; fi
}

check_models() {
  request GET /v1/models "$WORK/auth.h"
  local first
  if [[ "$STATUS" == 200 ]] && first="$(json_check 'b["object"] == "list" and b["data"] and b["data"][0]["id"]')"; then
    MODEL="${SMOKE_MODEL:-$first}"
    record PASS "GET /v1/models" "200, $(json_check 'len(b["data"])') models"
  else
    MODEL="${SMOKE_MODEL:-}"
    record FAIL "GET /v1/models" "status $STATUS, expected 200 and a non-empty list"
  fi
}

chat_body() {  # chat_body STREAM(true|false)
  python3 -c 'import json, sys; print(json.dumps({"model": sys.argv[1], "stream": sys.argv[2] == "true", "max_tokens": 16,
  "messages": [{"role": "user", "content": "Reply with the single word: pong"}]}))' "$MODEL" "$1"
}

check_chat() {
  if [[ -z "${MODEL:-}" ]]; then record FAIL "POST chat (non-stream)" "no model to call"; return; fi
  request POST /v1/chat/completions "$WORK/auth.h" "$(chat_body false)"
  local usage
  if [[ "$STATUS" == 200 ]] && usage="$(json_check 'b["choices"] and isinstance(b["usage"]["prompt_tokens"], int) and isinstance(b["usage"]["completion_tokens"], int) and "usage " + str(b["usage"]["prompt_tokens"]) + "+" + str(b["usage"]["completion_tokens"])')"; then
    record PASS "POST chat (non-stream)" "200 $MODEL, $usage"
  else
    record FAIL "POST chat (non-stream)" "status $STATUS, expected 200 with choices and usage"
  fi
}

check_stream() {
  if [[ -z "${MODEL:-}" ]]; then record FAIL "POST chat (stream)" "no model to call"; return; fi
  request POST /v1/chat/completions "$WORK/auth.h" "$(chat_body true)"
  local last chunks
  last="$(grep -v '^[[:space:]]*$' "$WORK/body" | tail -n 1 | tr -d '\r' || true)"
  chunks="$(grep -c '^data: ' "$WORK/body" || true)"
  if [[ "$STATUS" == 200 && "$last" == "data: [DONE]" ]]; then
    record PASS "POST chat (stream)" "200, $chunks events, ends with [DONE]"
  else
    record FAIL "POST chat (stream)" "status $STATUS, last line '${last:0:60}'"
  fi
}

check_unauthenticated() {
  request GET /v1/models "$WORK/anon.h"
  local code
  if [[ "$STATUS" == 401 ]] && code="$(json_check 'isinstance(b["error"]["message"], str) and b["error"]["type"] and "code=" + str(b["error"].get("code"))')"; then
    record PASS "no token -> 401" "OpenAI error shape, $code"
  else
    record FAIL "no token -> 401" "status $STATUS, expected 401 with {error: {message, type, code}}"
  fi
}

check_health
check_models
check_chat
check_stream
check_unauthenticated

echo "Smoke test against $BASE"
printf '%s\n' "${results[@]}"
echo "passed: $passed  failed: $failed"
exit "$failed"
