#!/usr/bin/env bash
# The probe benchmark on one GPU: MiniLM and SmolLM2-135M, paper-size batches, under 5 minutes on
# an H200-class GPU. Writes results/gpu/probe_cost.json. Usage: benchmarks/gpu_probe.sh [extra args]
# (SADRA_GPU_PROBE_SIZE=toy runs the CPU-sized check the tests use).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${SADRA_GPU_OUT:-results/gpu}
mkdir -p "$OUT"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" timeout 300 python3 benchmarks/gpu_probe.py \
  --size "${SADRA_GPU_PROBE_SIZE:-full}" --json "$OUT/probe_cost.json" "$@"
