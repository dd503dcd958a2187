#!/usr/bin/env bash
# Static checks of the infrastructure and the shell scripts (no Azure access, no Bicep CLI needed):
#   1. checkov over infra/ (Bicep), skipped checks and their reasons in infra/.checkov.yaml
#   2. shellcheck over scripts/*.sh, tools/*.sh and .ci/run
# Installs the pinned tools on first use (tools/install_checkov.sh). Exits non-zero on any finding.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CKV_VENV:-$ROOT/.local/ckv}"
cd "$ROOT"

if [[ ! -x "$VENV/bin/checkov" ]] || { ! command -v shellcheck >/dev/null 2>&1 && [[ ! -x "$VENV/bin/shellcheck" ]]; }; then
  bash "$ROOT/tools/install_checkov.sh" >/dev/null
fi
CHECKOV="$VENV/bin/checkov"
SHELLCHECK="$(command -v shellcheck || echo "$VENV/bin/shellcheck")"

status=0

echo "== checkov (bicep) =="
# A template checkov cannot parse is skipped whole, and checkov still exits 0: count that as a failure.
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
if ! "$CHECKOV" -d infra --framework bicep --skip-download --quiet --config-file infra/.checkov.yaml | tee "$report"; then
  status=1
fi
if grep -Eq "Parsing errors: [1-9]" "$report"; then
  echo "checkov could not parse every template (see 'Error parsing file' above)" >&2
  status=1
fi

echo "== shellcheck =="
shopt -s nullglob
scripts=(scripts/*.sh tools/*.sh)
[[ -f .ci/run ]] && scripts+=(.ci/run)
if (( ${#scripts[@]} )); then
  if "$SHELLCHECK" --version >/dev/null && "$SHELLCHECK" "${scripts[@]}"; then
    echo "shellcheck: ${#scripts[@]} files clean"
  else
    status=1
  fi
fi

if (( status )); then
  echo "check_infra: FAILED" >&2
else
  echo "check_infra: OK"
fi
exit "$status"
