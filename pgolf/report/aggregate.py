"""Collect every seed's eval, size and training results into summary.json/.parquet and a table."""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pyarrow as pa

from pgolf.errors import PgolfError
from pgolf.formats.io import write_bytes
from pgolf.formats.io import write_parquet as write_table
from pgolf.formats.results import has, integer, number, read_result, write_result
from pgolf.report import stats
from pgolf.report.inputs import add_seed_files, seed_files

# Column -> (file, path of keys inside it). The order is the table's order.
COLUMNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pre_quant_bpb": ("eval", ("pre_quant", "val_bpb")),
    "post_quant_bpb": ("eval", ("post_quant", "val_bpb")),
    "sliding_bpb": ("eval", ("sliding", "val_bpb")),
    "eval_tokens": ("eval", ("sliding", "tokens")),
    "eval_bytes": ("eval", ("sliding", "bytes")),
    "quant_gap_bpb": ("eval", ("quant_gap_bpb",)),
    "ttt_bpb": ("eval", ("ttt", "val_bpb")),
    "ttt_gain_bpb": ("eval", ("ttt_gain_bpb",)),
    "sliding_ngram_bpb": ("eval", ("sliding_ngram", "val_bpb")),  # the same passes under eval.ngram_tilt
    "ttt_ngram_bpb": ("eval", ("ttt_ngram", "val_bpb")),
    "post_quant_loss": ("eval", ("post_quant", "val_loss")),
    "unpruned_bpb": ("eval", ("unpruned", "val_bpb")),  # post-quant BPB before compress pruned codes
    "prune_cost_bpb": ("eval", ("prune_cost_bpb",)),
    "pruned_codes": ("size", ("pruned_codes",)),
    "model_bytes": ("size", ("model_bytes",)),
    "total_bytes": ("size", ("total_bytes",)),
    "steps": ("train", ("steps",)),
    "train_seconds": ("train", ("train_seconds",)),
    "tokens_per_s": ("train", ("tokens_per_s",)),
    "eval_seconds": ("eval", ("scored_eval_seconds",)),  # what the eval budget counts: sliding + TTT
}


# TTT's only when eval.ttt is enabled; the n-gram tilt's only when eval.ngram_tilt is; the unpruned
# score only when evaluate was given the unpruned tensors; the pruned count only from a size.json
# that reports it; the eval seconds only from an eval.json that records them.
OPTIONAL = {"ttt_bpb", "ttt_gain_bpb", "sliding_ngram_bpb", "ttt_ngram_bpb", "unpruned_bpb", "prune_cost_bpb",
            "pruned_codes", "eval_seconds"}


