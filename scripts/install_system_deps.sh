#!/usr/bin/env bash
# Installs the Debian packages the project needs, only where they are missing.
set -euo pipefail
need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
python3.11 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3.11-venv)
command -v node >/dev/null 2>&1 || need+=(nodejs)  # the Node.js client example (examples/node)
command -v npm >/dev/null 2>&1 || need+=(npm)
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${need[@]}"
