"""Why SST-2 trains on whole sentences: its train file is mostly phrases, its dev set whole sentences.

Writes results/sizing/sst2_lengths.json: for the train and dev files, the rows, the median words per
row and the share of rows with at least ``--min-words`` words (the evidence preset's
``min_train_words``). Reads the texts only, never a label.

  python studies/sst2_lengths.py --glue-dir ../shared/glue
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from sadra.data import load_glue
from sadra.errors import SadraError

ROOT = Path(__file__).resolve().parents[1]


def lengths(glue_dir: str, min_words: int) -> dict:
    out = {"min_words": min_words}
    for split in ("train", "validation"):
        words = np.array([len(e.text_a.split()) for e in load_glue("sst2", split, glue_dir)])
        out[split] = {"rows": int(words.size), "median_words": float(np.median(words)),
                      "share_at_least_min_words": float(np.mean(words >= min_words)),
                      "rows_at_least_min_words": int(np.sum(words >= min_words))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue-dir", required=True, help="the local GLUE folder")
    parser.add_argument("--min-words", type=int, default=10, help="the word count to share out (default: 10)")
    parser.add_argument("--out", default=str(ROOT / "results/sizing/sst2_lengths.json"), help="the JSON to write")
    args = parser.parse_args(argv)
    try:
        result = lengths(args.glue_dir, args.min_words)
    except SadraError as exc:
        print(f"sst2_lengths: {exc}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
