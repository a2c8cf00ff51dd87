"""A study's comparison: every variant against the baseline, as the challenge judges a record.

For each variant: mean ± std of each BPB (pre-quant, post-quant, sliding window, TTT), the
difference in the study's metric (compare.metric) in BPB and in nats per token, the one-sided Welch p
that the variant is better, artifact bytes, and
training and evaluation seconds. Each variant is marked against the record bar (a gain of at least
compare.min_gain_nats at p < compare.alpha) and against the study's looser level; with many
variants some pass the looser level by chance, so the table also gives the Holm-adjusted p and the
number of false "helps" expected if no variant did anything.

Nats are per token of the baseline: every run's BPB is converted with the baseline's val token and
byte counts. With one tokenizer that is each run's own nats per token; a variant with another
tokenizer (CaseOps) is then judged by its BPB, the only score the two tokenizations share. Its own
nats per token would not do: CaseOps spends 6% more tokens on the same bytes, so a model worse per
byte has fewer nats per token, and would pass the record bar.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

from pgolf.errors import PgolfError
from pgolf.formats.io import write_bytes
from pgolf.formats.results import read_result, write_result
from pgolf.report import stats
from pgolf.report.aggregate import mean_std

BPB_COLUMNS = ("pre_quant_bpb", "post_quant_bpb", "sliding_bpb", "ttt_bpb")


def _values(summary: dict, col: str, where: Path) -> list[float]:
    rows = summary.get("seeds")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and col in r for r in rows):
        raise PgolfError(f"{where}: not every seed has {col!r} (is eval.ttt enabled in every run?)")
    return [float(r[col]) for r in rows]


def _nats(summary: dict, col: str, where: Path, per: tuple[int, int]) -> list[float]:
    """Per-seed values of a BPB column in nats per token, with `per` = the baseline's (val tokens, bytes)."""
    return [stats.bpb_to_nats(v, *per) for v in _values(summary, col, where)]


def _counts(summary: dict, where: Path) -> tuple[int, int]:
    """A run's val (tokens, bytes), the same for every seed (one val split)."""
    tokens, nbytes = _values(summary, "eval_tokens", where), _values(summary, "eval_bytes", where)
    if len(set(tokens)) > 1 or len(set(nbytes)) > 1:
        raise PgolfError(f"{where}: its seeds scored different val splits ({sorted(set(tokens))} tokens)")
    return int(tokens[0]), int(nbytes[0])


def t_quantile(p: float, df: float) -> float:
    """The t with P(T > t) = p (bisection on stats.t_sf)."""
    lo, hi = 0.0, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if stats.t_sf(mid, df) > p else (lo, mid)
    return (lo + hi) / 2


def welch_delta(new: list[float], base: list[float], margin: float = 0.0) -> dict[str, float]:
    """mean(new) - mean(base), its 95% interval and the one-sided p that new is lower by more than
    `margin` (lower is better)."""
    if len(new) < 2 or len(base) < 2:
        raise PgolfError("a study compares at least two seeds a run (Welch's t-test needs them)")
    t = stats.welch(new, statistics.fmean(base), statistics.stdev(base), len(base), margin)
    se = math.sqrt(statistics.variance(new) / len(new) + statistics.variance(base) / len(base))
    delta = -t["diff"]
    half = t_quantile(0.025, t["df"]) * se
    return {"delta": delta, "low": delta - half, "high": delta + half, "p": t["p_value"], "df": t["df"]}


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjustment of one-sided p values (family-wise error over the variants)."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out, running = [0.0] * len(ps), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = running
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    return dict(zip(("mean", "std"), mean_std(values), strict=True))


def describe(summary: dict, where: Path) -> dict[str, Any]:
    """A run's means: each BPB it has, bytes and seconds."""
    out: dict[str, Any] = {"n": len(summary.get("seeds", []))}
    for col in (*BPB_COLUMNS, "total_bytes", "model_bytes", "train_seconds", "eval_seconds"):
        if all(col in r for r in summary.get("seeds", [])):
            out[col] = _mean_std(_values(summary, col, where))
    return out


def compare(names: list[str], summaries: list[Path], study: dict, compare_cfg: dict) -> dict[str, Any]:
    """The comparison of names[1:] (the variants) with names[0] (the baseline)."""
    if len(names) != len(summaries) or len(names) < 2:
        raise PgolfError(f"--names: {len(names)} names for {len(summaries)} summaries "
                         "(a baseline and a variant at least)")
    loaded = [read_result(p) for p in summaries]
    metric, bar = compare_cfg["metric"], compare_cfg["min_gain_nats"]
    per = _counts(loaded[0], summaries[0])
    base_bpb, base_nats = _values(loaded[0], metric, summaries[0]), _nats(loaded[0], metric, summaries[0], per)
    rows = []
    for name, summary, where in zip(names[1:], loaded[1:], summaries[1:], strict=True):
        bpb = welch_delta(_values(summary, metric, where), base_bpb)
        nats = welch_delta(_nats(summary, metric, where, per), base_nats)
        record = welch_delta(_nats(summary, metric, where, per), base_nats, margin=bar)
        rows.append({"variant": name, **describe(summary, where), "delta_bpb": bpb, "delta_nats": nats,
                     "p": nats["p"], "p_vs_bar": record["p"],
                     "record": -nats["delta"] >= bar and record["p"] < compare_cfg["alpha"],
                     "helps": nats["p"] < study["level"], "hurts": nats["p"] > 1 - study["level"]})
    for row, adjusted in zip(rows, holm([r["p"] for r in rows]), strict=True):
        row["p_holm"] = adjusted
        row["helps_holm"] = adjusted < study["level"]
    base = {"variant": names[0], **describe(loaded[0], summaries[0])}
    return {"metric": metric, "bar_bpb": bar / stats.bpb_to_nats(1.0, *per), "baseline": base,
            "variants": rows, "level": study["level"], "alpha": compare_cfg["alpha"], "bar_nats": bar,
            "expected_false_helps": study["level"] * len(rows)}


