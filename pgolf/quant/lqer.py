"""LQER (PR #1797, kept by PR #1855): a low-rank correction of the quantization error, stored in the
artifact and added back at dequantization.

For the top_k quantized matrices with the largest ||E||_F, E = W - dequant(Q(W)), the rank-r SVD
E ~= A B (A = U_r S_r, rows x r; B = V_r^T, r x cols) is stored with small integer factors, and
dequantization returns dequant(Q(W)) + A B. The records pick by the plain Frobenius norm, not a
Hessian-weighted error: the matrices that lose most overall are the embedding and the MLP.

Factors, as the record stores them:
- asym (the record's LQER_ASYM): A in int2 codes [-2, 1] with one fp16 scale |A|max / 1.5 for the
  matrix; B in int4 codes [-8, 7] with one fp16 scale |B|max / 7.5 per `group` consecutive values
  of the flattened B. Used when group divides B's size;
- sym otherwise: A and B each in factor_bits-bit codes, one fp16 scale per row, |row|max / qmax.

Stored tensors: <name>.lqer_a, .lqer_a_scale, .lqer_b, .lqer_b_scale (one decoding rule reads both
layouts); the quant meta's "lqer" lists the corrected matrices.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgolf.errors import PgolfError

SUFFIXES = (".lqer_a", ".lqer_a_scale", ".lqer_b", ".lqer_b_scale")


def low_rank(err: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) with A @ B the best rank-`rank` approximation of err (fewer when err is smaller)."""
    u, s, vh = torch.linalg.svd(err.double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).float(), vh[:r].float()


def _fp16_scale(absmax: Tensor, levels: float) -> Tensor:
    return (absmax.clamp_min(1e-10) / levels).half()  # the record's floor: a zero factor stays finite


def pack_asym(a: Tensor, b: Tensor, group: int) -> dict[str, Tensor]:
    """A: int2 with one scale; B: int4 with one scale per `group` values of the flattened B."""
    sa = _fp16_scale(a.abs().amax(), 1.5).reshape(1)
    qa = torch.clamp(torch.round(a / sa.float()), -2, 1)
    bg = b.reshape(-1, group)
    sb = _fp16_scale(bg.abs().amax(dim=1), 7.5)
    qb = torch.clamp(torch.round(bg / sb.float()[:, None]), -8, 7).reshape(b.shape)
    return {"lqer_a": qa.to(torch.int8), "lqer_a_scale": sa, "lqer_b": qb.to(torch.int8), "lqer_b_scale": sb}


def pack_sym(a: Tensor, b: Tensor, bits: int) -> dict[str, Tensor]:
    """A and B each with `bits`-bit codes and one scale per row."""
    q = 2 ** (bits - 1) - 1
    out = {}
    for key, f in (("lqer_a", a), ("lqer_b", b)):
        s = _fp16_scale(f.abs().amax(dim=1), q)
        out[key] = torch.clamp(torch.round(f / s.float()[:, None]), -q, q).to(torch.int8)
        out[f"{key}_scale"] = s
    return out


def correction(tensors: dict[str, Tensor], name: str) -> Tensor:
    """A @ B of matrix `name` from its stored factors. One rule decodes both layouts: A's scale is one
    for the matrix or one per row; B's scales each cover B.numel() / len(scales) consecutive values
    (a group, or a row). PgolfError when the factors do not fit together."""
    qa, sa, qb, sb = (tensors[name + s] for s in SUFFIXES)
    if qa.ndim != 2 or qb.ndim != 2 or qa.size(1) != qb.size(0) or sa.numel() not in (1, qa.size(0)) \
            or sb.numel() == 0 or qb.numel() % sb.numel():
        raise PgolfError(f"tensor {name!r}: LQER factors {tuple(qa.shape)} x {tuple(qb.shape)} with "
                         f"{sa.numel()} and {sb.numel()} scales do not fit together")
    a = qa.float() * sa.float().reshape(-1, 1)
    b = (qb.float().reshape(sb.numel(), -1) * sb.float()[:, None]).reshape(qb.shape)
    return a @ b


def lqer_tensors(errors: dict[str, Tensor], cfg: dict) -> dict[str, Tensor]:
    """The stored factor tensors for the cfg["top_k"] errors of largest Frobenius norm."""
    if cfg["rank"] == 0:
        return {}
    tensors = {}
    for name in sorted(errors, key=lambda n: -float(errors[n].norm()))[: cfg["top_k"]]:
        a, b = low_rank(errors[name], cfg["rank"])
        asym = cfg["asym"] and b.numel() % cfg["group"] == 0
        packed = pack_asym(a, b, cfg["group"]) if asym else pack_sym(a, b, cfg["factor_bits"])
        tensors.update({f"{name}.{k}": v for k, v in packed.items()})
    return tensors


def corrected(tensors: dict[str, Tensor]) -> list[str]:
    """The matrices that carry LQER factors, in file order: the quant meta's "lqer" list."""
    return [k[: -len(SUFFIXES[0])] for k in tensors if k.endswith(SUFFIXES[0])]


def apply_lqer(state: dict[str, Tensor], tensors: dict[str, Tensor], names: list[str]) -> dict[str, Tensor]:
    """The dequantized state with each corrected matrix's A @ B added."""
    if not isinstance(names, list):
        raise PgolfError("the quant meta's 'lqer' entry is not a list")
    for name in names:
        if name not in state:
            raise PgolfError(f"LQER names tensor {name!r}, which the plan does not hold")
        fix = correction(tensors, name)
        if fix.shape != state[name].shape:
            raise PgolfError(f"tensor {name!r}: LQER correction of shape {tuple(fix.shape)} does not fit "
                             f"{tuple(state[name].shape)}")
        state[name] = state[name] + fix
    return state
