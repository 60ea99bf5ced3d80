#!/usr/bin/env bash
# Make sure redis-server is on PATH: install Debian's package when we are root,
# otherwise say what to do. Tests start their own private server on a free loopback port.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "redis-server missing: installing Debian's redis-server package"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    # Debian's package starts a system service; the project runs its own servers.
    (command -v service >/dev/null && service redis-server stop >/dev/null 2>&1) || true
    exit 0
fi
echo "error: redis-server is not installed and this user cannot apt-get install it." >&2
echo "       install it (e.g. 'sudo apt-get install redis-server') and re-run." >&2
exit 1
