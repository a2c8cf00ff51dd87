"""`pgolf compress`: quantized tensors into the artifact; `pgolf size`: code plus model bytes vs the cap.

Code bytes are the source bytes of every .py file of the pgolf package: the code that trains,
quantizes and evaluates the model. They are counted in their own stage so that editing code
reruns only the size check, not compression and evaluation, unless pruning is on: then compress
itself aims at the budget minus the code bytes.

Pruning (PR #1019's selective +-1 pruning): zeroing a +-1 code adds scale^2 of squared error to its
weight and makes the codes more compressible, so codes are zeroed from the smallest row scale up,
and a bisection finds the fewest that make the artifact fit.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pgolf import tensorfile
from pgolf.container import read_file
from pgolf.errors import PgolfError
from pgolf.io import write_bytes, write_json
from pgolf.provenance import PACKAGE, code_files
from pgolf.quant.artifact import ArtifactError, encode, read_header, read_tensors
from pgolf.quant.quantize import dequantize


class BudgetError(PgolfError):
    """Code plus model bytes over the challenge's cap."""


class Candidates:
    """Every +-1 code, smallest impact (its row's scale^2) first: codes tensor index and flat position."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        plan = meta.get("quant", {}).get("plan", {})
        self.keys = [f"{n}.codes" for n, how in plan.items() if how == "int"]
        none = torch.zeros(0, dtype=torch.long)
        impacts, owners, flats = [torch.zeros(0)], [none], [none]
        for i, key in enumerate(self.keys):
            codes, scale = tensors[key], tensors[key[: -len("codes")] + "scale"].float()
            flat = torch.nonzero(codes.flatten().abs() == 1).squeeze(1)
            impacts.append(scale.square().repeat_interleave(codes.size(1))[flat])
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


def prune_to_fit(raw: bytes, cfg: dict, target: int, source: str = "quantized tensors") -> tuple[bytes, int]:
    """(artifact, codes pruned): the fewest +-1 codes zeroed so the artifact is at most `target` bytes.
    `raw` is the tensor file read from `source`."""
    data = encode(raw, cfg, source=source)
    if len(data) <= target:
        return data, 0
    tensors, meta = tensorfile.loads(raw, source)
    cands = Candidates(tensors, meta)
    smallest = encode(cands.pruned(tensors, meta, len(cands)), cfg, len(cands))
    if len(smallest) > target:
        raise BudgetError(f"pruning all {len(cands):,} +-1 codes still leaves {len(smallest) - target:,} bytes "
                          f"over the {target:,}-byte target")
    lo, hi, best = 0, len(cands), smallest  # encode(lo) is too big, encode(hi) fits
    while hi - lo > 1:
        mid = (lo + hi) // 2
        data = encode(cands.pruned(tensors, meta, mid), cfg, mid)
        if len(data) <= target:
            hi, best = mid, data
        else:
            lo = mid
    return best, hi


def compress(quant: str | Path, cfg: dict, out: str | Path, code_bytes: int = 0) -> int:
    t0 = time.perf_counter()
    raw = read_file(quant, tensorfile.TensorFileError)
    if cfg.get("prune"):
        data, n = prune_to_fit(raw, cfg, cfg["budget_bytes"] - code_bytes, str(quant))
    else:
        data, n = encode(raw, cfg, source=str(quant)), 0
    write_bytes(out, data)
    print(f"{out}: {len(raw):,} -> {len(data):,} bytes ({cfg['codec']} level {cfg['level']}, "
          f"pack {cfg.get('pack', False)}, shuffle {cfg.get('shuffle', 0)}, {n:,} codes pruned) "
          f"in {time.perf_counter() - t0:.1f}s", flush=True)
    return len(data)


def verify(artifact: str | Path) -> None:
    """Read the artifact exactly as evaluate does (framing, lengths, codec, checksum, tensor file,
    decoding plan): a size is certified only for an artifact that evaluate would accept."""
    tensors, meta = read_tensors(artifact)
    try:
        dequantize(tensors, meta)
    except ValueError as e:  # the readers name the file; dequantize does not
        raise ArtifactError(f"{artifact}: {e}") from None


def size_report(artifact: str | Path, cfg: dict) -> dict:
    verify(artifact)
    files = {str(p.relative_to(PACKAGE.parent)): p.stat().st_size for p in code_files()}
    model, code = Path(artifact).stat().st_size, sum(files.values())
    total, budget = model + code, cfg["budget_bytes"]
    header = read_header(artifact)
    params = header.get("params") or 0
    return {"model_bytes": model, "code_bytes": code, "total_bytes": total, "budget_bytes": budget,
            "fits": total <= budget, "headroom_bytes": budget - total, "codec": header.get("codec"),
            "level": header.get("level"), "shuffle": header.get("shuffle"), "packed": bool(header.get("packed")),
            "params": params, "bytes_per_param": model / params if params else None,
            "pruned_codes": header.get("pruned_codes", 0), "code_files": files}


def check_size(artifact: str | Path, cfg: dict, out: str | Path) -> dict:
    report = size_report(artifact, cfg)
    print(f"model {report['model_bytes']:,} + code {report['code_bytes']:,} = "
          f"{report['total_bytes']:,} bytes of {report['budget_bytes']:,}", flush=True)
    if not report["fits"]:
        hint = "" if cfg.get("prune") else "; compress.prune: true zeroes +-1 codes until it fits"
        raise BudgetError(f"{artifact}: code plus model is {report['total_bytes']:,} bytes, "
                          f"{-report['headroom_bytes']:,} over the {report['budget_bytes']:,}-byte budget{hint}")
    write_json(out, report)
    return report


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf compress", description=__doc__)
    ap.add_argument("--quant", required=True, help="quantized tensor file")
    ap.add_argument("--cfg", required=True, help="the compress config section as JSON")
    ap.add_argument("--code-bytes", type=int, default=0, help="code bytes, for pruning to the budget")
    ap.add_argument("--out", required=True, help="artifact to write")
    args = ap.parse_args(argv)
    compress(args.quant, json.loads(args.cfg), args.out, args.code_bytes)


def size_cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf size", description=__doc__)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--cfg", required=True, help="the compress config section as JSON")
    ap.add_argument("--out", required=True, help="size.json to write")
    args = ap.parse_args(argv)
    check_size(args.artifact, json.loads(args.cfg), args.out)
