#!/usr/bin/env bash
# An S3 server that enforces Object Lock like AWS S3 does, for tests/archive: LocalStack-core in host
# mode (no Docker), S3 only, in its own Python 3.13 venv (never the project's). Pins from
# /work/shared/research/WAVE2-FEASIBILITY.md §2b: Python 3.13 (the code uses PEP 695 syntax and
# warnings.deprecated), cbor2<6, pyopenssl 24.2.1 with cryptography 43.0.3, joserfc<1.1,
# service_identity (undeclared). moto cannot stand in: it lets COMPLIANCE retention be shortened.
# The tests start their own server (free port, temp data dir) and stop it. Idempotent and quick once
# installed; exits 0 even when it cannot install (the archive tests then fail and say so).
set -uo pipefail
VENV="${VLLM_AUDIT_LOCALSTACK_VENV:-$HOME/.cache/vllm-audit/localstack-venv}"
if "$VENV/bin/python" -c 'import localstack.runtime.main' >/dev/null 2>&1; then
  echo "LocalStack: $VENV"
  exit 0
fi
find_python313() {
  command -v python3.13 >/dev/null 2>&1 && python3.13 -c 'import sys; assert sys.version_info[:2] == (3, 13)' \
    2>/dev/null && { command -v python3.13; return; }
  for p in /root/.pyenv/versions/3.13*/bin/python3.13 "$HOME"/.pyenv/versions/3.13*/bin/python3.13 \
           "$HOME"/.local/share/uv/python/cpython-3.13*/bin/python3.13; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  # No 3.13 on the machine: a standalone CPython build through uv (installed from PyPI).
  local uvdir="$HOME/.cache/vllm-audit/uv-venv"
  { [ -x "$uvdir/bin/uv" ] || { python3 -m venv "$uvdir" && "$uvdir/bin/pip" install -q 'uv>=0.4'; }; } >&2 \
    && "$uvdir/bin/uv" python install 3.13 >&2 && "$uvdir/bin/uv" python find 3.13
}
PY="$(find_python313)"
if [ -z "$PY" ]; then
  echo "localstack.sh: no Python 3.13 found or installable; the archive tests will fail"
  exit 0
fi
echo "installing LocalStack-core (S3 with Object Lock) into $VENV with $PY"
mkdir -p "$(dirname "$VENV")"
{ [ -x "$VENV/bin/pip" ] || "$PY" -m venv "$VENV"; } \
  && "$VENV/bin/pip" install -q 'localstack-core[runtime]==2026.3.0' 'cbor2<6' 'pyopenssl==24.2.1' \
       'cryptography==43.0.3' service_identity 'joserfc<1.1' \
  || { echo "localstack.sh: could not install LocalStack-core"; exit 0; }
"$VENV/bin/python" -c 'import localstack.runtime.main' || echo "localstack.sh: LocalStack installed but does not import"
exit 0
