#!/usr/bin/env bash
# Start the local services the tests use (PostgreSQL, Redis) when they are not running.
# On this project's machines they are Debian packages started at boot; this only restarts them.
set -uo pipefail
if command -v pg_isready >/dev/null; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  fi
fi
if command -v redis-server >/dev/null; then
  if ! (exec 3<>/dev/tcp/127.0.0.1/6379) 2>/dev/null; then
    echo "starting Redis"
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
      --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
    sleep 1
  fi
fi
# Services a test area needs that the machine lacks (rsyslog, a Kafka-protocol broker, ...):
# one idempotent script each; a failure here makes those tests fail with their own message.
for script in "$(dirname "$0")"/services.d/*.sh; do
  [ -e "$script" ] || continue
  echo "== services.d/$(basename "$script")"
  bash "$script" || echo "services.d/$(basename "$script") failed; its tests will fail and say why"
done
exit 0
