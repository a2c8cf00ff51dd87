"""`pgolf size`: code plus model bytes against the challenge's cap: size.json.

Code bytes are the size of the packed file a submission runs (pgolf.pipeline.bundle: the modules the
run's stages reach, minified, compressed, in one self-extracting train_gpt.py), built here from the
installed package for the features the run's config switches on (--features, as
pgolf.pipeline.features names them), byte for byte the file `pgolf record` ships. This is its own
stage so that editing code reruns only this check. Over the budget it fails, naming the amount;
with compress.prune off it says how to turn pruning on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pgolf.errors import ConfigError
from pgolf.formats import tensorfile
from pgolf.formats.results import write_result
from pgolf.pipeline import bundle, features
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


def size_report(artifact: str | Path, cfg: dict, on: frozenset[str] | None = None) -> dict:
    """size.json's numbers: the checked artifact's, and the packed code's of features `on` (None:
    every feature, the whole package's file)."""
    checked = verify(artifact)
    model, code = checked.file_bytes, bundle.code_bytes(on)
    total, budget = model + code, cfg["budget_bytes"]
    header = checked.header
    params = header.get("params") or 0
    return {"model_bytes": model, "code_bytes": code, "total_bytes": total, "budget_bytes": budget,
            "fits": total <= budget, "headroom_bytes": budget - total, "codec": header.get("codec"),
            "level": header.get("level"), "shuffle": header.get("shuffle"), "packed": bool(header.get("packed")),
            "params": params, "bytes_per_param": model / params if params else None,
            "pruned_codes": header.get("pruned_codes", 0), "code_file": bundle.FILE_NAME,
            "code_features": sorted(features.BY_NAME if on is None else on), "code_sources": bundle.sources(on)}


def parse_features(text: str) -> frozenset[str]:
    """--features: the comma-separated names of the features the run switches on ('' for none)."""
    on = frozenset(name for name in text.split(",") if name)
    unknown = sorted(on - features.BY_NAME.keys())
    if unknown:
        raise ConfigError(f"--features: unknown {', '.join(unknown)}; known: {', '.join(features.BY_NAME)}")
    return on


def check_size(artifact: str | Path, cfg: dict, out: str | Path, on: frozenset[str] | None = None) -> dict:
    report = size_report(artifact, cfg, on)
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
    ap.add_argument("--features", required=True,
                    help="the features the run switches on, comma-separated (pgolf.pipeline.features)")
    ap.add_argument("--out", required=True, help="size.json to write")
    args = ap.parse_args(argv)
    check_size(args.artifact, json.loads(args.cfg), args.out, parse_features(args.features))
