"""Run under torchrun: probe MiniLM on fixed MRPC batches; rank 0 writes the pooled reports as JSON."""

import json
import sys

import torch.distributed as dist

from sadra.data import calibration_batches, load_glue
from sadra.distributed import maybe_init_distributed
from sadra.models import load_model
from sadra.probe import estimate_sensitivity


def reports(glue_dir):
    model, tokenizer = load_model("minilm", 2, seed=0)
    rows = load_glue("mrpc", "train", glue_dir)
    batches = calibration_batches(rows, tokenizer, num_batches=2, batch_size=4, max_length=32, seed=0)
    fisher = estimate_sensitivity(model, batches, estimator="fisher", max_probes=4, rtol=0, seed=1)
    hutch = estimate_sensitivity(model, batches, estimator="hutchinson", mode="joint", max_probes=4, rtol=0, seed=2)
    return {"fisher": fisher.to_dict(), "hutchinson": hutch.to_dict()}


if __name__ == "__main__":
    glue_dir, out = sys.argv[1], sys.argv[2]
    distributed = maybe_init_distributed()
    result = reports(glue_dir)
    if not distributed or dist.get_rank() == 0:
        with open(out, "w") as fh:
            json.dump(result, fh)
    if distributed:
        dist.destroy_process_group()
