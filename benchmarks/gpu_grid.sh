#!/usr/bin/env bash
# The evidence arms on one GPU (the `gpu` preset: full training sets, 5 seeds), within one
# 10-minute command; its cell processes share the GPU. The grid folder resumes: a second call
# runs only the cells the first did not finish. Usage: benchmarks/gpu_grid.sh [key=value ...]
#
#   SADRA_GPU_GRID       grid folder (default results/gpu)
#   SADRA_GPU_WORKERS    cell processes at once (default 16; each gets one CPU thread)
#   SADRA_GPU_LIMIT      seconds before the grid is stopped (default 510), leaving time to report
#   SADRA_GPU_GRID_SIZE  full (default) or smoke: a CPU-sized check, MRPC only, tiny subsets
#   SADRA_GLUE_DIR       GLUE folder (default .gpu/glue if benchmarks/gpu_inputs.py wrote it,
#                        else ../shared/glue); the model is .gpu/minilm if present, else minilm
#   OUT                  if set (the device tool sets it), the grid's small files are copied there,
#                        at most the 8 a device call brings back: results.jsonl, failures.jsonl,
#                        results.md, report.md, benchmark_config.json, probe_cost.json, share.json
#                        and runs.tar.gz (every run folder, weights left out); `sadra report` here
#                        redraws the figures
set -euo pipefail
cd "$(dirname "$0")/.."
GRID=${SADRA_GPU_GRID:-results/gpu}
LIMIT=${SADRA_GPU_LIMIT:-510}
GLUE=${SADRA_GLUE_DIR:-$([ -d .gpu/glue ] && echo .gpu/glue || echo ../shared/glue)}
MODEL=$([ -d .gpu/minilm ] && echo .gpu/minilm || echo minilm)
WORKERS=${SADRA_GPU_WORKERS:-16}   # the gpu preset says 16 too; this overrides it
SIZE=()
if [ "${SADRA_GPU_GRID_SIZE:-full}" = smoke ]; then
  WORKERS=${SADRA_GPU_WORKERS:-2}
  SIZE=(tasks=mrpc methods=sadra,eva seeds=0,1 method_seeds.eva=0 max_train_samples=32 max_eval_samples=32
        max_length=32 train.batch_size=8 probe.num_batches=2 probe.batch_size=8 probe.max_probes=2
        probe.min_probes=1 probe.head_warmup_steps=2 eva.num_batches=2 eva.batch_size=8 eva.tau=0.5)
fi
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
code=0
# timeout signals the whole process group, so the cell processes stop with the grid.
timeout --kill-after=20 "$LIMIT" python3 -m sadra benchmark --preset gpu --out "$GRID" --glue-dir "$GLUE" \
  --workers "$WORKERS" --quiet model="$MODEL" "${SIZE[@]}" "$@" || code=$?
case $code in
  0) ;;
  1) echo "gpu_grid: some cells failed (see $GRID/failures.jsonl); a rerun retries each once" ;;
  124|137) echo "gpu_grid: stopped at the ${LIMIT} s limit; a rerun continues the grid" ;;
  *) exit "$code" ;;
esac
python3 -m sadra report "$GRID" > /dev/null
python3 - "$GRID" <<'EOF'
import json, sys
from pathlib import Path
folder = Path(sys.argv[1])
grid = json.loads((folder / "benchmark_config.json").read_text())["cells"]
lines = (folder / "results.jsonl").read_text().splitlines() if (folder / "results.jsonl").exists() else []
done = {(r["task"], r["method"], r["seed"]) for r in map(json.loads, lines)}
print(f"gpu_grid: {sum(tuple(c) in done for c in grid)} of {len(grid)} cells have results")
EOF
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  for f in results.jsonl failures.jsonl results.md report.md benchmark_config.json probe_cost.json share.json; do
    [ -f "$GRID/$f" ] && cp "$GRID/$f" "$OUT/"
  done
  runs=$(cd "$GRID" && ls -d */ 2>/dev/null || true)
  # shellcheck disable=SC2086  # the run folders are words
  [ -n "$runs" ] && tar -czf "$OUT/runs.tar.gz" -C "$GRID" --exclude='*.safetensors' --exclude='checkpoints' \
    --exclude='adapter_init' $runs
fi