def seed_row(seed: int, files: dict[str, Path]) -> dict[str, Any]:
    """One seed's columns from its eval, size and train files."""
    loaded = {name: read_result(p) for name, p in files.items()}
    row: dict[str, Any] = {"seed": seed}
    for col, (name, keys) in COLUMNS.items():
        if col in OPTIONAL and not has(loaded[name], keys[:1]):
            continue
        row[col] = float(number(loaded[name], keys, files[name]))
    return row


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The columns every seed has (TTT's only when every seed ran it)."""
    return [c for c in COLUMNS if all(c in r for r in rows)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed): the one rule of every summary."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation of every column."""
    mean, std = {}, {}
    for col in columns(rows):
        mean[col], std[col] = mean_std([r[col] for r in rows])
    return mean, std


def _fmt(col: str, v: float) -> str:
    if math.isnan(v):
        return "nan"
    if col.endswith("_bpb") or col.endswith("_loss"):
        return f"{v:.4f}"
    return f"{v:,.0f}" if abs(v) >= 100 or v == int(v) else f"{v:.2f}"


def render_table(run: str, rows: list[dict], mean: dict, std: dict) -> str:
    cols = [c for c in columns(rows) if not c.startswith("eval_")]  # the val set's size is the same for every seed
    header = ["seed", *cols]
    body = [[str(r["seed"]), *(_fmt(c, r[c]) for c in cols)] for r in rows]
    body += [["mean", *(_fmt(c, mean[c]) for c in cols)], ["std", *(_fmt(c, std[c]) for c in cols)]]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([f"## pgolf run `{run}`", "", line(header), sep, *map(line, body), ""])


def write_parquet(path: Path, rows: list[dict], mean: dict, std: dict) -> None:
    records = [{"row": f"seed {r['seed']}", **r} for r in rows]
    records += [{"row": "mean", "seed": None, **mean}, {"row": "std", "seed": None, **std}]
    write_table(path, pa.Table.from_pylist(records))


def baseline_of(cfg: dict, summary: Path | None = None) -> dict | None:
    """The baseline's mean, std and n of cfg['metric'], from another run's `summary` or as stated."""
    if cfg["baseline_run"]:
        if summary is None:
            raise PgolfError(f"compare.baseline_run {cfg['baseline_run']!r}: no --baseline-summary given")
        other, metric = read_result(summary), cfg["metric"]
        return {"source": cfg["baseline_run"], "mean": number(other, ("mean", metric), summary),
                "std": number(other, ("std", metric), summary), "n": integer(other, ("n_seeds",), summary)}
    if cfg["baseline_mean"] is not None:
        return {"source": "stated", "mean": cfg["baseline_mean"], "std": cfg["baseline_std"], "n": cfg["baseline_n"]}
    return None


def aggregate(run: str, files: dict[int, dict[str, Path]], compare_cfg: dict | None = None,
              baseline_summary: Path | None = None) -> dict[str, Any]:
    """The summary of seeds' files (seed -> eval, size, train: pgolf.report.inputs.seed_files)."""
    rows = [seed_row(s, f) for s, f in files.items()]
    mean, std = summarize(rows)
    summary = {"run": run, "n_seeds": len(rows), "seeds": rows, "mean": mean, "std": std}
    base = baseline_of(compare_cfg, baseline_summary) if compare_cfg else None
    if base is not None:
        c = compare_cfg
        if c["metric"] not in columns(rows):
            raise PgolfError(f"compare.metric {c['metric']!r}: not in every seed's eval.json (is eval.ttt enabled?)")
        # The val set is the same for every seed, so its token and byte counts are too.
        summary["compare"] = {"metric": c["metric"], **stats.compare(
            [r[c["metric"]] for r in rows], int(rows[0]["eval_tokens"]), int(rows[0]["eval_bytes"]),
            base, c["min_gain_nats"], c["alpha"])}
    return summary


def render_compare(c: dict) -> str:
    verdict = "a record" if c["is_record"] else "not a record"
    return (f"vs {c['baseline']['source']} ({c['metric']} {c['baseline']['mean']:.4f} ± {c['baseline']['std']:.4f}, "
            f"n={c['baseline']['n']}): gain {c['gain_bpb']:.4f} BPB = {c['gain_nats']:.4f} nats/token, "
            f"Welch t={c['welch_t']:.2f} df={c['welch_df']:.1f} p={c['p_value']:.3g}; "
            f"bar {c['bar_nats']} nats ({c['bar_bpb']:.4f} BPB) at p<{c['alpha']}: p={c['p_value_vs_bar']:.3g}, "
            f"{verdict}\n")


def summary_table(summary: dict) -> str:
    """summary.md: the table of a summary (and its comparison), rendered from its numbers alone, so
    that the record stage derives the same text from summary.json, whose checksum it checks."""
    table = render_table(summary["run"], summary["seeds"], summary["mean"], summary["std"])
    if "compare" in summary:
        table += "\n" + render_compare(summary["compare"])
    return table


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf aggregate", description=__doc__)
    ap.add_argument("--run", required=True)
    add_seed_files(ap, "eval", "size", "train")
    ap.add_argument("--out-json", type=Path, required=True)
    ap.add_argument("--out-parquet", type=Path, required=True)
    ap.add_argument("--out-table", type=Path, required=True)
    ap.add_argument("--compare", default="", help="the compare config section as JSON")
    ap.add_argument("--baseline-summary", type=Path, help="summary.json of compare.baseline_run")
    ap.add_argument("--stages", default="{}", help="seed -> stage -> the folder of its job, as JSON")
    ap.add_argument("--out-stages", type=Path, help="stages.json: where this run's stage files are")
    args = ap.parse_args(argv)
    files = seed_files(args.seeds, eval=args.eval, size=args.size, train=args.train)
    summary = aggregate(args.run, files, json.loads(args.compare) if args.compare else None, args.baseline_summary)
    table = summary_table(summary)
    write_parquet(args.out_parquet, summary["seeds"], summary["mean"], summary["std"])
    write_bytes(args.out_table, table.encode())
    if args.out_stages:
        write_result(args.out_stages, json.loads(args.stages))
    write_result(args.out_json, summary)
    print(table)
