# shellcheck shell=bash
# Shared by the peer install and serve scripts (sourced, not run).
#
# Every peer lives in its own directory, ${PDSERVE_CACHE_DIR:-~/.cache/pdserve}/peers/<name>: the
# directory is the peer's venv, and also holds installed.json (written last, so its presence means
# a finished install) and the model files the peer serves (copied or exported at install time, so
# the peer keeps working when pdserve's own .venv is rebuilt).

PEERS_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$PEERS_HOME/../.." && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
SERVED_MODEL_NAME="SmolLM2-135M-Instruct"

# Same rule as pdserve.envs.cache_dir(): PDSERVE_CACHE_DIR, else the XDG cache.
peers_root() {
  if [[ -n "${PDSERVE_CACHE_DIR:-}" ]]; then
    echo "${PDSERVE_CACHE_DIR/#\~/$HOME}/peers"
  else
    echo "${XDG_CACHE_HOME:-$HOME/.cache}/pdserve/peers"
  fi
}

log() { echo "[$PEER $(date +%H:%M:%S)] $*" >&2; }

# The one line a caller reports: "<peer>: not installable: <reason>".
fail() {
  echo "$PEER: not installable: $*" >&2
  exit 1
}

# Installs and builds share a 2-core machine with timing runs: lowest priority, one job.
export MAKEFLAGS=-j1 CMAKE_BUILD_PARALLEL_LEVEL=1
NICE=(nice -n 19)

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
  elif command -v python3.11 >/dev/null; then echo python3.11
  else echo python3
  fi
}

# pdserve, to find or export the default model: PDSERVE_BIN, else the repo's .venv, else PATH.
pdserve_bin() {
  if [[ -n "${PDSERVE_BIN:-}" ]]; then echo "$PDSERVE_BIN"
  elif [[ -x "$REPO_ROOT/.venv/bin/pdserve" ]]; then echo "$REPO_ROOT/.venv/bin/pdserve"
  elif command -v pdserve >/dev/null; then command -v pdserve
  else return 1
  fi
}

make_venv() {
  local dir="$1"
  if [[ ! -x "$dir/bin/python" ]]; then
    local python
    python="$(pick_python)"
    log "creating venv $dir with $("$python" --version 2>&1)"
    mkdir -p "$(dirname "$dir")"
    "${NICE[@]}" "$python" -m venv "$dir" || fail "could not create a venv with $python"
  fi
  pip_install "$dir" --quiet --upgrade pip || fail "could not upgrade pip in $dir (is PyPI reachable?)"
}

# pip in the peer's venv, niced and quiet; pip's own "Location ... is ignored" noise is dropped.
pip_install() {
  local dir="$1"
  shift
  "${NICE[@]}" "$dir/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@" \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

# installed.json: peer, versions (name=version pairs), install seconds, venv size, model, time.
write_installed_json() {
  local dir="$1" seconds="$2" model="$3"
  shift 3
  "$dir/bin/python" - "$dir" "$PEER" "$seconds" "$model" "$@" <<'EOF'
import datetime, json, os, subprocess, sys
from importlib import metadata

directory, peer, seconds, model, *packages = sys.argv[1:]
size = subprocess.run(["du", "-sb", directory], capture_output=True, text=True).stdout.split()[0]
record = {
    "peer": peer,
    "versions": {name: metadata.version(name) for name in packages},
    "python": sys.version.split()[0],
    "install_seconds": int(seconds),
    "venv_bytes": int(size),
    "model": model,
    "installed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}
with open(os.path.join(directory, "installed.json"), "w") as file:
    json.dump(record, file, indent=2)
    file.write("\n")
print(json.dumps(record))
EOF
}

# The CPUs in a list such as "0", "0,1" or "0-3,6": how many.
count_cpus() {
  local total=0 part
  IFS=, read -ra parts <<<"$1"
  for part in "${parts[@]}"; do
    if [[ "$part" == *-* ]]; then total=$((total + ${part#*-} - ${part%-*} + 1))
    else total=$((total + 1))
    fi
  done
  echo "$total"
}

# Cores to pin a server to: the argument, else every core this process may use.
resolve_cores() {
  local cores="${1:-}"
  if [[ -z "$cores" ]]; then
    cores="$(awk '/^Cpus_allowed_list/ {print $2}' /proc/self/status)"
  fi
  [[ "$cores" =~ ^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$ ]] || {
    echo "CORES must be a CPU list such as 0 or 0,1 or 0-1, got '$cores'" >&2
    exit 2
  }
  echo "$cores"
}

require_installed() {
  local dir="$1" install_script="$2"
  [[ -f "$dir/installed.json" ]] || {
    echo "$PEER is not installed in $dir: run benchmarks/peers/$install_script first" >&2
    exit 3
  }
}
