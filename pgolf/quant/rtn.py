"""Per-row symmetric round-to-nearest quantization, the baseline's export.

Each row is clipped at a quantile of its |w| and mapped to integers in [-qmax, qmax] with one fp16
scale per row. Smaller matrices pass through as fp16; vectors and scalars (gains, scales, mixes) stay
fp32 because they are tiny and every bit of them matters.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_rows(w: Tensor, bits: int, clip_quantile: float) -> tuple[Tensor, Tensor]:
    """int8 codes and fp16 per-row scales with w ~= codes * scale[:, None]."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    absw = w.abs()
    clip = torch.quantile(absw, clip_quantile, dim=1) if clip_quantile < 1 else absw.amax(dim=1)
    # Clamp after the cast: 1e-12 would round to 0 in fp16 and a zero row would divide by zero.
    scale = (clip / qmax).half().clamp_min(2.0**-24)
    s = scale.float()[:, None]
    codes = torch.clamp(torch.round(w / s), -qmax, qmax).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.float() * scale.float()[:, None]


def storage_for(name: str, t: Tensor, min_numel: int) -> str:
    """How a tensor is stored: 'rtn' (quantized), 'fp16' or 'fp32' (control tensors)."""
    if t.is_floating_point() and t.ndim == 2 and t.numel() > min_numel:
        return "rtn"
    return "fp16" if t.ndim == 2 else "fp32"


def quantize_state(state: dict[str, Tensor], cfg: dict) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors, plan = {}, {}
    for name, t in state.items():
        plan[name] = storage_for(name, t, cfg["min_numel"])
        if plan[name] == "rtn":
            tensors[f"{name}.codes"], tensors[f"{name}.scale"] = quantize_rows(t, cfg["bits"], cfg["clip_quantile"])
        else:
            tensors[name] = t.half() if plan[name] == "fp16" else t.float()
    return tensors, plan


def dequantize_state(tensors: dict[str, Tensor], plan: dict[str, str]) -> dict[str, Tensor]:
    out = {}
    for name, how in plan.items():
        if how == "rtn":
            out[name] = dequantize_rows(tensors[f"{name}.codes"], tensors[f"{name}.scale"])
        else:
            out[name] = tensors[name].float()
    return out
