"""Process-group setup shared by training and evaluation under torchrun."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from pgolf.errors import PgolfError


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """Rank, world size and device; a process group only when torchrun started several processes."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if device == "cuda" and not torch.cuda.is_available():
        raise PgolfError(f"device: cuda, but this torch ({torch.__version__}) sees no CUDA GPU here; "
                         "set device: cpu (or auto), or install the CUDA build of torch")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, dev


def teardown(world: int) -> None:
    """Leave the process group together: a process that destroys it while another still writes its
    outputs can abort gloo's connection threads ("terminate called without an active exception")."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
