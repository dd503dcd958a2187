#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver for the dashboard's browser test, idempotently.
# Usage: tools/install_chromium.sh   (exit 0 with /usr/bin/chromium and /usr/bin/chromedriver; non-zero with the reason)
set -euo pipefail

PACKAGES=(chromium chromium-driver)

log() { printf 'install_chromium: %s\n' "$*" >&2; }

have_chromium() { [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; }

if have_chromium; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  log "chromium is missing and there is no apt-get to install ${PACKAGES[*]}"
  exit 1
fi
sudo=""
if [[ "$(id -u)" -ne 0 ]]; then
  if ! { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
    log "chromium is missing and installing ${PACKAGES[*]} needs root (or password-less sudo)"
    exit 1
  fi
  sudo="sudo -n"
fi
log "installing ${PACKAGES[*]} with apt-get"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >/dev/null
$sudo apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
have_chromium || { log "apt-get finished but /usr/bin/chromium or /usr/bin/chromedriver is still missing"; exit 1; }
log "$(/usr/bin/chromium --version)"
