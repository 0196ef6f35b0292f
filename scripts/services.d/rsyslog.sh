#!/usr/bin/env bash
# rsyslog (+ GnuTLS driver) for tests/sinks/test_syslog.py. Each test starts its own rsyslogd
# instance (own config, ports, work directory and pid file); nothing is started here.
# Idempotent and quick when installed; exits 0 even when it cannot install (the tests then fail
# and say rsyslogd is missing).
set -uo pipefail
if command -v rsyslogd >/dev/null 2>&1 && [ -e /usr/lib/x86_64-linux-gnu/rsyslog/lmnsd_gtls.so -o -n "$(ls /usr/lib/*/rsyslog/lmnsd_gtls.so 2>/dev/null)" ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get install -y --no-install-recommends rsyslog rsyslog-gnutls >/dev/null 2>&1 \
  || { $SUDO apt-get update >/dev/null 2>&1 && $SUDO apt-get install -y --no-install-recommends rsyslog rsyslog-gnutls >/dev/null 2>&1; } \
  || echo "rsyslog.sh: could not install rsyslog rsyslog-gnutls"
# The Debian package would start a system instance where an init system exists; the tests never use it.
exit 0
