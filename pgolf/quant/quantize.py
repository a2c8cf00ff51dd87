"""`pgolf quantize`: EMA weights (and, for GPTQ, the calibration Hessians) to a quantized tensor file
that carries its own decoding plan.

The output's meta is the input's model meta plus `quant`: the method, the clip, the plan (per
tensor how it is stored: "int": `<name>.codes` int8 + `<name>.scale` fp16; "fp16"; "fp32"; "keep")
and the bits of each "int" tensor, so reading it back and packing it need no config.

Matrices fall into groups by name (`group_of`), each with its own bits, clip and SDClip factor.
With quant.magnitude_prune, each large matrix first loses its smallest |w| (PR #461's stack).
Matrices named by quant.int8_rows (PR #1855: the sparse attention gate, [attn_gate]) are stored as
int8 codes with one absmax scale per row whatever their size: half of fp16's bytes, with no clip.
With quant.lqer.rank > 0, the matrices of largest quantization error carry a low-rank correction
(pgolf.quant.lqer), listed in the meta's "lqer" and added back by `dequantize`.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from pgolf.errors import PgolfError
from pgolf.formats import tensorfile
from pgolf.quant.clip import quantile_scale, round_codes, row_scales
from pgolf.quant.gptq import gptq_matrix, output_error
from pgolf.quant.lqer import apply_lqer, corrected, lqer_tensors
from pgolf.quant.rtn import (
    dequantize_rows,
    dequantize_state,
    is_large_matrix,
    magnitude_prune,
    rtn_matrix,
    storage_for,
    store_plain,
)

# method -> (w, fp16 row scales, bits, Hessian or None, quant config) -> int8 codes.
METHODS: dict[str, Callable[[Tensor, Tensor, int, Tensor | None, dict], Tensor]] = {
    "rtn": rtn_matrix,
    "gptq": gptq_matrix,
}
NEEDS_HESSIANS = {"gptq"}
GROUPS = ("embed", "attn", "mlp", "other")


def group_of(name: str) -> str:
    """embed (a module named *emb*: the tied embedding), attn, mlp or other."""
    parts = name.split(".")[:-1]
    if any("emb" in p for p in parts):
        return "embed"
    return next((g for g in ("attn", "mlp") if g in parts), "other")


def int8_row_codes(name: str, t: Tensor, patterns: list[str]) -> tuple[Tensor, Tensor] | None:
    """int8 codes and absmax row scales when a quant.int8_rows pattern names the tensor, else None."""
    hit = next((p for p in patterns if p in name), None)
    if hit is None or not t.is_floating_point():
        return None
    if t.ndim != 2:
        raise PgolfError(f"quant.int8_rows: pattern {hit!r} names tensor {name!r} of shape {tuple(t.shape)}, "
                         "not a matrix")
    scale = quantile_scale(t, 8, 1.0)
    return round_codes(t, scale, 8), scale


def quantize_state(state: dict[str, Tensor], cfg: dict, hessians: dict[str, Tensor] | None = None,
                   ) -> tuple[dict[str, Tensor], dict[str, str], dict[str, int], dict[str, float]]:
    """(stored tensors, LQER factors included; plan, bits per int tensor, output error per Hessian-backed
    int tensor)."""
    if cfg["method"] not in METHODS:
        raise PgolfError(f"quant.method: unknown method {cfg['method']!r}; known: {', '.join(METHODS)}")
    hessians = hessians or {}
    tensors, plan, bits, errors, residuals = {}, {}, {}, {}, {}
    for name, t in state.items():
        rows = int8_row_codes(name, t, cfg["int8_rows"]) if cfg["int8_rows"] else None
        if rows is not None:
            plan[name], bits[name] = "int", 8
            tensors[f"{name}.codes"], tensors[f"{name}.scale"] = rows
            continue
        if cfg["magnitude_prune"] and is_large_matrix(name, t, cfg["min_numel"]):
            t = magnitude_prune(t, cfg["magnitude_prune"])
        how = plan[name] = storage_for(name, t, cfg["min_numel"], cfg["control_dtype"], tuple(cfg["keep_fp16"]))
        if how != "int":
            tensors[name] = store_plain(t, how)
            continue
        b = bits[name] = cfg["bits"][group_of(name)]
        h = hessians.get(name)
        scale = row_scales(t, b, cfg, group_of(name), None if h is None else h.diagonal())
        try:
            codes = METHODS[cfg["method"]](t, scale, b, h, cfg)
        except ValueError as e:
            raise PgolfError(f"tensor {name!r}: {e}") from None
        tensors[f"{name}.codes"], tensors[f"{name}.scale"] = codes, scale
        if cfg["lqer"]["rank"]:
            residuals[name] = t.float() - dequantize_rows(codes, scale)
        if h is not None:
            errors[name] = output_error(t, dequantize_rows(codes, scale), h) / (output_error(t, 0 * t, h) or 1.0)
    if cfg["lqer"]["rank"]:
        tensors.update(lqer_tensors(residuals, cfg["lqer"]))
    return tensors, plan, bits, errors


def _load_hessians(path: str | Path | None, method: str) -> dict[str, Tensor] | None:
    if path is None:
        if method in NEEDS_HESSIANS:
            raise PgolfError(f"quant.method {method!r} needs the calibrate stage's Hessians (--hessians)")
        return None
    return tensorfile.load(path)[0]


def quantize(weights: str | Path, cfg: dict, out: str | Path, hessians: str | Path | None = None) -> dict[str, int]:
    """Write the quantized tensor file; return how many tensors went to each storage."""
    t0 = time.perf_counter()
    state, meta = tensorfile.load(weights)
    tensors, plan, bits, errors = quantize_state(state, cfg, _load_hessians(hessians, cfg["method"]))
    bad = tensorfile.first_nonfinite(tensors)
    if bad is not None:  # finite float32 weights can still overflow a float16 scale
        raise PgolfError(f"{weights}: quantized tensor {bad!r} holds NaN/Inf (weights too large for float16 "
                         "scales); nothing written")
    quant_meta = {"method": cfg["method"], "clip": cfg["clip"], "plan": plan, "bits": bits}
    lqer = corrected(tensors) if cfg["lqer"]["rank"] else []
    if lqer:  # absent when off, so files without corrections keep their bytes
        quant_meta["lqer"] = lqer
    tensorfile.save(out, tensors, {**meta, "quant": quant_meta})
    for name, err in errors.items():
        print(f"{name}: int{bits[name]}, relative output error {err:.3e}", flush=True)
    for name in lqer:
        print(f"{name}: LQER rank {cfg['lqer']['rank']} correction", flush=True)
    counts = dict(Counter(plan.values()))
    print(f"{out}: {len(plan)} tensors, storage {counts}, {cfg['method']} with {cfg['clip']} clip, "
          f"{time.perf_counter() - t0:.1f}s", flush=True)
    return counts


def dequantize(source: str | Path | dict[str, Tensor],
               meta: dict | None = None) -> tuple[dict[str, Tensor], dict]:
    """(float state dict, model meta) from a quantized tensor file's path or its loaded contents."""
    if meta is None:
        source, meta = tensorfile.load(source)
    if "quant" not in meta:
        raise PgolfError("not a quantized tensor file (no 'quant' entry in its header)")
    try:
        state = dequantize_state(source, meta["quant"]["plan"])
        if "lqer" in meta["quant"]:  # only files with corrections: the packed code of a run without LQER has none
            state = apply_lqer(state, source, meta["quant"]["lqer"])
    except KeyError as e:
        raise PgolfError(f"quantized tensor file lacks tensor {e}") from None
    return state, {k: v for k, v in meta.items() if k != "quant"}


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf quantize", description=__doc__)
    ap.add_argument("--weights", required=True, help="EMA weights (tensor file)")
    ap.add_argument("--hessians", help="the calibrate stage's Hessians (tensor file); GPTQ needs them")
    ap.add_argument("--cfg", required=True, help="the quant config section as JSON")
    ap.add_argument("--out", required=True, help="quantized tensor file to write")
    args = ap.parse_args(argv)
    quantize(args.weights, json.loads(args.cfg), args.out, args.hessians)
