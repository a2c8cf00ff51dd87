"""Is a run a record? Welch's t-test against a baseline, in nats per token as the challenge asks.

The challenge's bar: beat the standing record by at least 0.005 nats per token at p < 0.01. BPB and
nats per token differ by a constant factor, ln 2 * bytes / tokens, taken from the run's own counts.
"""

from __future__ import annotations

import math
import statistics

from pgolf.errors import PgolfError


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1 - front * _betacf(b, a, 1 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return tail if t > 0 else 1 - tail


def welch(new: list[float], base_mean: float, base_std: float, base_n: int, margin: float = 0.0) -> dict:
    """One-sided Welch test of H1: base_mean - mean(new) > margin (lower is better)."""
    n1 = len(new)
    if n1 < 2 or base_n < 2:
        raise PgolfError("Welch's t-test needs at least two seeds on each side")
    m1, s1 = statistics.fmean(new), statistics.stdev(new)
    v1, v2 = s1 * s1 / n1, base_std * base_std / base_n
    se = math.sqrt(v1 + v2)
    if se == 0:
        raise PgolfError("both sides have zero variance; the test is undefined")
    t = (base_mean - m1 - margin) / se
    df = (v1 + v2) ** 2 / (v1 * v1 / (n1 - 1) + v2 * v2 / (base_n - 1))
    return {"t": t, "df": df, "p_value": t_sf(t, df), "diff": base_mean - m1}


def bpb_to_nats(bpb: float, tokens: int, nbytes: int) -> float:
    return bpb * math.log(2) * nbytes / tokens


def compare(new_bpb: list[float], tokens: int, nbytes: int, base: dict, min_gain_nats: float, alpha: float) -> dict:
    """Everything a competitor asks before submitting: the gain, its significance, and the verdict."""
    to_nats = lambda v: bpb_to_nats(v, tokens, nbytes)  # noqa: E731
    nats = [to_nats(v) for v in new_bpb]
    plain = welch(nats, to_nats(base["mean"]), to_nats(base["std"]), base["n"])
    bar = welch(nats, to_nats(base["mean"]), to_nats(base["std"]), base["n"], margin=min_gain_nats)
    return {
        "baseline": base, "gain_bpb": base["mean"] - statistics.fmean(new_bpb), "gain_nats": plain["diff"],
        "bar_nats": min_gain_nats, "bar_bpb": min_gain_nats / (math.log(2) * nbytes / tokens),
        "welch_t": plain["t"], "welch_df": plain["df"], "p_value": plain["p_value"],
        "p_value_vs_bar": bar["p_value"], "alpha": alpha,
        "is_record": plain["diff"] >= min_gain_nats and bar["p_value"] < alpha,
    }
