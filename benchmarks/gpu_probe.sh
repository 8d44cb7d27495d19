#!/usr/bin/env bash
# The probe benchmark on one GPU: MiniLM and SmolLM2-135M, paper-size batches, under 5 minutes on
# an H200-class GPU. Writes results/gpu/probe_cost.json. Usage: benchmarks/gpu_probe.sh [extra args]
# (SADRA_GPU_PROBE_SIZE=toy runs the CPU-sized check the tests use). SADRA_GPU_PROBE_LIMIT: seconds
# before it is stopped (default 300 on the GPU; 900 for the toy size, whose CPU may be shared).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${SADRA_GPU_OUT:-results/gpu}
SIZE=${SADRA_GPU_PROBE_SIZE:-full}
LIMIT=${SADRA_GPU_PROBE_LIMIT:-$([ "$SIZE" = toy ] && echo 900 || echo 300)}
mkdir -p "$OUT"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" timeout "$LIMIT" python3 benchmarks/gpu_probe.py \
  --size "$SIZE" --json "$OUT/probe_cost.json" "$@"
