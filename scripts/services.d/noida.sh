#!/usr/bin/env bash
# The noida-db wheel's static binary: the Kafka-protocol broker (tests/sinks/test_kafka.py,
# tests/collect) and the Elasticsearch-API stand-in (tests/sinks/test_elastic.py) — no Java, no
# Kafka jars, no JVM build of Elasticsearch installs here. It goes into its own venv so it never
# touches the project's; the tests start their own processes from it (free port, temp data dir).
# Idempotent and quick once installed; exits 0 even when it cannot install (the tests then fail
# and say so).
set -uo pipefail
VENV="${VLLM_AUDIT_NOIDA_VENV:-$HOME/.cache/vllm-audit/noida-venv}"
find_bin() { ls "$VENV"/lib/python3*/site-packages/noida_db/noida-db 2>/dev/null | head -1; }
BIN="$(find_bin)"
if [ -z "$BIN" ]; then
  echo "installing noida-db (Kafka-protocol broker, Elasticsearch-API stand-in) into $VENV"
  mkdir -p "$(dirname "$VENV")"
  { [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"; } \
    && "$VENV/bin/pip" install -q 'noida-db>=0.2.3,<0.3' \
    || { echo "noida.sh: could not install noida-db"; exit 0; }
  BIN="$(find_bin)"
fi
if [ -z "$BIN" ]; then
  echo "noida.sh: noida-db installed but its binary is missing"
  exit 0
fi
chmod +x "$BIN" 2>/dev/null || true
echo "noida-db (Kafka protocol, Elasticsearch API): $BIN"
exit 0
