#!/usr/bin/env bash
# Commits a study's results folder each time a cell lands, so a stopped study resumes from git.
# Per new cell: results.md and the report are rewritten with this checkout's code, the selection
# study's decision rule is reapplied (results/selection only), docs/*.md and the README's results block
# are rendered, and only FOLDER, docs/*.md and README.md are committed (other edits are left alone).
# Usage: studies/commit_cells.sh FOLDER [CONFIG]   (runs until killed; checks every minute)
#   CONFIG: the grid's YAML file, whose method order the tables follow (default: the order in which
#   FOLDER/benchmark_config.json lists its cells)
set -uo pipefail
cd "$(dirname "$0")/.."
FOLDER=${1:?usage: studies/commit_cells.sh FOLDER [CONFIG]}
CONFIG=${2:-}
count() { [ -f "$FOLDER/results.jsonl" ] && wc -l < "$FOLDER/results.jsonl" || echo 0; }
last=$(count)
while sleep 60; do
  n=$(count)
  [ "$n" = "$last" ] && continue
  sleep 20   # the benchmark writes the cell's other files just after its record
  # By line number, not tail: more records may have landed during the sleep; the next round names them.
  new=$(sed -n "$((last + 1)),${n}p" "$FOLDER/results.jsonl" | python3 -c '
import json, sys
rows = [json.loads(line) for line in sys.stdin if line.strip()]
print(", ".join("%s seed %s %s (%s %.2f)" % (r["task"], r["seed"], r["method"], r["main_metric"],
                                            100 * r["metrics"][r["main_metric"]]) for r in rows))')
  python3 - "$FOLDER" "$CONFIG" <<'PY'
import json, sys
from pathlib import Path
from sadra.config import load_benchmark_config
from sadra.io import read_jsonl
from sadra.report import write_report
from sadra.results import grid_methods, write_results
out, config_file = Path(sys.argv[1]), sys.argv[2]
grid = json.loads((out / "benchmark_config.json").read_text()) if (out / "benchmark_config.json").exists() else {}
if config_file:
    methods = load_benchmark_config(None, config_file=config_file).methods
else:
    methods = grid_methods(grid) or None
write_results(read_jsonl(out / "results.jsonl"), out, methods=methods, failures=read_jsonl(out / "failures.jsonl"))
write_report(out)
PY
  [ "$FOLDER" = results/selection ] && python3 studies/choose_default.py > /dev/null
  python3 docs/render.py > /dev/null
  git add "$FOLDER" docs/*.md README.md
  git commit -q -m "$(basename "$FOLDER"): $new; results, report and docs regenerated ($n cells)" -- "$FOLDER" docs/*.md README.md \
    && echo "$(date -u +%FT%TZ) committed $n: $new"
  last=$n
done
