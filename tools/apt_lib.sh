#!/usr/bin/env bash
# Shared by the tools/install_*.sh scripts: install Debian packages with apt-get, as root or with password-less sudo.
# apt_install TOOL PACKAGE...   (TOOL names what is missing in the messages; returns non-zero with the reason)

apt_install() {
  local tool="$1"
  shift
  local name="${0##*/}"
  name="${name%.sh}"
  if ! command -v apt-get >/dev/null 2>&1; then
    printf '%s: %s is missing and there is no apt-get to install %s\n' "$name" "$tool" "$*" >&2
    return 1
  fi
  local sudo=""
  if [[ "$(id -u)" -ne 0 ]]; then
    if ! { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
      printf '%s: %s is missing and installing %s needs root (or password-less sudo)\n' "$name" "$tool" "$*" >&2
      return 1
    fi
    sudo="sudo -n"
  fi
  printf '%s: installing %s with apt-get\n' "$name" "$*" >&2
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq >/dev/null
  $sudo apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
