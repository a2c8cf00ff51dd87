"""The whole pipeline on the smoke preset, then what a config change makes Snakemake plan."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import stage_file

from pgolf.config import load
from pgolf.pipeline import bundle, features

REPO = Path(__file__).resolve().parent.parent


def snakemake(workdir: Path, *args: str, configs: tuple[str, ...] = ("run.yaml",)) -> subprocess.CompletedProcess:
    """Run Snakemake on the repository's Snakefile in `workdir` with config.yaml plus `configs`."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    files = [str(REPO / "config.yaml"), *(str(workdir / c) for c in configs)]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--cores", "2", "--configfile", *files, *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)


def planned(workdir: Path, override: dict | None = None) -> dict[str, int]:
    """Jobs a dry run would execute, per rule, with `override` merged into the run config."""
    configs = ("run.yaml",)
    if override:
        (workdir / "override.yaml").write_text(yaml.safe_dump(override))
        configs += ("override.yaml",)
    proc = snakemake(workdir, "-n", "--quiet", "rules", configs=configs)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline")
    cfg = yaml.safe_load((REPO / "configs" / "smoke.yaml").read_text())
    cfg["data"]["paths"] = [str(REPO / p) for p in cfg["data"]["paths"]]
    cfg["extends"] = str((REPO / "configs" / cfg["extends"]).resolve())  # the copy is elsewhere
    (workdir / "run.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(workdir)
    if proc.returncode:
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return workdir


def test_pipeline_produces_a_summary(finished_run):
    summary = json.loads((finished_run / "results/smoke/summary.json").read_text())
    assert [r["seed"] for r in summary["seeds"]] == [1, 2]
    for row in summary["seeds"]:
        size = json.loads(stage_file(finished_run, "smoke", row["seed"], "size", "size.json").read_text())
        ev = json.loads(stage_file(finished_run, "smoke", row["seed"], "evaluate", "eval.json").read_text())
        # A uniform guess over the 320-token vocab costs log2(320) bits per token; training must beat it.
        uniform_bpb = 8.32 * ev["post_quant"]["tokens"] / ev["post_quant"]["bytes"]
        assert 0 < row["post_quant_bpb"] < uniform_bpb
        assert size["total_bytes"] == size["model_bytes"] + size["code_bytes"]
    assert (finished_run / "results/smoke/summary.parquet").exists()
    assert "mean" in (finished_run / "results/smoke/summary.md").read_text()


def test_record_folder_is_a_self_contained_submission(finished_run):
    record = finished_run / "results/smoke/record"
    sub = json.loads((record / "submission.json").read_text())
    size = json.loads(stage_file(finished_run, "smoke", 1, "size", "size.json").read_text())
    counted = (record / "train_gpt.py").stat().st_size  # the packed code a submission runs
    assert sub["bytes_code"] == counted == size["code_bytes"] < 40_000  # compress.code_reserve
    # the run's own file: the code its config's switches reach (pgolf.pipeline.features), as size counted it
    own = bundle.for_config(load(REPO / "config.yaml", finished_run / "run.yaml"))
    assert (record / "train_gpt.py").read_bytes() == own and size["code_features"] == sorted(features.needed(
        load(REPO / "config.yaml", finished_run / "run.yaml")))
    assert sub["seeds"] == [1, 2] and set(sub["seed_results"]) == {"1", "2"}
    assert sub["bytes_total"] == max(r["artifact_bytes"] for r in sub["seed_results"].values()) + counted
    summary = json.loads((finished_run / "results/smoke/summary.json").read_text())
    assert sub["val_bpb"] == summary["mean"]["sliding_bpb"]
    assert (record / "train_seed1.log").read_text().startswith("training")
    assert "val_bpb" in (record / "README.md").read_text()
    # The folder's own code, config and pipeline plan the run from inside it.
    env = {**os.environ, "PYTHONPATH": str(record)}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "1", "--configfile", "config.yaml"],
                          cwd=record, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "train" in proc.stdout


