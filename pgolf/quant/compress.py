"""`pgolf compress`: quantized tensors into the artifact, pruned to the budget when compress.prune is on.

Code bytes (pgolf.pipeline.bundle's packed file) are counted by `pgolf size` (pgolf/quant/size.py), its own
stage, so that editing code reruns only the size check, not compression and evaluation. With
pruning on, compress aims at the budget minus compress.code_reserve, a fixed allowance for the code
(40,000 bytes; each preset's packed code is 26 to 32 KB, docs/bytes.md), not its exact size: then too a
code edit reruns only the size check, which counts the real total.

Pruning (PRs #1019/#1334's selective +-1 pruning): zeroing a +-1 code of row r, column c moves its
weight by the row's scale s_r, which adds s_r^2 * H_cc to the layer's output error (H = X^T X / n
from the calibrate stage; s_r^2 alone when there are no Hessians, as in the records), and makes the
codes more compressible. Codes are zeroed from the smallest error up; a search that interpolates
between the sizes it has seen (_search) finds the fewest that fit, to within SEARCH_TOLERANCE of
the target.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pgolf.errors import PgolfError
from pgolf.formats import tensorfile
from pgolf.formats.container import read_file
from pgolf.formats.io import write_bytes
from pgolf.quant.artifact import encode

# The search stops at a fitting size this close below its target (a fraction of it): 1,600 bytes of
# a 16 MB artifact. Sizes are not monotone to the byte (one more pruned code moved a 300 KB brotli
# artifact by up to 270 bytes), so a tighter stop buys nothing.
SEARCH_TOLERANCE = 1e-4


class BudgetError(PgolfError):
    """Code plus model bytes over the challenge's cap."""


