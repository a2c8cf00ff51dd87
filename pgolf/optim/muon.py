"""Muon: Nesterov momentum, then the update orthogonalized by a Newton-Schulz iteration (Keller Jordan),
with the records' options: Polar Express coefficients, MuonEq-R row normalization, decoupled weight
decay, and Parallel Muon.

Matrices of the same shape are kept as banks (stacked 3-D views of their gradients and momenta) so
that Newton-Schulz runs batched. With more than one process and `world > 1`, each bank's gradients
are reduce-scattered (mean) so every process owns a shard of the bank, runs momentum and
Newton-Schulz on its shard only, and all-gathers the orthogonalized updates: the same update as
plain Muon on the averaged gradients, for 1/world of the Newton-Schulz work.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

CLASSIC = ((3.4445, -4.7750, 2.0315),)  # one quintic, repeated: pushes singular values towards 1
# Polar Express (Amsel et al. 2025): a minimax-optimal quintic per iteration; the last repeats.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
COEFFS = {"classic": CLASSIC, "polar_express": POLAR_EXPRESS}


def newton_schulz(G: Tensor, steps: int, coeffs: str = "classic", eps: float = 1e-7,
                  dtype: torch.dtype = torch.float32, margin: float = 1.02) -> Tensor:
    """Approximately U V^T for each matrix G = U S V^T in the last two dims, iterated in `dtype`
    (bf16 under bf16 precision, as the records run it on GPU)."""
    table = COEFFS[coeffs]
    X = G.to(dtype)
    # Polar Express's first tuple assumes singular values at most 1 with a little margin (its
    # paper's 1.02; PR #1344's lineage, #1855 included, divides by the norm alone).
    margin = margin if coeffs == "polar_express" else 1.0
    X = X / (X.norm(dim=(-2, -1), keepdim=True) * margin + eps)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return (X.mT if tall else X).to(G.dtype)


def banks_by_shape(params: Iterable[Tensor]) -> list[list[Tensor]]:
    """Group matrices by shape, in first-seen order (the same on every process)."""
    banks: dict[tuple, list[Tensor]] = {}
    for p in params:
        banks.setdefault(tuple(p.shape), []).append(p)
    return list(banks.values())


class Muon(torch.optim.Optimizer):
    """For 2-D weight matrices only; embeddings and scalars belong in Adam.

    In parallel mode (world > 1) call `reduce_grads()` after backward instead of all-reducing these
    gradients yourself; `step()` then updates every process's full copy of the weights.
    """

    def __init__(self, params: Iterable[Tensor], lr: float, momentum: float, ns_steps: int = 5,
                 nesterov: bool = True, ns: str = "classic", row_norm: bool = False,
                 weight_decay: float = 0.0, rank: int = 0, world: int = 1,
                 ns_dtype: torch.dtype = torch.float32, ns_margin: float = 1.02) -> None:
        params = list(params)
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, nesterov=nesterov, ns=ns,
                        row_norm=row_norm, weight_decay=weight_decay, ns_margin=ns_margin)
        super().__init__(params, defaults)
        self.banks = banks_by_shape(params)
        self.rank, self.world, self.ns_dtype = rank, world, ns_dtype
        self.shards: list[Tensor | None] = [None] * len(self.banks)

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def _rows(self, bank: list[Tensor]) -> tuple[int, int]:
        """This process's [start, stop) of the bank, padded so every process gets the same count."""
        per = -(-len(bank) // self.world)
        return self.rank * per, (self.rank + 1) * per

    @torch.no_grad()
    def reduce_grads(self) -> Tensor:
        """Parallel mode: mean-reduce-scatter each bank's gradients; return the local shards' sum of squares."""
        sumsq = torch.zeros((), device=self.banks[0][0].device)
        for i, bank in enumerate(self.banks):
            per = -(-len(bank) // self.world)
            full = torch.zeros(per * self.world, *bank[0].shape, device=bank[0].device, dtype=torch.float32)
            for j, p in enumerate(bank):
                full[j].copy_(p.grad)
            shard = torch.empty_like(full[:per])
            dist.reduce_scatter_tensor(shard, full)
            self.shards[i] = shard.div_(self.world)
            sumsq += shard.square().sum()
        return sumsq

    def scale_grads(self, c: float) -> None:
        for shard in self.shards:
            shard.mul_(c)

    def _local_grads(self, i: int, bank: list[Tensor]) -> Tensor:
        if self.parallel:
            return self.shards[i]
        return torch.stack([p.grad for p in bank]).float()

    @torch.no_grad()
    def step(self) -> None:
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for i, bank in enumerate(self.banks):
            g = self._local_grads(i, bank)
            state = self.state[bank[0]]
            buf = state.setdefault("momentum_bank", torch.zeros_like(g))
            buf.mul_(mom).add_(g)
            u = g.add(buf, alpha=mom) if group["nesterov"] else buf
            if group["row_norm"]:  # MuonEq-R: equalize the rows before orthogonalizing
                u = u / (u.norm(dim=-1, keepdim=True) + 1e-7)
            u = newton_schulz(u, group["ns_steps"], group["ns"], dtype=self.ns_dtype, margin=group["ns_margin"])
            if self.parallel:
                full = torch.empty(u.size(0) * self.world, *u.shape[1:], device=u.device, dtype=u.dtype)
                dist.all_gather_into_tensor(full, u.contiguous())
                u = full
            # Scale so the update's RMS does not shrink for wide-output matrices.
            scale = lr * max(1.0, bank[0].size(0) / bank[0].size(1)) ** 0.5
            for j, p in enumerate(bank):
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(u[j].to(p.dtype), alpha=-scale)

    def _index(self, p: Tensor) -> int:
        """p's key in state_dict()["state"]: its position among the group's parameters."""
        return next(i for i, q in enumerate(self.param_groups[0]["params"]) if q is p)

    def state_dict(self) -> dict:
        """Checkpoints hold each bank's full momentum whatever the process count, so in parallel
        mode every process must call this (the shards are all-gathered)."""
        sd = super().state_dict()
        if not self.parallel:
            return sd
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        for bank in self.banks:
            st = sd["state"].get(self._index(bank[0]))
            if st and "momentum_bank" in st:
                shard = st["momentum_bank"].contiguous()
                full = torch.empty(shard.size(0) * self.world, *shard.shape[1:], device=shard.device)
                dist.all_gather_into_tensor(full, shard)
                st["momentum_bank"] = full[: len(bank)].clone()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if not self.parallel:
            return
        for bank in self.banks:
            st = self.state.get(bank[0])
            if st and "momentum_bank" in st:
                a, b = self._rows(bank)
                full = st["momentum_bank"]
                pad = torch.zeros(max(b - full.size(0), 0), *full.shape[1:], device=full.device)
                st["momentum_bank"] = torch.cat([full, pad])[a:b].clone()
