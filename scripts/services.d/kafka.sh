#!/usr/bin/env bash
# A Kafka-protocol broker for tests/sinks/test_kafka.py: the noida-db wheel's static binary
# (no Java, no Kafka jars). It goes into its own venv so it never touches the project's; the tests
# start their own broker process from it (free port, temp data dir) and kill it for outage tests.
# Idempotent and quick once installed; exits 0 even when it cannot install (the tests then fail
# and say so).
set -uo pipefail
VENV="${VLLM_AUDIT_KAFKA_VENV:-$HOME/.cache/vllm-audit/kafka-venv}"
find_bin() { ls "$VENV"/lib/python3*/site-packages/noida_db/noida-db 2>/dev/null | head -1; }
BIN="$(find_bin)"
if [ -z "$BIN" ]; then
  echo "installing noida-db (Kafka-protocol broker) into $VENV"
  mkdir -p "$(dirname "$VENV")"
  { [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"; } \
    && "$VENV/bin/pip" install -q 'noida-db>=0.2.3,<0.3' \
    || { echo "kafka.sh: could not install noida-db"; exit 0; }
  BIN="$(find_bin)"
fi
if [ -z "$BIN" ]; then
  echo "kafka.sh: noida-db installed but its broker binary is missing"
  exit 0
fi
chmod +x "$BIN" 2>/dev/null || true
echo "Kafka-protocol broker: $BIN"
exit 0
