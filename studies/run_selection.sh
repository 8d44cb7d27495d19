#!/usr/bin/env bash
# The selection study, phase by phase, into results/selection (resumable: rerun to continue).
# Each phase is one `sadra benchmark` call on studies/selection.yaml; weights are not kept in git.
# Usage: studies/run_selection.sh [PHASE...]   (default: 1)
# Phases 2-4 run the arms that phase 1 chose (docs/selection.md); the SADRA_*_ARM(S) variables name others.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${SADRA_SELECTION_OUT:-results/selection}
GLUE=${SADRA_GLUE_DIR:-../shared/glue}
# Exit 1 means some cells failed (listed in failures.jsonl): go on; anything else stops the study.
bench() { python3 -m sadra benchmark --config studies/selection.yaml --glue-dir "$GLUE" --out "$OUT" --quiet "$@" || [ $? -eq 1 ]; }
for phase in "${@:-1}"; do
  case "$phase" in
    1) for seed in 0 1 2; do   # seed by seed, so that every arm has the same seeds when the study stops
         bench --seeds "$seed" --methods lora lora-ga prop-fisher prop-hutchinson spectral spectral-newton random
       done ;;
    # phase 1's two best rules that do not reduce to uniform ranks
    # shellcheck disable=SC2086  # the arm lists are words
    2) bench --seeds 0 --methods lora-lr0.5x lora-lr2x \
         ${SADRA_LR_ARMS:-prop-hutchinson-lr0.5x prop-hutchinson-lr2x prop-fisher-lr0.5x prop-fisher-lr2x} ;;
    3) bench --methods ${SADRA_INIT_ARM:-spectral-gradinit} ;;
    # r=2: the best rule that moves rank (the spectral rules give uniform r=2 too); 2 cells x 1 thread
    4) bench --methods lora-r2 ${SADRA_R2_ARM:-prop-hutchinson-r2} random-r2 --workers 2 train.threads=1 ;;
    *) echo "unknown phase $phase (1-4)" >&2; exit 2 ;;
  esac
done
