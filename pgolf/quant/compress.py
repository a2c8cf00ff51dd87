"""`pgolf compress`: quantized tensors into the artifact; `pgolf size`: code plus model bytes vs the cap.

Code bytes are the source bytes of every .py file of the pgolf package: the code that trains,
quantizes and evaluates the model. They are counted in their own stage so that editing code
reruns only the size check, not compression and evaluation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pgolf.io import write_json
from pgolf.provenance import PACKAGE, code_files
from pgolf.quant.artifact import write_artifact


class BudgetError(ValueError):
    """Code plus model bytes over the challenge's cap."""


def compress(quant: str | Path, cfg: dict, out: str | Path) -> int:
    raw = Path(quant).read_bytes()
    n = write_artifact(out, raw, cfg["codec"], cfg["level"])
    print(f"{out}: {len(raw):,} -> {n:,} bytes ({cfg['codec']} level {cfg['level']})", flush=True)
    return n


def size_report(artifact: str | Path, cfg: dict) -> dict:
    files = {str(p.relative_to(PACKAGE.parent)): p.stat().st_size for p in code_files()}
    model, code = Path(artifact).stat().st_size, sum(files.values())
    total, budget = model + code, cfg["budget_bytes"]
    return {"model_bytes": model, "code_bytes": code, "total_bytes": total, "budget_bytes": budget,
            "fits": total <= budget, "headroom_bytes": budget - total, "codec": cfg["codec"],
            "code_files": files}


def check_size(artifact: str | Path, cfg: dict, out: str | Path) -> dict:
    report = size_report(artifact, cfg)
    print(f"model {report['model_bytes']:,} + code {report['code_bytes']:,} = "
          f"{report['total_bytes']:,} bytes of {report['budget_bytes']:,}", flush=True)
    if not report["fits"]:
        raise BudgetError(f"{artifact}: code plus model is {report['total_bytes']:,} bytes, "
                          f"{-report['headroom_bytes']:,} over the {report['budget_bytes']:,}-byte budget")
    write_json(out, report)
    return report


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf compress", description=__doc__)
    ap.add_argument("--quant", required=True, help="quantized tensor file")
    ap.add_argument("--cfg", required=True, help="the compress config section as JSON")
    ap.add_argument("--out", required=True, help="artifact to write")
    args = ap.parse_args(argv)
    try:
        compress(args.quant, json.loads(args.cfg), args.out)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"pgolf compress: {e}") from None


def size_cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf size", description=__doc__)
    ap.add_argument("--artifact", required=True)
    ap.add_argument("--cfg", required=True, help="the compress config section as JSON")
    ap.add_argument("--out", required=True, help="size.json to write")
    args = ap.parse_args(argv)
    try:
        check_size(args.artifact, json.loads(args.cfg), args.out)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"pgolf size: {e}") from None
