"""Per-row symmetric round-to-nearest, the baseline's export, and the storage rule every method shares.

Each row is clipped and mapped to integers in [-qmax, qmax], qmax = 2**(bits-1)-1, stored as int8
codes with one fp16 scale per row ("int" storage: `<name>.codes` + `<name>.scale`).

Which tensors (`storage_for`), checked in this order:
- not floating point: kept as they are ("keep");
- a name that contains one of quant.keep_fp16's patterns: fp16 (PR #461's stack keeps tok_emb so);
- 2-D float with more than min_numel elements: integer codes ("int");
- control tensors, in quant.control_dtype (fp32, or fp16 as the records store every small tensor):
  every tensor whose name does not end in ".weight". In the model the Linear and Embedding
  matrices are the only `.weight`s; the gains, scales, mixes and skip weights (q_gain, attn_scale,
  mlp_scale, resid_mix, skip_weights) are bare parameters, tiny and sensitive;
- the rest (small matrices): fp16.
"""

from __future__ import annotations

from torch import Tensor

from pgolf.errors import PgolfError
from pgolf.quant.clip import quantile_scale, round_codes, row_quantile


def quantize_rows(w: Tensor, bits: int, clip_quantile: float) -> tuple[Tensor, Tensor]:
    """int8 codes and fp16 per-row scales with w ~= codes * scale[:, None], clipped at a quantile of |w|."""
    scale = quantile_scale(w, bits, clip_quantile)
    return round_codes(w, scale, bits), scale


def rtn_matrix(w: Tensor, scale: Tensor, bits: int, hessian: Tensor | None, cfg: dict) -> Tensor:
    """The METHODS entry: plain rounding; the Hessian is not used."""
    return round_codes(w, scale, bits)


def dequantize_rows(codes: Tensor, scale: Tensor) -> Tensor:
    return codes.float() * scale.float()[:, None]


def storage_for(name: str, t: Tensor, min_numel: int, control: str = "fp32", keep_fp16: tuple[str, ...] = ()) -> str:
    """How a tensor is stored: 'keep', 'int', 'fp32' or 'fp16' (the rule is in the module docstring)."""
    if not t.is_floating_point():
        return "keep"
    if any(p in name for p in keep_fp16):
        return "fp16"
    if is_large_matrix(name, t, min_numel):  # control tensors stay float
        return "int"
    return "fp16" if name.endswith(".weight") else control


def is_large_matrix(name: str, t: Tensor, min_numel: int) -> bool:
    """A Linear or Embedding matrix of more than min_numel elements (a float .weight)."""
    return t.is_floating_point() and t.ndim == 2 and t.numel() > min_numel and name.endswith(".weight")


def store_plain(t: Tensor, how: str) -> Tensor:
    return {"fp16": t.half(), "fp32": t.float(), "keep": t}[how]


def dequantize_state(tensors: dict[str, Tensor], plan: dict[str, str]) -> dict[str, Tensor]:
    """Float tensors back (non-float ones as stored)."""
    out = {}
    for name, how in plan.items():
        if how == "int":
            out[name] = dequantize_rows(tensors[f"{name}.codes"], tensors[f"{name}.scale"])
        elif how in ("fp16", "fp32"):
            out[name] = tensors[name].float()
        elif how == "keep":
            out[name] = tensors[name]
        else:
            raise PgolfError(f"tensor {name!r}: unknown storage {how!r}")
    return out


def magnitude_prune(w: Tensor, fraction: float) -> Tensor:
    """w with every |w| below the `fraction` quantile of the matrix's |w| zeroed (PR #461's stack prunes
    3% so before quantizing: zeros compress well)."""
    threshold = row_quantile(w.float().abs().flatten()[None], fraction)[0]
    return w.masked_fill(w.abs() < threshold, 0.0)
