#!/usr/bin/env bash
# Serve the default model's GGUF with llama.cpp (llama-cpp-python's server) on 127.0.0.1:PORT,
# pinned to CORES.
#   benchmarks/peers/serve_llama_cpp.sh PORT [CORES]
# CORES is a CPU list for taskset -c (0, 0,1, 0-1); the default is every core this process may
# use; llama.cpp runs one thread per core. OpenAI API at http://127.0.0.1:PORT/v1, model name
# SmolLM2-135M-Instruct, ready when GET /v1/models answers 200 (a few seconds). Stop it with
# SIGINT or SIGTERM.
#
# One request at a time: the server keeps one llama.cpp context behind a lock, so concurrent
# requests queue. Its default would be worse for a load test: a new request interrupts the one
# streaming (it gets [DONE] early); --interrupt_requests False turns that off.
#
# Environment (each optional):
#   LLAMA_N_CTX        context tokens (default 8192, the model's trained length, as pdserve)
#   LLAMA_EXTRA_ARGS   more server flags, split on spaces (e.g. "--flash_attn True")
set -euo pipefail
PEER=llama-cpp
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

[[ $# -ge 1 && $# -le 2 && "$1" =~ ^[0-9]+$ ]] || { echo "usage: $0 PORT [CORES]" >&2; exit 2; }
port="$1"
cores="$(resolve_cores "${2:-}")"
threads="$(count_cpus "$cores")"
DIR="$(peers_root)/$PEER"
require_installed "$DIR" install_llama_cpp.sh

read -ra extra <<<"${LLAMA_EXTRA_ARGS:-}"
# No --chat_format: the server then formats chats with the GGUF's own template (ChatML here).
# --logits_all False: logits for the last position only (it defaults to every prompt position,
# which slows prefill and is needed only for prompt logprobs / echo).
exec taskset -c "$cores" "$DIR/bin/python" -m llama_cpp.server \
  --model "$DIR/model.gguf" \
  --model_alias "$SERVED_MODEL_NAME" \
  --host 127.0.0.1 --port "$port" \
  --n_threads "$threads" --n_threads_batch "$threads" \
  --n_ctx "${LLAMA_N_CTX:-8192}" \
  --logits_all False \
  --interrupt_requests False \
  "${extra[@]}"
