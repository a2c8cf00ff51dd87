import math
import statistics

import pytest
from conftest import run_files

from pgolf.report import stats
from pgolf.report.aggregate import aggregate

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("t,df", [(2.1, 3.3), (-1.5, 4.0), (0.0, 7.0), (11.83, 3.31), (0.4, 120.0)])
def test_t_tail_matches_scipy(t, df):
    assert stats.t_sf(t, df) == pytest.approx(scipy_stats.t.sf(t, df), rel=1e-9, abs=1e-14)


def test_welch_matches_scipy():
    new, base = [1.100, 1.110, 1.105], [1.120, 1.125, 1.118]
    ours = stats.welch(new, statistics.fmean(base), statistics.stdev(base), len(base))
    ref = scipy_stats.ttest_ind(base, new, equal_var=False, alternative="greater")
    assert ours["t"] == pytest.approx(ref.statistic) and ours["p_value"] == pytest.approx(ref.pvalue)
    assert ours["df"] == pytest.approx(ref.df)


def test_bar_uses_the_runs_own_bytes_per_token():
    tokens, nbytes = 1000, 2500  # 2.5 bytes per token
    assert stats.bpb_to_nats(1.0, tokens, nbytes) == pytest.approx(math.log(2) * 2.5)
    base = {"source": "stated", "mean": 1.2000, "std": 0.0005, "n": 3}
    big = stats.compare([1.190, 1.1905, 1.1895], tokens, nbytes, base, 0.005, 0.01)
    # 0.005 nats = 0.005 / (ln 2 * 2.5) BPB = 0.00289 BPB; a 0.010 BPB gain clears it
    assert big["bar_bpb"] == pytest.approx(0.005 / (math.log(2) * 2.5))
    assert big["is_record"] and big["p_value_vs_bar"] < 0.01
    small = stats.compare([1.198, 1.1985, 1.1975], tokens, nbytes, base, 0.005, 0.01)
    assert small["gain_nats"] < 0.005 and not small["is_record"]


def test_one_seed_is_refused():
    with pytest.raises(ValueError, match="two seeds"):
        stats.welch([1.0], 1.1, 0.01, 3)


def test_aggregate_compares_with_another_run(tmp_path):
    from pgolf.formats.results import write_result

    for run, values in (("base", [1.50, 1.51, 1.505]), ("new", [1.40, 1.41, 1.405])):
        for seed, v in zip((1, 2, 3), values, strict=True):
            d = tmp_path / "results" / run / f"seed{seed}"
            d.mkdir(parents=True)
            part = {"val_bpb": v, "val_loss": v, "tokens": 1000, "bytes": 3000}
            write_result(d / "eval.json", {"pre_quant": part, "post_quant": part, "sliding": part,
                                           "quant_gap_bpb": 0.0})
            write_result(d / "size.json", {"model_bytes": 10, "total_bytes": 20})
            write_result(d / "train.json", {"steps": 5, "train_seconds": 1.0, "tokens_per_s": 9.0})
        summary = aggregate(run, run_files(tmp_path / "results" / run, [1, 2, 3]))
        write_result(tmp_path / "results" / run / "summary.json", summary)
    cfg = {"metric": "sliding_bpb", "baseline_run": "base", "baseline_mean": None, "baseline_std": None,
           "baseline_n": 3, "min_gain_nats": 0.005, "alpha": 0.01}
    result = aggregate("new", run_files(tmp_path / "results" / "new", [1, 2, 3]), cfg,
                       tmp_path / "results" / "base" / "summary.json")["compare"]
    assert result["baseline"]["mean"] == pytest.approx(1.505) and result["gain_bpb"] == pytest.approx(0.1)
    assert result["is_record"]
