"""`pgolf quantize`: EMA weights to a quantized tensor file that carries its own decoding plan.

The output's meta is the input's model meta plus `quant`: the method, its bits and the plan, which
says per tensor how it is stored ("rtn": `<name>.codes` int8 + `<name>.scale` fp16; "fp16"; "fp32";
"keep"), so reading it back needs no config.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from torch import Tensor

from pgolf import tensorfile
from pgolf.quant import rtn

# method -> (state dict, quant config) -> (stored tensors, plan); GPTQ and others register here.
METHODS = {"rtn": rtn.quantize_state}


def quantize(weights: str | Path, cfg: dict, out: str | Path) -> dict[str, int]:
    """Write the quantized tensor file; return how many tensors went to each storage."""
    state, meta = tensorfile.load(weights)
    if cfg["method"] not in METHODS:
        raise ValueError(f"quant.method: unknown method {cfg['method']!r}; known: {', '.join(METHODS)}")
    tensors, plan = METHODS[cfg["method"]](state, cfg)
    quant_meta = {"method": cfg["method"], "bits": cfg["bits"], "plan": plan}
    tensorfile.save(out, tensors, {**meta, "quant": quant_meta})
    counts = dict(Counter(plan.values()))
    print(f"{out}: {len(plan)} tensors, storage {counts}", flush=True)
    return counts


def dequantize(source: str | Path | dict[str, Tensor],
               meta: dict | None = None) -> tuple[dict[str, Tensor], dict]:
    """(float state dict, model meta) from a quantized tensor file's path or its loaded contents."""
    if meta is None:
        source, meta = tensorfile.load(source)
    if "quant" not in meta:
        raise ValueError("not a quantized tensor file (no 'quant' entry in its header)")
    try:
        state = rtn.dequantize_state(source, meta["quant"]["plan"])
    except KeyError as e:
        raise ValueError(f"quantized tensor file lacks tensor {e}") from None
    return state, {k: v for k, v in meta.items() if k != "quant"}


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf quantize", description=__doc__)
    ap.add_argument("--weights", required=True, help="EMA weights (tensor file)")
    ap.add_argument("--cfg", required=True, help="the quant config section as JSON")
    ap.add_argument("--out", required=True, help="quantized tensor file to write")
    args = ap.parse_args(argv)
    try:
        quantize(args.weights, json.loads(args.cfg), args.out)
    except ValueError as e:
        raise SystemExit(f"pgolf quantize: {e}") from None
