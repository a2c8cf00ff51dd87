"""Per-row symmetric round-to-nearest quantization, the baseline's export.

Each row is clipped at a quantile of its |w| and mapped to integers in [-qmax, qmax], qmax = 2**(bits-1)-1,
stored as int8 codes with one fp16 scale per row.

Which tensors (`storage_for`), checked in this order:
- not floating point: kept as they are ("keep");
- 2-D float with more than min_numel elements: quantized ("rtn");
- control tensors, fp32: every tensor whose name does not end in ".weight". In the model the
  Linear and Embedding matrices are the only `.weight`s; the gains, scales, mixes and skip weights
  (q_gain, attn_scale, mlp_scale, resid_mix, skip_weights) are bare parameters, tiny and sensitive;
- the rest (small matrices): fp16.
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
    codes = torch.clamp(torch.round(w / scale.float()[:, None]), -qmax, qmax).to(torch.int8)
    return codes, scale


def dequantize_rows(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.float() * scale.float()[:, None]


def storage_for(name: str, t: Tensor, min_numel: int) -> str:
    """How a tensor is stored: 'keep', 'rtn', 'fp32' or 'fp16' (the rule is in the module docstring)."""
    if not t.is_floating_point():
        return "keep"
    if t.ndim == 2 and t.numel() > min_numel:
        return "rtn"
    return "fp16" if name.endswith(".weight") else "fp32"


def quantize_state(state: dict[str, Tensor], cfg: dict) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Stored tensors and the plan (tensor name -> storage) that `dequantize_state` needs."""
    tensors, plan = {}, {}
    for name, t in state.items():
        how = plan[name] = storage_for(name, t, cfg["min_numel"])
        if how == "rtn":
            codes, scale = quantize_rows(t, cfg["bits"], cfg["clip_quantile"])
            tensors[f"{name}.codes"], tensors[f"{name}.scale"] = codes, scale
        else:
            tensors[name] = {"fp16": t.half(), "fp32": t.float(), "keep": t}[how]
    return tensors, plan


def dequantize_state(tensors: dict[str, Tensor], plan: dict[str, str]) -> dict[str, Tensor]:
    """Float tensors back (non-float ones as stored)."""
    out = {}
    for name, how in plan.items():
        if how == "rtn":
            out[name] = dequantize_rows(tensors[f"{name}.codes"], tensors[f"{name}.scale"])
        elif how in ("fp16", "fp32"):
            out[name] = tensors[name].float()
        elif how == "keep":
            out[name] = tensors[name]
        else:
            raise ValueError(f"tensor {name!r}: unknown storage {how!r}")
    return out
