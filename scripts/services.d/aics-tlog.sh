#!/usr/bin/env bash
# A third-party C2SP verifier for tests/export/test_third_party.py: aics-tlog (pure Python: signed-note,
# tlog-checkpoint, RFC 6962/9162 inclusion and consistency proofs) from PyPI, pinned, in its own venv.
# It needs Python >= 3.12 (the project runs on 3.11), so it reuses the Python 3.13 that
# services.d/localstack.sh finds or installs (pyenv, or a standalone CPython through uv from PyPI).
# Idempotent; exits 0 even when it cannot install (the test then fails in CI and says why).
set -uo pipefail
VENV="${VLLM_AUDIT_AICS_VENV:-$HOME/.cache/vllm-audit/aics-tlog-venv}"
PIN='aics-tlog==0.2.1'
if "$VENV/bin/python" -c 'import aics_tlog, sys; assert aics_tlog.__version__ == "0.2.1"' >/dev/null 2>&1; then
  echo "aics-tlog: $VENV"
  exit 0
fi
usable() { "$1" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; }
find_python() {
  local p
  for p in "$(command -v python3.13)" "$(command -v python3.12)" \
           /root/.pyenv/versions/3.1[23]*/bin/python3.1[23] "$HOME"/.pyenv/versions/3.1[23]*/bin/python3.1[23] \
           "$HOME"/.local/share/uv/python/cpython-3.1[23]*/bin/python3.1[23]; do
    [ -n "$p" ] && [ -x "$p" ] && usable "$p" && { echo "$p"; return; }
  done
  local uvdir="$HOME/.cache/vllm-audit/uv-venv"
  { [ -x "$uvdir/bin/uv" ] || { python3 -m venv "$uvdir" && "$uvdir/bin/pip" install -q 'uv>=0.4'; }; } >&2 \
    && "$uvdir/bin/uv" python install 3.13 >&2 && "$uvdir/bin/uv" python find 3.13
}
PY="$(find_python)"
if [ -z "$PY" ]; then
  echo "aics-tlog.sh: no Python >= 3.12 found or installable; tests/export/test_third_party.py will fail"
  exit 0
fi
echo "installing $PIN into $VENV with $PY"
mkdir -p "$(dirname "$VENV")"
{ [ -x "$VENV/bin/pip" ] || "$PY" -m venv "$VENV"; } && "$VENV/bin/pip" install -q "$PIN" \
  || { echo "aics-tlog.sh: could not install $PIN"; exit 0; }
"$VENV/bin/python" -c 'import aics_tlog' || echo "aics-tlog.sh: aics-tlog installed but does not import"
exit 0
