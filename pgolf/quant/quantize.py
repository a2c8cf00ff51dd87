"""`pgolf quantize`: EMA weights to a quantized tensor file that carries its own decoding plan."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pgolf import tensorfile
from pgolf.quant.rtn import dequantize_state, quantize_state


def quantize(weights: str | Path, cfg: dict, out: str | Path) -> dict:
    state, meta = tensorfile.load(weights)
    tensors, plan = quantize_state(state, cfg)
    counts = {how: sum(1 for v in plan.values() if v == how) for how in set(plan.values())}
    tensorfile.save(out, tensors, {**meta, "quant": {"method": cfg["method"], "bits": cfg["bits"], "plan": plan}})
    print(f"{out}: {counts}", flush=True)
    return counts


def load_quantized(tensors: dict, meta: dict) -> dict:
    """Float state dict back from a quantized tensor file's contents."""
    if "quant" not in meta:
        raise ValueError("not a quantized tensor file (no 'quant' entry in its header)")
    return dequantize_state(tensors, meta["quant"]["plan"])


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf quantize", description=__doc__)
    ap.add_argument("--weights", required=True)
    ap.add_argument("--cfg", required=True, help="the quant config section as JSON")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    try:
        quantize(args.weights, json.loads(args.cfg), args.out)
    except ValueError as e:
        raise SystemExit(f"pgolf quantize: {e}") from None
