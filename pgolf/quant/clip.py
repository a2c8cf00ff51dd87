"""Per-row clip ranges, turned into the fp16 scale of each row's integer codes.

- sdclip: clip = k * std(row) (PR #1394). The code entropy is about b - log2(k) + const, so k
  trades the rounding error against compressed bytes; PR #1517 cut the quant gap from 0.043 to
  0.024 BPB by moving k from 12.85 to 9.5.
- search: the candidate quantile of |w| whose rounding error is least (PR #1019 searched the same
  candidates): per row, weighted by the Hessian diagonal when there is one (clip_scope row); or
  one quantile for the whole matrix by the unweighted mean squared error (clip_scope matrix, the
  records' GPTQ-lite).
- quantile: one quantile of |w| for every row (the baseline's export; the records' int8 tensors).

Each group (embed, attn, mlp, other) may name its own clip. A row's scale is at least
clip_floor / qmax: the records clamp at 1/31 for int6 and 1/127 for int8 (clip_floor 1.0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgolf.errors import PgolfError


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def to_scale(clip: Tensor, bits: int, floor: float = 0.0) -> Tensor:
    """fp16 scale of a clip range, at least floor / qmax (clamped in float32 before the cast, as the
    records do). Clamp after the cast too: 1e-12 would round to 0 in fp16 and a zero row would
    divide by zero."""
    return (clip / qmax(bits)).clamp_min(floor / qmax(bits)).half().clamp_min(2.0**-24)


def round_codes(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    """int8 codes in [-qmax, qmax] with w ~= codes * scale[:, None]."""
    q = qmax(bits)
    return torch.clamp(torch.round(w.float() / scale.float()[:, None]), -q, q).to(torch.int8)


def row_quantile(absw: Tensor, q: float) -> Tensor:
    """Per-row quantile with linear interpolation; sorts, so it has no size limit (torch.quantile has)."""
    if q >= 1:
        return absw.amax(dim=1)
    s = absw.sort(dim=1).values
    pos = q * (s.size(1) - 1)
    lo = int(pos)
    hi = min(lo + 1, s.size(1) - 1)
    return s[:, lo] + (pos - lo) * (s[:, hi] - s[:, lo])


def sdclip_scale(w: Tensor, bits: int, k: float, floor: float = 0.0) -> Tensor:
    return to_scale(k * w.float().std(dim=1, correction=0), bits, floor)


def quantile_scale(w: Tensor, bits: int, q: float, floor: float = 0.0) -> Tensor:
    return to_scale(row_quantile(w.float().abs(), q), bits, floor)


def _rounding_error(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    return (w - round_codes(w, scale, bits).float() * scale.float()[:, None]).square()


def search_scale(w: Tensor, bits: int, candidates: list[float], weight: Tensor | None = None,
                 floor: float = 0.0) -> Tensor:
    """For each row, the candidate quantile's scale with the least sum of weight * (w - dequant)^2."""
    w = w.float()
    weight = torch.ones(w.size(1)) if weight is None else weight.float().clamp_min(0)
    best, best_err = None, None
    for q in candidates:
        scale = quantile_scale(w, bits, q, floor)
        err = (_rounding_error(w, scale, bits) * weight).sum(1)
        if best is None:
            best, best_err = scale, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, scale, best), torch.where(better, err, best_err)
    return best


def matrix_search_scale(w: Tensor, bits: int, candidates: list[float], floor: float = 0.0) -> Tensor:
    """The scales of the one candidate quantile (per-row quantiles of |w|) with the least mean squared
    error over the whole matrix; the first such on a tie (PRs #549, #1334)."""
    w = w.float()
    best, best_err = None, float("inf")
    for q in candidates:
        scale = quantile_scale(w, bits, q, floor)
        err = float(_rounding_error(w, scale, bits).mean())
        if err < best_err:
            best, best_err = scale, err
    return best


def clip_of(cfg: dict, group: str) -> str:
    """The clip a group uses: quant.clip names one for all, or one per group."""
    return cfg["clip"] if isinstance(cfg["clip"], str) else cfg["clip"][group]


def row_scales(w: Tensor, bits: int, cfg: dict, group: str, hdiag: Tensor | None = None) -> Tensor:
    """fp16 scale per row of w for the clip that cfg["clip"] names for `group`."""
    clip, floor = clip_of(cfg, group), cfg["clip_floor"]
    if clip == "sdclip":
        return sdclip_scale(w, bits, cfg["clip_k"][group], floor)
    if clip == "search" and cfg["clip_scope"] == "matrix":
        return matrix_search_scale(w, bits, cfg["clip_search"], floor)
    if clip == "search":
        return search_scale(w, bits, cfg["clip_search"], hdiag, floor)
    if clip == "quantile":
        return quantile_scale(w, bits, cfg["clip_quantile"], floor)
    raise PgolfError(f"quant.clip: unknown clip {clip!r}; known: sdclip, search, quantile")
