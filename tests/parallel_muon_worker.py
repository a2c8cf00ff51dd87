"""Run by test_switches under torchrun: Parallel Muon steps on fixed per-rank gradients."""

import sys

import torch
import torch.distributed as dist

from pgolf.optim.muon import Muon
from pgolf.runtime.distributed import teardown

SHAPES = [(8, 4), (8, 4), (8, 4), (4, 8), (6, 6)]  # a bank of 3 (padded over 2 ranks), 1 and 1
STEPS = 3


def params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def grads(rank: int, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randn(s, generator=g) for s in SHAPES]


OPTIONS = dict(lr=0.05, momentum=0.9, ns_steps=5, ns="polar_express", row_norm=True, weight_decay=0.1)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ps = params()
    opt = Muon(ps, rank=rank, world=world, **OPTIONS)
    for step in range(STEPS):
        for p, g in zip(ps, grads(rank, step), strict=True):
            p.grad = g
        opt.reduce_grads()
        opt.step()
    state = opt.state_dict()
    if rank == 0:
        torch.save({"params": [p.detach() for p in ps], "state": state}, out)
    teardown(world)


if __name__ == "__main__":
    main(sys.argv[1])