class Candidates:
    """Every +-1 code, smallest error first (s_r^2 * H_cc, or s_r^2 without a Hessian): codes tensor
    index and flat position."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict,
                 hessians: dict[str, torch.Tensor] | None = None) -> None:
        plan = meta.get("quant", {}).get("plan", {})
        self.keys = [f"{n}.codes" for n, how in plan.items() if how == "int"]
        none = torch.zeros(0, dtype=torch.long)
        impacts, owners, flats = [torch.zeros(0)], [none], [none]
        for i, key in enumerate(self.keys):
            codes, scale = tensors[key], tensors[key[: -len("codes")] + "scale"].float()
            flat = torch.nonzero(codes.flatten().abs() == 1).squeeze(1)
            impacts.append(_impact(scale, codes.shape, (hessians or {}).get(key[: -len(".codes")]))[flat])
            owners.append(torch.full_like(flat, i))
            flats.append(flat)
        order = torch.argsort(torch.cat(impacts), stable=True)
        self.owner, self.flat = torch.cat(owners)[order], torch.cat(flats)[order]

    def __len__(self) -> int:
        return len(self.flat)

    def pruned(self, tensors: dict[str, torch.Tensor], meta: dict, n: int) -> bytes:
        """The tensor file with the first n candidates zeroed."""
        out = dict(tensors)
        owner, flat = self.owner[:n], self.flat[:n]
        for i, key in enumerate(self.keys):
            codes = out[key].clone()
            codes.view(-1)[flat[owner == i]] = 0
            out[key] = codes
        return tensorfile.dumps(out, meta)


def _impact(scale: torch.Tensor, shape: torch.Size, hessian: torch.Tensor | None) -> torch.Tensor:
    """Added output error of zeroing a +-1 code, flat over the matrix: s_r^2 * H_cc (s_r^2 without H)."""
    rows, cols = shape
    col = torch.ones(cols) if hessian is None else hessian.diagonal().float().clamp_min(0)
    if col.numel() != cols:
        raise PgolfError(f"Hessian of shape {tuple(hessian.shape)} does not fit a matrix of {cols} columns")
    return (scale.square()[:, None] * col[None, :]).flatten()


def _search(size_of: Callable[[int], int], lo: int, hi: int, size_lo: int, size_hi: int, target: int) -> int:
    """The smallest n in (lo, hi] with size_of(n) <= target, or a fitting n whose size is within
    SEARCH_TOLERANCE * target of it (size_of(lo) = size_lo is over, size_of(hi) = size_hi fits).

    Regula falsi with the Illinois fix: sizes fall smoothly (if not linearly) with n, so each guess
    interpolates between the bracket's sizes, and an end kept twice has its size pulled halfway to
    the aim so the guesses cannot creep from one side. A bisection replaces a guess whenever the
    bracket has not halved in three steps. On the default model: 4-15 encodes, where bisection
    takes 17."""
    tolerance, kept, widths = int(SEARCH_TOLERANCE * target), 0, []
    aim = target - tolerance // 2  # inside the tolerance band, not at its edge
    while hi - lo > 1 and size_hi < target - tolerance:
        stalled = len(widths) >= 3 and hi - lo > widths[-3] / 2
        mid = (lo + hi) // 2
        if not stalled and size_lo > size_hi:
            mid = lo + round((hi - lo) * (size_lo - aim) / (size_lo - size_hi))
        widths.append(hi - lo)
        mid = min(max(mid, lo + 1), hi - 1)
        size = size_of(mid)
        if size <= target:
            hi, size_hi = mid, size
            size_lo = aim + (size_lo - aim) / 2 if kept == -1 else size_lo
            kept = -1  # lo kept
        else:
            lo, size_lo = mid, size
            size_hi = aim - (aim - size_hi) / 2 if kept == 1 else size_hi
            kept = 1  # hi kept
    return hi


def prune_to_fit(raw: bytes, cfg: dict, target: int, source: str = "quantized tensors",
                 hessians: dict[str, torch.Tensor] | None = None) -> tuple[bytes, int]:
    """(artifact, codes pruned): the fewest +-1 codes zeroed (see _search) so the artifact is at most
    `target` bytes. `raw` is the tensor file read from `source`; `hessians` weight the errors."""
    orders: dict = {}  # pergroup's row orders: sorted once, on the unpruned codes
    data = encode(raw, cfg, source=source, orders=orders)
    if len(data) <= target:
        return data, 0
    tensors, meta = tensorfile.loads(raw, source)
    cands = Candidates(tensors, meta, hessians)
    encoded = {0: data}

    def size_of(n: int) -> int:
        encoded[n] = encode(cands.pruned(tensors, meta, n), cfg, n, orders=orders)
        return len(encoded[n])

    smallest = size_of(len(cands))
    if smallest > target:
        raise BudgetError(f"pruning all {len(cands):,} +-1 codes still leaves {smallest - target:,} bytes "
                          f"over the {target:,}-byte target")
    n = _search(size_of, 0, len(cands), len(data), smallest, target)
    return encoded[n], n


def compress(quant: str | Path, cfg: dict, out: str | Path, hessians: str | Path | None = None) -> int:
    """Write the artifact; with cfg["prune"], pruned to budget_bytes - code_reserve bytes, the +-1
    codes' errors weighted by the calibrate stage's `hessians` when given."""
    t0 = time.perf_counter()
    raw = read_file(quant, tensorfile.TensorFileError)
    if cfg["prune"]:
        target = cfg["budget_bytes"] - cfg["code_reserve"]
        h = tensorfile.load(hessians)[0] if hessians is not None else None
        data, n = prune_to_fit(raw, cfg, target, str(quant), h)
    else:
        data, n = encode(raw, cfg, source=str(quant)), 0
    write_bytes(out, data)
    print(f"{out}: {len(raw):,} -> {len(data):,} bytes ({cfg['codec']} level {cfg['level']}, "
          f"pack {cfg['pack']}, shuffle {cfg['shuffle']}, {n:,} codes pruned) "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return len(data)


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf compress", description=__doc__)
    ap.add_argument("--quant", required=True, help="quantized tensor file")
    ap.add_argument("--cfg", required=True, help="the compress config section as JSON")
    ap.add_argument("--hessians", help="the calibrate stage's Hessians, to weight pruning errors (optional)")
    ap.add_argument("--out", required=True, help="artifact to write")
    args = ap.parse_args(argv)
    compress(args.quant, json.loads(args.cfg), args.out, args.hessians)
