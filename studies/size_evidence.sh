#!/usr/bin/env bash
# Sizing for the evidence preset: uniform LoRA (seed 0, the evidence preset's settings) on the
# selection split (rows held out of each train file), at candidate training sizes. The preset takes
# the smallest size at which LoRA clearly learns the task there; the dev sets are not read.
# Usage: studies/size_evidence.sh TASK:ROWS[:EPOCHS] ... [KEY=VALUE ...]
#   ROWS "full": the whole train file less the selection rows; EPOCHS: the preset's unless given.
#   KEY=VALUE settings apply to every run and name it, e.g. min_train_words=10 (SST-2's whole sentences).
# Each run goes to runs/sizing/TASK-ROWS[-EPOCHSep][-KEYVALUE...]/ (copy its metrics.json, config.yaml
# and train_log.jsonl to results/sizing/ to keep them).
set -euo pipefail
cd "$(dirname "$0")/.."
GLUE=${SADRA_GLUE_DIR:-../shared/glue}
specs=(); common=(); tag=""
for arg in "$@"; do
  if [[ "$arg" == *=* ]]; then common+=("$arg"); tag="$tag-${arg/=/}"; else specs+=("$arg"); fi
done
for spec in "${specs[@]}"; do
  IFS=: read -r task rows epochs <<< "$spec"
  extra=("${common[@]}"); name="$task-$rows"
  [ "$rows" = full ] || extra+=(max_train_samples="$rows")
  if [ -n "${epochs:-}" ]; then extra+=(train.epochs="$epochs"); name="$name-${epochs}ep"; fi
  name="$name$tag"
  python3 -m sadra train --task "$task" --preset evidence --method lora --seed 0 --glue-dir "$GLUE" \
    --out "runs/sizing/$name" --quiet eval_split=selection "${extra[@]}"
done
