#!/usr/bin/env bash
# Sizing for the evidence preset: uniform LoRA (seed 0, the evidence preset's settings) on the
# selection split (rows held out of each train file), at candidate training sizes. The preset takes
# the smallest size at which LoRA clearly learns the task there; the dev sets are not read.
# Usage: studies/size_evidence.sh TASK:ROWS ...   (ROWS "full": the whole train file less the selection rows)
set -euo pipefail
cd "$(dirname "$0")/.."
GLUE=${SADRA_GLUE_DIR:-../shared/glue}
for spec in "$@"; do
  task=${spec%%:*} rows=${spec#*:}
  size=(); [ "$rows" = full ] || size=(max_train_samples="$rows")
  python3 -m sadra train --task "$task" --preset evidence --method lora --seed 0 --glue-dir "$GLUE" \
    --out "runs/sizing/$task-$rows" --quiet eval_split=selection "${size[@]}"
done
