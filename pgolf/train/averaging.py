"""Weight averages that training exports: the EMA, and tight SWA over the last, low-LR steps."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    """fp32 exponential moving average of the weights, updated every step.

    With `warmup` the decay is capped by (1 + step) / (10 + step) so that the random init does not
    dominate short runs; PR #1855 keeps the fixed decay from the first step.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.float(), 1 - d)


class SWA:
    """Uniform average of weight snapshots taken every `every` steps once the LR scale is below
    `below`. When it has snapshots it is what training exports (PR #549 computed it and dropped it)."""

    def __init__(self, every: int, below: float) -> None:
        self.every, self.below = every, below
        self.sum: dict[str, Tensor] = {}
        self.count = 0

    @torch.no_grad()
    def maybe_add(self, model: nn.Module, step: int, lr_scale: float) -> None:
        if lr_scale >= self.below or step % self.every:
            return
        for k, v in model.state_dict().items():
            if k in self.sum:
                self.sum[k] += v.float()
            else:
                self.sum[k] = v.detach().float().clone()
        self.count += 1

    def average(self) -> dict[str, Tensor]:
        return {k: v / self.count for k, v in self.sum.items()}

    def state(self) -> dict:
        return {"sum": self.sum, "count": self.count}

    def load_state(self, state: dict) -> None:
        self.sum, self.count = state["sum"], state["count"]
