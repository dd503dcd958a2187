#!/usr/bin/env bash
# Install Mono's C# compiler and runtime for the C# client's test tier (clients/dotnet), idempotently.
# A .NET SDK cannot be installed everywhere this runs; Debian's Mono builds the client's shared core.
# Usage: tools/install_mono.sh   (exit 0 with mcs and mono on PATH; non-zero with the reason otherwise)
set -euo pipefail

PACKAGES=(mono-mcs mono-runtime libmono-system-net-http4.0-cil)

log() { printf 'install_mono: %s\n' "$*" >&2; }

have_mono() {
  command -v mcs >/dev/null 2>&1 && command -v mono >/dev/null 2>&1 \
    && [[ -n "$(find /usr/lib/mono -name System.Net.Http.dll -print -quit 2>/dev/null)" ]]
}

if have_mono; then
  exit 0
fi
# shellcheck source=tools/apt_lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt_lib.sh"
apt_install mcs "${PACKAGES[@]}"
have_mono || { log "apt-get finished but mcs, mono or System.Net.Http.dll is still missing"; exit 1; }
log "$(mcs --version)"
