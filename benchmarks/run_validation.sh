#!/usr/bin/env bash
# The planner's check against reality (docs/planner.md, "Checking the simulator"): pdserve
# colocated and disaggregated under load at three rates up to ~80% of their capacity on this
# machine, two workloads, the whole load REPEATS times (the same command: same seed, arrivals and
# lengths), then calibrates this machine's step profiles (two threads as the colocated worker;
# one thread beside a busy core, as a disaggregated pair's workers run: --neighbour-load), then
# `pdserve plan validate` replays every point's requests through the simulator with those
# profiles and judges each point against the spread of the repeats as well. About 14 minutes per
# repeat and 5 for the profiles; nothing else may run (not even a linter: a calibration beside
# other work is void). SKIP_CALIBRATION=1 validates with the profiles already there.
# Committed: the profiles and the reports' validation.md; .gitignore keeps run-*/ (per-request
# records) and validation.json out (CONTRIBUTING.md).
#
#   benchmarks/run_validation.sh            # REPEATS=3 into run-1/ run-2/ run-3/
#   FIRST_RUN=2 REPEATS=3 benchmarks/run_validation.sh   # add run-2 and run-3 to an existing run-1
#
# Capacities measured by the comparison (benchmarks/results/comparison/, 0.4 req/s points,
# completed requests per second at saturation): summarize ~0.22-0.24 req/s, mixed ~0.23-0.28
# req/s for both targets. Rates up to ~80% of that: summarize 0.05, 0.1, 0.15; mixed 0.1, 0.15,
# 0.2. Every point sends REQUESTS_PER_RATE requests. The report is written twice: with the
# profiles as calibrated, and with the unloaded correction (docs/planner.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PDSERVE="${PDSERVE:-.venv/bin/pdserve}"
OUT="${OUT:-benchmarks/results/validation}"
REQUESTS_PER_RATE="${REQUESTS_PER_RATE:-8}"
REPEATS="${REPEATS:-3}"
FIRST_RUN="${FIRST_RUN:-1}"
PROFILES=benchmarks/results/profiles/SmolLM2-135M-Instruct
say() { echo "[validation $(date +%H:%M:%S)] $*" >&2; }

declare -A RATES=([summarize]=0.05,0.1,0.15 [mixed]=0.1,0.15,0.2)
for run in $(seq "$FIRST_RUN" "$REPEATS"); do
  for workload in summarize mixed; do
    say "run $run of $REPEATS: $workload at ${RATES[$workload]} req/s"
    "$PDSERVE" bench compare --workload "$workload" --targets colocated,disaggregated --rates "${RATES[$workload]}" \
      --requests-per-rate "$REQUESTS_PER_RATE" --seed 7 --time-budget 1200 --out "$OUT/run-$run/load-$workload"
  done
done
if [[ "${SKIP_CALIBRATION:-0}" != 1 ]]; then
  # Right after the load: the machine's speed drifts by ~10% within an hour.
  say "calibrating the step profiles"
  "$PDSERVE" plan calibrate --threads 2 --out "$PROFILES-2t.json"
  "$PDSERVE" plan calibrate --threads 1 --neighbour-load --out "$PROFILES-1t-neighbour.json"
fi
say "replaying every point of every run through the simulator"
runs=()
for run in $(seq 1 "$REPEATS"); do
  runs+=("$OUT/run-$run/load-summarize/compare.json" "$OUT/run-$run/load-mixed/compare.json")
done
profiles=(--profile-1t "$PROFILES-1t-neighbour.json" --profile-2t "$PROFILES-2t.json")
"$PDSERVE" plan validate "${runs[@]}" "${profiles[@]}" --out "$OUT/as-calibrated"
"$PDSERVE" plan validate "${runs[@]}" "${profiles[@]}" --unloaded-correction --out "$OUT/unloaded-correction"
