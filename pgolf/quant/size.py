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

from pgolf.formats import tensorfile
from pgolf.formats.results import write_result
from pgolf.pipeline import bundle
from pgolf.quant.artifact import ArtifactError, Checked, read_checked
from pgolf.quant.compress import BudgetError
from pgolf.quant.quantize import dequantize


def verify(artifact: str | Path) -> Checked:
    """Read the artifact exactly as evaluate does (framing, lengths, codec, checksum over header and
    tensors, tensor file, decoding plan): a size is certified only for an artifact that evaluate would
    accept, and every number size.json takes from it comes from that one checked read."""
    checked = read_checked(artifact)
    tensors, meta = tensorfile.loads(checked.raw, str(artifact))
    try:
        dequantize(tensors, meta)
    except ValueError as e:  # the readers name the file; dequantize does not
        raise ArtifactError(f"{artifact}: {e}") from None
    return checked


def size_report(artifact: str | Path, cfg: dict) -> dict:
    checked = verify(artifact)
    model, code = checked.file_bytes, bundle.code_bytes()
    total, budget = model + code, cfg["budget_bytes"]
    header = checked.header
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
    write_result(out, report)
    return report


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf size", description=__doc__)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--cfg", required=True, help="the compress config section as JSON")
    ap.add_argument("--out", required=True, help="size.json to write")
    args = ap.parse_args(argv)
    check_size(args.artifact, json.loads(args.cfg), args.out)
