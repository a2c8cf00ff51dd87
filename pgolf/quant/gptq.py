"""Full GPTQ (Frantar et al. 2022): quantize a matrix column by column and spread each column's
rounding error over the columns not yet quantized, so that the layer's output on the calibration
activations X moves as little as possible. H = X^T X / n comes from the calibrate stage.

Columns go in order of decreasing H diagonal (act-order), in blocks: inside a block the error is
propagated column by column; the rest of the matrix is updated once per block (lazy batch update).
Dead columns (inputs that are always zero) are zeroed. The per-row scales are fixed beforehand by
the clip (pgolf.quant.clip), so GPTQ only chooses the integer codes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pgolf.errors import PgolfError
from pgolf.quant.clip import qmax, round_codes


def output_error(w: Tensor, w_hat: Tensor, h: Tensor) -> float:
    """Mean ||(w - w_hat) x||^2 over the calibration inputs x, i.e. trace(E H E^T)."""
    e = (w.float() - w_hat.float()).double()
    return float(((e @ h.double()) * e).sum())


def inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper U with H^-1 = U^T U, after adding damp * mean(diag H) to the diagonal.

    Damping is raised tenfold until H is positive definite, so a rank-deficient H (few calibration
    tokens) still works.
    """
    h = h.double()
    eye = torch.eye(h.size(0), dtype=h.dtype, device=h.device)
    mean_diag = float(h.diagonal().mean()) or 1.0
    frac = max(damp, 1e-6)
    for _ in range(8):
        lower, info = torch.linalg.cholesky_ex(h + frac * mean_diag * eye)
        if not int(info):
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True).float()
        frac *= 10
    raise PgolfError("GPTQ: the Hessian is not positive definite even with heavy damping")


def _quantize_block(w: Tensor, u: Tensor, scale: Tensor, q: int) -> tuple[Tensor, Tensor]:
    """Codes and scaled errors of one block w (rows, B), propagating inside it with u = U[block, block]."""
    codes, err = torch.empty_like(w), torch.empty_like(w)
    for j in range(w.size(1)):
        col = w[:, j]
        c = torch.clamp(torch.round(col / scale), -q, q)
        e = (col - c * scale) / u[j, j]
        w[:, j:] -= e[:, None] * u[j, j:][None, :]
        codes[:, j], err[:, j] = c, e
    return codes, err


def gptq_codes(w: Tensor, h: Tensor, scale: Tensor, bits: int, block_size: int = 128,
               damp: float = 0.01, act_order: bool = True) -> Tensor:
    """int8 codes (rows, cols) for w (rows, cols) given H (cols, cols) and fp16 row scales."""
    w, h = w.float().clone(), h.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(w.size(1))
    w, h = w[:, perm], h[perm][:, perm]
    u = inverse_cholesky(h, damp)
    s, q = scale.float(), qmax(bits)
    codes = torch.empty_like(w)
    for i1 in range(0, w.size(1), block_size):
        i2 = min(i1 + block_size, w.size(1))
        codes[:, i1:i2], err = _quantize_block(w[:, i1:i2].clone(), u[i1:i2, i1:i2], s, q)
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return codes[:, torch.argsort(perm)].to(torch.int8)


def gptq_matrix(w: Tensor, scale: Tensor, bits: int, hessian: Tensor | None, cfg: dict) -> Tensor:
    """The METHODS entry: GPTQ when the matrix has a Hessian, plain rounding when it has none."""
    if hessian is None:
        return round_codes(w, scale, bits)
    if hessian.shape != (w.size(1), w.size(1)):
        raise PgolfError(f"Hessian of shape {tuple(hessian.shape)} does not fit a matrix of {w.size(1)} columns")
    return gptq_codes(w, hessian, scale, bits, cfg["block_size"], cfg["damp"], cfg["act_order"])
