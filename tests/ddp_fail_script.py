"""Run under torchrun: rank 1 fails with a SADRA error while rank 0 waits in a collective."""

import sys

import torch

from sadra.distributed import all_reduce_sum, dist_world, maybe_init_distributed
from sadra.errors import DataError

if __name__ == "__main__":
    maybe_init_distributed()
    _, rank = dist_world()
    if rank == 1 and sys.argv[1] == "raise":
        raise DataError("rank 1 cannot read its calibration rows")
    if rank == 1:  # hang: never reach the collective
        import time

        time.sleep(600)
    all_reduce_sum(torch.ones(3, dtype=torch.float64))
    print("collective finished", flush=True)
