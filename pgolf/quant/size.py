"""`pgolf size`: code plus model bytes against the challenge's cap: size.json.

Code bytes are the size of the packed file a submission runs (pgolf.pipeline.bundle: the runtime stages'
modules, minified, compressed, in one self-extracting train_gpt.py), built here from the installed
package, byte for byte the file `pgolf record` ships. This is its own stage so that editing code
reruns only this check. Over the budget it fails, naming the amount; with compress.prune off it
says how to turn pruning on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pgolf.formats.io import write_json
from pgolf.pipeline import bundle
from pgolf.quant.artifact import ArtifactError, read_header, read_tensors
from pgolf.quant.compress import BudgetError
from pgolf.quant.quantize import dequantize


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
    model, code = Path(artifact).stat().st_size, bundle.code_bytes()
    total, budget = model + code, cfg["budget_bytes"]
    header = read_header(artifact)
    params = header.get("params") or 0
    return {"model_bytes": model, "code_bytes": code, "total_bytes": total, "budget_bytes": budget,
            "fits": total <= budget, "headroom_bytes": budget - total, "codec": header.get("codec"),
            "level": header.get("level"), "shuffle": header.get("shuffle"), "packed": bool(header.get("packed")),
            "params": params, "bytes_per_param": model / params if params else None,
            "pruned_codes": header.get("pruned_codes", 0), "code_file": bundle.FILE_NAME,
            "code_sources": bundle.sources()}


def check_size(artifact: str | Path, cfg: dict, out: str | Path) -> dict:
    report = size_report(artifact, cfg)
    print(f"model {report['model_bytes']:,} + code {report['code_bytes']:,} = "
          f"{report['total_bytes']:,} bytes of {report['budget_bytes']:,} "
          f"({report['pruned_codes']:,} codes pruned)", flush=True)
    if not report["fits"]:
        hint = "" if cfg["prune"] else "; compress.prune: true zeroes +-1 codes until it fits"
        raise BudgetError(f"{artifact}: code plus model is {report['total_bytes']:,} bytes, "
                          f"{-report['headroom_bytes']:,} over the {report['budget_bytes']:,}-byte budget{hint}")
    write_json(out, report)
    return report


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf size", description=__doc__)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--cfg", required=True, help="the compress config section as JSON")
    ap.add_argument("--out", required=True, help="size.json to write")
    args = ap.parse_args(argv)
    check_size(args.artifact, json.loads(args.cfg), args.out)
