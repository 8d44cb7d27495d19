#!/usr/bin/env bash
# SmolLM2 at the budget of uniform r=2 (studies/llm_r2.yaml) into results/llm-r2, two seeds at a time
# so that a stopped run leaves whole lora/sadra pairs; rerun to continue (finished cells are skipped).
# Usage: studies/run_llm_r2.sh [PART...]   (default: pairs random)
#   pairs   lora and sadra, seeds 0-4
#   random  random, seeds 0-4
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${SADRA_LLM_R2_OUT:-results/llm-r2}
GLUE=${SADRA_GLUE_DIR:-../shared/glue}
# Exit 1 means some cells failed (listed in failures.jsonl): go on; anything else stops the study.
bench() { python3 -m sadra benchmark --config studies/llm_r2.yaml --glue-dir "$GLUE" --out "$OUT" --quiet "$@" || [ $? -eq 1 ]; }
for word in ${*:-pairs random}; do
  case "$word" in
    pairs) for seeds in "0 1" "2 3" "4"; do bench --seeds $seeds --methods lora sadra; done ;;
    random) bench --seeds 0 1 2 3 4 --methods random ;;
    *) echo "unknown part $word (pairs, random)" >&2; exit 2 ;;
  esac
done
