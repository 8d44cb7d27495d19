"""Several processes (torchrun / accelerate launch): set-up and agreement checks.

The probe runs on the unwrapped model in every process (DDP has no double backward), each
process on its own share of the calibration rounds; the per-module sums are all-reduced, so
every process computes the same scores and the same allocation. Before the PEFT model is built
the processes compare a hash of their allocation and stop loudly if any differs: different
ranks would give DDP parameters of different shapes.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch

from .errors import SadraError


def world_size_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def maybe_init_distributed() -> bool:
    """Join the process group a launcher set up (gloo on CPU, NCCL on GPUs); True if distributed."""
    if world_size_from_env() <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        from datetime import timedelta

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=collective_timeout()))
    return True


def collective_timeout() -> int:
    """Seconds a process waits in one collective before it fails (``SADRA_DIST_TIMEOUT``, default 1800).

    A process that fails exits, and torchrun then ends the others; this bound covers a peer that
    hangs instead, so no process waits in a collective for ever.
    """
    raw = os.environ.get("SADRA_DIST_TIMEOUT", "1800")
    try:
        value = int(raw)
    except ValueError:
        raise SadraError(f"SADRA_DIST_TIMEOUT={raw!r} is not a whole number of seconds; e.g. SADRA_DIST_TIMEOUT=600") from None
    if value < 1:
        raise SadraError(f"SADRA_DIST_TIMEOUT must be at least 1 second, got {value}")
    return value


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def local_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def check_same_across_processes(obj: Any, what: str) -> str:
    """Hash ``obj`` (JSON) on every process and raise unless all hashes equal rank 0's."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return digest
    mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.int64)
    theirs = mine.clone()
    if dist.get_backend() == "nccl":
        theirs = theirs.cuda()
    dist.broadcast(theirs, src=0)
    same = torch.tensor([int(torch.equal(mine, theirs.cpu()))], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        same = same.cuda()
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    import sys

    print(f"sadra: rank {dist.get_rank()} {what} sha256 {digest}", file=sys.stderr, flush=True)
    if int(same.item()) != 1:
        raise SadraError(
            f"the processes computed different {what} (rank {dist.get_rank()} hash {digest[:12]}); "
            "give every process the same calibration data and seed"
        )
    return digest


def dist_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def all_reduce_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Sum small CPU float64 tensors over processes (moved to the GPU for NCCL)."""
    import torch.distributed as dist

    flat = torch.cat([t.reshape(-1) for t in tensors])
    if dist.get_backend() == "nccl":
        flat = flat.cuda()
    dist.all_reduce(flat)
    flat = flat.cpu()
    out, start = [], 0
    for t in tensors:
        out.append(flat[start:start + t.numel()].reshape(t.shape))
        start += t.numel()
    return out
