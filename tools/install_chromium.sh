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
# shellcheck source=tools/apt_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt_lib.sh"
apt_install chromium "${PACKAGES[@]}"
have_chromium || { log "apt-get finished but /usr/bin/chromium or /usr/bin/chromedriver is still missing"; exit 1; }
log "$(/usr/bin/chromium --version)"