def _ms(d: dict | None, digits: int = 4) -> str:
    return "" if d is None else f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"


def _verdict(row: dict) -> str:
    if row["record"]:
        return "record bar"
    if row["helps"]:
        return "helps" + ("" if row["helps_holm"] else " (not after Holm)")
    return "hurts" if row["hurts"] else "no significant change"


def render(c: dict, title: str) -> str:
    head = ["variant", "pre-quant", "post-quant", "sliding", "TTT", f"Δ {c['metric']}", "Δ nats", "p", "p (Holm)",
            "total bytes", "train s", "eval s", "verdict"]
    lines = [f"## Study `{title}`: {len(c['variants'])} variants against `{c['baseline']['variant']}`", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    b = c["baseline"]
    lines.append("| " + " | ".join([b["variant"], *(_ms(b.get(k)) for k in BPB_COLUMNS), "", "", "", "",
                                     _ms(b.get("total_bytes"), 0), _ms(b.get("train_seconds"), 1),
                                     _ms(b.get("eval_seconds"), 1), "baseline"]) + " |")
    for r in c["variants"]:
        d, n = r["delta_bpb"], r["delta_nats"]
        lines.append("| " + " | ".join([
            r["variant"], *(_ms(r.get(k)) for k in BPB_COLUMNS),
            f"{d['delta']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]", f"{n['delta']:+.4f}", f"{r['p']:.3g}",
            f"{r['p_holm']:.3g}", _ms(r.get("total_bytes"), 0), _ms(r.get("train_seconds"), 1),
            _ms(r.get("eval_seconds"), 1), _verdict(r)]) + " |")
    lines += ["", "Δ: variant minus baseline (lower is better), 95% Welch interval; p: one-sided Welch test that the "
              "variant is better, in nats per token of the baseline (each run's BPB times the baseline's val bytes "
              "per token and ln 2, so a variant with another tokenizer is judged per byte). Record bar: a gain of at "
              f"least {c['bar_nats']} nats at p < {c['alpha']}. Helps: p < {c['level']}; with {len(c['variants'])} "
              f"comparisons at that level {c['expected_false_helps']:.2f} false \"helps\" are expected by chance if no "
              "variant did anything (Holm's adjusted p controls that).", ""]
    return "\n".join(lines)


def plot(c: dict, out: Path) -> None:
    """Δ of the study's metric per variant with its 95% interval, beside the record bar."""
    from pgolf.report.plots import plt, save

    rows = c["variants"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.5))
    ys = range(len(rows))
    deltas = [r["delta_bpb"]["delta"] for r in rows]
    errs = [[d - r["delta_bpb"]["low"] for d, r in zip(deltas, rows, strict=True)],
            [r["delta_bpb"]["high"] - d for d, r in zip(deltas, rows, strict=True)]]
    ax.errorbar(deltas, ys, xerr=errs, fmt="o", capsize=3)
    ax.axvline(0, color="black", lw=0.8)
    # the bar in BPB, with the baseline's own conversion
    base = c["baseline"]
    if rows:
        ax.axvline(-c["bar_bpb"], color="red", ls="--", lw=0.8, label=f"record bar ({c['bar_nats']} nats)")
        ax.legend(loc="best", fontsize=8)
    ax.set_yticks(list(ys), [r["variant"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel(f"Δ {c['metric']} against {base['variant']} (95% interval)")
    save(fig, out)


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf study", description=__doc__)
    ap.add_argument("--names", nargs="+", required=True, help="the baseline's name, then each variant's")
    ap.add_argument("--summaries", type=Path, nargs="+", required=True, help="summary.json of each, as --names")
    ap.add_argument("--study", required=True, help="the study config section as JSON")
    ap.add_argument("--compare", required=True, help="the compare config section as JSON")
    ap.add_argument("--out-json", type=Path, required=True)
    ap.add_argument("--out-table", type=Path, required=True)
    ap.add_argument("--out-plot", type=Path, required=True)
    args = ap.parse_args(argv)
    result = compare(args.names, args.summaries, json.loads(args.study), json.loads(args.compare))
    title = args.out_table.parent.name
    table = render(result, title)
    plot(result, args.out_plot)
    write_bytes(args.out_table, table.encode())
    write_result(args.out_json, result)
    print(table)
