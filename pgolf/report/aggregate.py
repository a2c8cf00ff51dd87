"""Collect every seed's eval, size and training results into summary.json/.parquet and a table."""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pgolf.io import atomic_path, read_json, write_bytes, write_json

# Column -> (file, path of keys inside it). The order is the table's order.
COLUMNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pre_quant_bpb": ("eval", ("pre_quant", "val_bpb")),
    "post_quant_bpb": ("eval", ("post_quant", "val_bpb")),
    "sliding_bpb": ("eval", ("sliding", "val_bpb")),
    "quant_gap_bpb": ("eval", ("quant_gap_bpb",)),
    "post_quant_loss": ("eval", ("post_quant", "val_loss")),
    "model_bytes": ("size", ("model_bytes",)),
    "total_bytes": ("size", ("total_bytes",)),
    "steps": ("train", ("steps",)),
    "train_seconds": ("train", ("train_seconds",)),
    "tokens_per_s": ("train", ("tokens_per_s",)),
}


def _dig(obj: dict, keys: tuple[str, ...], source: Path) -> float:
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            raise KeyError(f"{source}: missing {'.'.join(keys)}")
        obj = obj[k]
    return float(obj)


def seed_row(run_dir: Path, seed: int) -> dict[str, Any]:
    d = run_dir / f"seed{seed}"
    files = {name: d / f"{name}.json" for name in ("eval", "size", "train")}
    loaded = {name: read_json(p) for name, p in files.items()}
    row: dict[str, Any] = {"seed": seed}
    for col, (name, keys) in COLUMNS.items():
        row[col] = _dig(loaded[name], keys, files[name])
    return row


def summarize(rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (0 for a single seed) of every column."""
    mean, std = {}, {}
    for col in COLUMNS:
        values = [r[col] for r in rows]
        mean[col] = statistics.fmean(values)
        std[col] = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def _fmt(col: str, v: float) -> str:
    if math.isnan(v):
        return "nan"
    if col.endswith("_bpb") or col.endswith("_loss"):
        return f"{v:.4f}"
    return f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.2f}"


def render_table(run: str, rows: list[dict], mean: dict, std: dict) -> str:
    header = ["seed", *COLUMNS]
    body = [[str(r["seed"]), *(_fmt(c, r[c]) for c in COLUMNS)] for r in rows]
    body += [["mean", *(_fmt(c, mean[c]) for c in COLUMNS)], ["std", *(_fmt(c, std[c]) for c in COLUMNS)]]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"## pgolf run `{run}`", "", line(header), sep, *map(line, body), ""])


def write_parquet(path: Path, rows: list[dict], mean: dict, std: dict) -> None:
    records = [{"row": f"seed {r['seed']}", **r} for r in rows]
    records += [{"row": "mean", "seed": None, **mean}, {"row": "std", "seed": None, **std}]
    table = pa.Table.from_pylist(records)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def aggregate(run: str, run_dir: Path, seeds: list[int]) -> dict[str, Any]:
    rows = [seed_row(run_dir, s) for s in seeds]
    mean, std = summarize(rows)
    return {"run": run, "n_seeds": len(rows), "seeds": rows, "mean": mean, "std": std}


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf aggregate", description=__doc__)
    ap.add_argument("--run", required=True)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    ap.add_argument("--out-json", type=Path, required=True)
    ap.add_argument("--out-parquet", type=Path, required=True)
    ap.add_argument("--out-table", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        summary = aggregate(args.run, args.run_dir, args.seeds)
    except (KeyError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"pgolf aggregate: {e}") from None
    table = render_table(args.run, summary["seeds"], summary["mean"], summary["std"])
    write_parquet(args.out_parquet, summary["seeds"], summary["mean"], summary["std"])
    write_bytes(args.out_table, table.encode())
    write_json(args.out_json, summary)
    print(table)
