#!/usr/bin/env bash
# The verdict grid (the `evidence` preset) into results/evidence, part by part, seed by seed, so that
# every arm has the same seeds whenever it stops; rerun to continue (finished cells are skipped).
# Usage: studies/run_evidence.sh [PART...]   (default: base sadra sweep)
#   base   every arm: lora, sadra-seed, random (seeds 0-4), eva, lora-ga (0-2), full, adalora (0-1),
#          and sadra (0-4) last: where its allocation is uniform LoRA's adapter, a cell takes the
#          finished lora cell's results (same_training_as) after its probe instead of training the
#          same adapter again
#   sadra  the default method alone, seeds 0-4
#   sweep  lora, random and sadra (last, as above) at the budgets of uniform r=2 and r=16, SST-2 and
#          MRPC, seeds 0-2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${SADRA_EVIDENCE_OUT:-results/evidence}
GLUE=${SADRA_GLUE_DIR:-../shared/glue}
# Exit 1 means some cells failed (listed in failures.jsonl): go on; anything else stops the grid.
bench() { python3 -m sadra benchmark --preset evidence --glue-dir "$GLUE" --out "$OUT" --quiet "$@" || [ $? -eq 1 ]; }
for part in "${@:-base sadra sweep}"; do
  for word in $part; do
    case "$word" in
      base) for seed in 0 1 2 3 4; do bench --seeds "$seed" --methods lora sadra-seed random eva lora-ga full adalora sadra; done ;;
      sadra) for seed in 0 1 2 3 4; do bench --seeds "$seed" --methods sadra; done ;;
      sweep) for seed in 0 1 2; do
               bench --tasks sst2 mrpc --seeds "$seed" --methods lora-r2 lora-r16 random-r2 random-r16 sadra-r2 sadra-r16
             done ;;
      *) echo "unknown part $word (base, sadra, sweep)" >&2; exit 2 ;;
    esac
  done
done
