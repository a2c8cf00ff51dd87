"""Muon: momentum, then the update orthogonalized by a Newton-Schulz iteration (Keller Jordan)."""

from __future__ import annotations

import torch
from torch import Tensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic iteration that pushes singular values towards 1


def newton_schulz(G: Tensor, steps: int, eps: float = 1e-7) -> Tensor:
    """Approximately U V^T for G = U S V^T. bf16 on CUDA (fast, precise enough); fp32 on CPU."""
    a, b, c = NS_COEFFS
    X = G.bfloat16() if G.is_cuda else G.float()
    X = X / (X.norm() + eps)
    tall = G.size(0) > G.size(1)
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return (X.T if tall else X).to(G.dtype)


class Muon(torch.optim.Optimizer):
    """For 2-D weight matrices only; embeddings and scalars belong in Adam."""

    def __init__(self, params, lr: float, momentum: float, ns_steps: int = 5, nesterov: bool = True) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, ns_steps=ns_steps, nesterov=nesterov))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.mul_(group["momentum"]).add_(p.grad)
                g = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                g = newton_schulz(g, group["ns_steps"])
                # Scale so the update's RMS does not shrink for wide-output matrices.
                p.add_(g, alpha=-group["lr"] * max(1.0, p.size(0) / p.size(1)) ** 0.5)
