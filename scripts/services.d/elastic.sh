#!/usr/bin/env bash
# An Elasticsearch-API stand-in for tests/sinks/test_elastic.py: the noida-db wheel's static binary
# (`noida-db start --only elasticsearch`: _bulk with per-item results and 409 on create, dynamic
# mappings and their 400s, _refresh/_search/_count/_doc, data kept in its data dir). No JVM build of
# Elasticsearch or OpenSearch installs here. Its own venv, never the project's; the tests start
# their own server (free port, temp data dir) and kill it for outage tests. Idempotent and quick
# once installed; exits 0 even when it cannot install (the tests then fail and say so).
set -uo pipefail
VENV="${VLLM_AUDIT_ELASTIC_VENV:-$HOME/.cache/vllm-audit/elastic-venv}"
find_bin() { ls "$VENV"/lib/python3*/site-packages/noida_db/noida-db 2>/dev/null | head -1; }
BIN="$(find_bin)"
if [ -z "$BIN" ]; then
  echo "installing noida-db (Elasticsearch-API stand-in) into $VENV"
  mkdir -p "$(dirname "$VENV")"
  { [ -x "$VENV/bin/pip" ] || python3 -m venv "$VENV"; } \
    && "$VENV/bin/pip" install -q 'noida-db>=0.2.3,<0.3' \
    || { echo "elastic.sh: could not install noida-db"; exit 0; }
  BIN="$(find_bin)"
fi
if [ -z "$BIN" ]; then
  echo "elastic.sh: noida-db installed but its binary is missing"
  exit 0
fi
chmod +x "$BIN" 2>/dev/null || true
echo "Elasticsearch-API stand-in: $BIN"
exit 0
