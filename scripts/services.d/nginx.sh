#!/usr/bin/env bash
# nginx (the load balancer in tests/cluster) and iproute2 (network namespaces + veth pairs the
# partition test makes). Each test starts its own nginx (own config, port, pid and temp paths);
# nothing is started here. Idempotent and quick when installed; exits 0 even when it cannot
# install (the cluster tests then fail and say nginx is missing).
set -uo pipefail
if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then
  if command -v ip >/dev/null 2>&1; then exit 0; fi
fi
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
export DEBIAN_FRONTEND=noninteractive
PKGS="nginx-light iproute2"
$SUDO apt-get install -y --no-install-recommends $PKGS >/dev/null 2>&1 \
  || { $SUDO apt-get update >/dev/null 2>&1 && $SUDO apt-get install -y --no-install-recommends $PKGS >/dev/null 2>&1; } \
  || $SUDO apt-get install -y --no-install-recommends nginx iproute2 >/dev/null 2>&1 \
  || echo "nginx.sh: could not install nginx / iproute2"
# The Debian package may start a system nginx on port 80 where an init system exists; the tests
# never use it.
exit 0
