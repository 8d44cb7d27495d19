"""studies/sst2_lengths.py: the committed SST-2 length figures are what the data files say."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_lengths_match_the_glue_files(glue_dir, tmp_path):
    out = tmp_path / "lengths.json"
    res = subprocess.run([sys.executable, str(ROOT / "studies/sst2_lengths.py"), "--glue-dir", str(glue_dir),
                          "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    fresh = json.loads(out.read_text())
    assert fresh == json.loads((ROOT / "results/sizing/sst2_lengths.json").read_text())
    # The train file is mostly phrases and the dev set whole sentences: the reason for min_train_words.
    assert fresh["train"]["median_words"] < 10 <= fresh["validation"]["median_words"]
    bad = subprocess.run([sys.executable, str(ROOT / "studies/sst2_lengths.py"), "--glue-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
