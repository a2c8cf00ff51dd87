"""Studies: the statistics of the comparison, the variants' configs, and which jobs they share."""

import math
from pathlib import Path

import pytest

from pgolf.config import merged as merged_file
from pgolf.config import validate
from pgolf.errors import ConfigError
from pgolf.formats.results import write_result
from pgolf.pipeline import study
from pgolf.pipeline.plan import Plan
from pgolf.report import stats
from pgolf.report.study import compare, holm, t_quantile, welch_delta


def test_holm_adjusts_step_down_and_keeps_the_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5] and holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])


def test_t_quantile_inverts_the_tail():
    assert t_quantile(0.025, 1e6) == pytest.approx(1.95996, abs=1e-4)
    assert t_quantile(0.025, 2) == pytest.approx(4.30265, abs=1e-4)
    assert stats.t_sf(t_quantile(0.1, 3.7), 3.7) == pytest.approx(0.1, abs=1e-9)


def test_welch_delta_is_variant_minus_baseline_with_its_interval():
    base, new = [1.50, 1.52, 1.51], [1.45, 1.46, 1.47]
    d = welch_delta(new, base)
    assert d["delta"] == pytest.approx(-0.05) and d["low"] < -0.05 < d["high"] < 0
    assert d["p"] < 0.01  # clearly better
    assert welch_delta(base, new)["p"] > 0.99  # and the other way round, clearly worse
    half = d["high"] - d["delta"]
    assert half == pytest.approx(t_quantile(0.025, d["df"]) * math.sqrt(1e-4 / 3 + 1e-4 / 3))


def summary_file(path: Path, bpbs: list[float], tokens: int, nbytes: int) -> Path:
    write_result(path, {"seeds": [{"sliding_bpb": b, "eval_tokens": tokens, "eval_bytes": nbytes} for b in bpbs]})
    return path


def test_a_variant_with_another_tokenizer_is_judged_per_byte_in_the_baseline_s_tokens(tmp_path):
    """CaseOps spends 6% more tokens on the same bytes (the default val split: 133,611 against 125,853
    for 362,177 and 362,133 bytes): worse per byte, it has fewer nats per token of its own, which
    once made a study mark it as clearing the record bar."""
    base = summary_file(tmp_path / "base.json", [1.6719, 1.6690, 1.6748], 125_853, 362_133)
    caseops = summary_file(tmp_path / "caseops.json", [1.6843, 1.6811, 1.6875], 133_611, 362_177)
    assert 1.6843 * 362_177 / 133_611 < 1.6719 * 362_133 / 125_853  # fewer nats per own token
    cfg = {"metric": "sliding_bpb", "min_gain_nats": 0.005, "alpha": 0.01}
    row = compare(["baseline", "caseops"], [base, caseops], {"level": 0.05}, cfg)["variants"][0]
    assert row["delta_nats"]["delta"] == pytest.approx(0.0124 * math.log(2) * 362_133 / 125_853)
    assert row["hurts"] and not row["helps"] and not row["record"] and row["p"] > 0.99


def merged(**study_keys) -> dict:
    return {"seeds": [1, 2], "run": "s", "study": study_keys}


def test_a_study_is_its_baseline_and_each_variant_over_it():
    runs = study.runs(merged(variants={"a": {"eval": {"stride": 16}}}))
    assert list(runs) == ["results/s/baseline", "results/s/a"]
    (_, base), (name, a) = runs["results/s/baseline"], runs["results/s/a"]
    assert name == "s/a" and a["eval"]["stride"] == 16 and base["eval"]["stride"] != 16
    assert a["seeds"] == base["seeds"] == [1, 2] and a["study"] == validate({})["study"]
    assert list(study.runs({"run": "one"})) == ["results/one"]


@pytest.mark.parametrize("overlay, problem", [
    ({"seeds": [3]}, "study.variants.v: sets seeds"),
    ({"data": {"source": "local"}}, "study.variants.v: sets data.source"),
    ({"train": {"iterationz": 3}}, "study.variants.v: invalid pgolf config"),
])
def test_a_variant_that_cannot_be_compared_is_refused_by_name(overlay, problem):
    with pytest.raises(ConfigError, match=problem):
        study.runs(merged(variants={"v": overlay}))


@pytest.mark.parametrize("name", ["baseline", "stages", "a/b"])
def test_variant_names_that_would_clash_with_folders_are_refused(name):
    with pytest.raises(ConfigError, match="study.variants"):
        study.runs(merged(variants={name: {}}))


def plan_of(**variants) -> Plan:
    return Plan(study.runs(merged(variants=variants)), code=lambda stage: "c0de", code_bytes=lambda on: 1000)


def keys(plan: Plan, run: str, seed: int = 1) -> dict[str, str]:
    return {stage: job.key for stage, job in plan.runs[f"results/s/{run}"].seeds[seed].items()}


def test_variants_share_every_job_before_the_stage_they_change():
    plan = plan_of(codec={"compress": {"codec": "lzma"}}, stride={"eval": {"stride": 16}},
                   bits={"quant": {"bits": {"mlp": 5}}}, width={"model": {"model_dim": 128}})
    base = keys(plan, "baseline")
    same = lambda run: {s for s, k in keys(plan, run).items() if k == base[s]}  # noqa: E731
    assert same("stride") == {"train", "calibrate", "quantize", "compress", "size"}
    assert same("codec") == {"train", "calibrate", "quantize"}
    assert same("bits") == {"train", "calibrate"}
    assert same("width") == set()
    assert len(plan.jobs["train"]) == 2 * 2  # baseline and width, two seeds each


def test_a_job_key_follows_its_code():
    a = Plan(study.runs({"run": "x"}), code=lambda stage: "c0de", code_bytes=lambda on: 1)
    b = Plan(study.runs({"run": "x"}), code=lambda stage: "c0de" if stage != "quantize" else "new",
             code_bytes=lambda on: 1)
    ka, kb = keys_one(a), keys_one(b)
    assert ka["train"] == kb["train"] and ka["calibrate"] == kb["calibrate"]
    assert all(ka[s] != kb[s] for s in ("quantize", "compress", "size", "evaluate"))


def keys_one(plan: Plan) -> dict[str, str]:
    return {stage: job.key for stage, job in plan.runs["results/x"].seeds[1337].items()}


def test_runs_that_would_build_different_data_under_one_path_are_refused():
    with pytest.raises(ConfigError, match="give one of them a data.name of its own"):
        plan_of(split={"data": {"val_fraction": 0.2}})


def test_jobs_are_keyed_by_the_data_they_read_not_only_its_name():
    """Two invocations that build data/<name> from other settings (refused only within one) train
    into folders of their own: the second must not reuse, or overwrite, the first one's jobs."""
    a, b = (Plan(study.runs({"run": "x", "data": {"val_fraction": f}}), code=lambda s: "c0de",
                 code_bytes=lambda on: 1) for f in (0.1, 0.2))
    ka, kb = keys_one(a), keys_one(b)
    assert all(ka[s] != kb[s] for s in ka)


@pytest.mark.parametrize("name, trainings, separate", [("pr1855-parts", 27, 36), ("pr2135-parts", 6, 18)])
def test_the_shipped_studies_validate_and_train_only_where_a_variant_changes_training(name, trainings, separate):
    cfg = merged_file(Path(__file__).resolve().parent.parent / "configs" / "studies" / f"{name}.yaml")
    plan = Plan(study.runs(cfg), code=lambda stage: "c0de", code_bytes=lambda on: 1000)
    assert len(plan.jobs["train"]) == trainings
    assert sum(len(r.seeds) for r in plan.runs.values()) == separate
