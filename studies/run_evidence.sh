#!/usr/bin/env bash
# The verdict grid (the `evidence` preset) into results/evidence, part by part, seed by seed, so that
# the arms of a part have the same seeds whenever it stops; rerun to continue (finished cells are
# skipped). Usage: studies/run_evidence.sh [PART...]   (default: core sweep baselines; the sweep
# before the baselines, since the GPU grid already has those on the full training sets)
#   core       what the verdict on rank allocation needs first: lora, sadra-seed, random and sadra
#              (last: where its allocation is uniform LoRA's adapter, a cell takes the finished lora
#              cell's results, same_training_as, after its probe instead of training it again),
#              seeds 0-4
#   baselines  eva, lora-ga (seeds 0-2), full and adalora (seeds 0-1)
#   base       core, then baselines
#   sadra      the default method alone, seeds 0-4
#   sweep      lora, random and sadra (last, as above) at the budgets of uniform r=2 and r=16, SST-2
#              and MRPC, seeds 0-2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${SADRA_EVIDENCE_OUT:-results/evidence}
GLUE=${SADRA_GLUE_DIR:-../shared/glue}
# Exit 1 means some cells failed (listed in failures.jsonl): go on; anything else stops the grid.
bench() { python3 -m sadra benchmark --preset evidence --glue-dir "$GLUE" --out "$OUT" --quiet "$@" || [ $? -eq 1 ]; }
words=()
for word in ${*:-core sweep baselines}; do
  if [ "$word" = base ]; then words+=(core baselines); else words+=("$word"); fi
done
for word in "${words[@]}"; do
  case "$word" in
    core) for seed in 0 1 2 3 4; do bench --seeds "$seed" --methods lora sadra-seed random sadra; done ;;
    baselines) for seed in 0 1 2; do bench --seeds "$seed" --methods eva lora-ga full adalora; done ;;
    sadra) for seed in 0 1 2 3 4; do bench --seeds "$seed" --methods sadra; done ;;
    sweep) for seed in 0 1 2; do
             bench --tasks sst2 mrpc --seeds "$seed" --methods lora-r2 lora-r16 random-r2 random-r16 sadra-r2 sadra-r16
           done ;;
    *) echo "unknown part $word (core, baselines, base, sadra, sweep)" >&2; exit 2 ;;
  esac
done