def test_report_has_the_figures(finished_run):
    for name in ("loss", "bpb", "bytes"):
        assert (finished_run / f"results/smoke/plots/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = snakemake(finished_run, "--report", "report.html")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    html = (finished_run / "report.html").read_text(errors="replace")
    assert all(name in html for name in ("loss.png", "bpb.png", "bytes.png"))


def test_finished_run_plans_nothing(finished_run):
    assert planned(finished_run) == {}


def test_eval_change_reruns_only_evaluate_and_what_reports_it(finished_run):
    jobs = planned(finished_run, {"eval": {"stride": 16}})
    assert jobs == {"evaluate": 2, "aggregate": 1, "record": 1, "plots": 1, "all": 1}


def test_clip_change_reruns_from_quantize_not_calibrate(finished_run):
    assert stage_file(finished_run, "smoke", 1, "calibrate", "hessians.pgt").exists()
    jobs = planned(finished_run, {"quant": {"clip_k": {"mlp": 9.5}}})
    assert jobs == {"quantize": 2, "compress": 2, "size": 2, "evaluate": 2, "aggregate": 1, "record": 1,
                    "plots": 1, "all": 1}


def test_calibration_change_recollects_the_hessians(finished_run):
    jobs = planned(finished_run, {"calibrate": {"seqs": 4}})
    assert jobs["calibrate"] == 2 and jobs["quantize"] == 2 and "train" not in jobs


def test_codec_change_reruns_from_compress(finished_run):
    jobs = planned(finished_run, {"compress": {"codec": "lzma"}})
    assert jobs == {"compress": 2, "size": 2, "evaluate": 2, "aggregate": 1, "record": 1, "plots": 1, "all": 1}


def test_train_change_retrains_but_keeps_data(finished_run):
    jobs = planned(finished_run, {"train": {"iterations": 30}})
    assert jobs["train"] == 2 and "shards" not in jobs and "tokenizer" not in jobs


def test_bad_config_fails_before_any_job(finished_run):
    (finished_run / "bad.yaml").write_text(yaml.safe_dump({"train": {"iterationz": 3}}))
    proc = snakemake(finished_run, "-n", configs=("run.yaml", "bad.yaml"))
    assert proc.returncode != 0
    assert "train: Additional properties are not allowed ('iterationz'" in proc.stdout + proc.stderr
    (finished_run / "twice.yaml").write_text("eval: {stride: 32}\neval: {seq_len: 64}\n")
    proc = snakemake(finished_run, "-n", configs=("run.yaml", "twice.yaml"))
    assert proc.returncode != 0 and "duplicate key 'eval'" in proc.stdout + proc.stderr


def test_ordered_loader_adds_the_probe_and_retrains_only(finished_run):
    jobs = planned(finished_run, {"loader": {"mode": "ordered", "order": "hardest"}})
    assert jobs["probe_train"] == 1 and jobs["shard_order"] == 1 and jobs["train"] == 2
    assert "shards" not in jobs and "tokenizer" not in jobs
    given = planned(finished_run, {"loader": {"mode": "ordered", "order": "given", "shard_order": [0]}})
    assert "probe_train" not in given and given["train"] == 2


def test_a_rerun_baseline_reruns_the_comparison(finished_run, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(finished_run, work, symlinks=True)
    (work / "results/base").mkdir()
    shutil.copy2(work / "results/smoke/summary.json", work / "results/base/summary.json")
    (work / "base.yaml").write_text(yaml.safe_dump({"compare": {"baseline_run": "base"}}))
    proc = snakemake(work, configs=("run.yaml", "base.yaml"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert planned(work, {"compare": {"baseline_run": "base"}}) == {}
    base = json.loads((work / "results/base/summary.json").read_text())
    base["mean"]["sliding_bpb"] += 0.01  # the baseline run finished again, with another score
    (work / "results/base/summary.json").write_text(json.dumps(base))
    assert planned(work, {"compare": {"baseline_run": "base"}})["aggregate"] == 1


def test_a_run_under_another_name_shares_every_stage_job(finished_run):
    """Stage jobs are named by what they depend on, not by the run: a renamed run only reports."""
    assert planned(finished_run, {"run": "renamed"}) == {"aggregate": 1, "record": 1, "plots": 1, "all": 1}
    jobs = planned(finished_run, {"run": "renamed", "compress": {"codec": "lzma"}})
    assert jobs == {"compress": 2, "size": 2, "evaluate": 2, "aggregate": 1, "record": 1, "plots": 1, "all": 1}


STUDY = {"run": "study", "study": {"level": 0.25, "variants": {
    "lzma": {"compress": {"codec": "lzma"}},  # quantization onwards: trains nothing
    "stride": {"eval": {"stride": 16}},  # evaluation only: reuses calibration, quantization, compression
    "wide": {"model": {"model_dim": 48}},  # a new training
}}}


def test_a_study_plans_each_shared_job_once(finished_run):
    jobs = planned(finished_run, STUDY)
    # the baseline's stage jobs are the finished run's; each variant adds only where it differs
    assert jobs == {"train": 2, "calibrate": 2, "quantize": 2, "compress": 4, "size": 4, "evaluate": 6,
                    "aggregate": 4, "record": 4, "plots": 4, "study": 1, "all": 1}


def test_a_study_compares_every_variant_with_its_baseline(finished_run, tmp_path):
    study = {"run": "study2", "study": {"level": 0.25, "variants": {"stride": {"eval": {"stride": 16}}}}}
    (finished_run / "study2.yaml").write_text(yaml.safe_dump(study))
    proc = snakemake(finished_run, configs=("run.yaml", "study2.yaml"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    root = finished_run / "results/study2"
    c = json.loads((root / "comparison.json").read_text())
    assert c["baseline"]["variant"] == "baseline" and [r["variant"] for r in c["variants"]] == ["stride"]
    row, base = c["variants"][0], json.loads((root / "baseline/summary.json").read_text())
    var = json.loads((root / "stride/summary.json").read_text())
    assert row["delta_bpb"]["delta"] == pytest.approx(var["mean"]["sliding_bpb"] - base["mean"]["sliding_bpb"])
    assert row["delta_bpb"]["low"] < row["delta_bpb"]["delta"] < row["delta_bpb"]["high"]
    assert 0 <= row["p"] <= 1 and row["p_holm"] == pytest.approx(min(1.0, row["p"]))
    assert "record bar" in (root / "comparison.md").read_text() or "Record bar" in (root / "comparison.md").read_text()
    assert (root / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # the baseline is the finished run: the same training and artifact, found through stages.json
    for seed in (1, 2):
        for stage in ("train", "compress"):
            assert stage_file(finished_run, "study2/baseline", seed, stage, "") == \
                stage_file(finished_run, "study2/stride", seed, stage, "") == \
                stage_file(finished_run, "smoke", seed, stage, "")
        assert stage_file(finished_run, "study2/stride", seed, "evaluate", "") != \
            stage_file(finished_run, "smoke", seed, "evaluate", "")
    # each variant's record folder stands on its own: its submission, seed logs and code
    record = root / "stride/record"
    sub = json.loads((record / "submission.json").read_text())
    assert sub["val_bpb"] == var["mean"]["sliding_bpb"] and (record / "train_seed1.log").exists()
    assert (record / "train_gpt.py").exists()
