"""SLURM resources from the site's settings and the run's config, and what the profile submits (dry runs).

The real cluster run is tests/test_slurm.py (slow)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import link_fixtures

from pgolf.config import load
from pgolf.errors import PgolfError
from pgolf.pipeline.cluster import read_site, resources, threads
from pgolf.pipeline.stages import STAGES

REPO = Path(__file__).resolve().parent.parent
SITE = ["tmpdir=system_tmpdir", "slurm_partition=cpu", "slurm_account=none", "gpu_partition=gpu",
        "gpus_per_node=4", "cpus_per_task=6", "mem_mb=16000", "mem_mb_per_gpu=30000", "runtime=60"]


def site(**over):
    args = [a for a in SITE if a.split("=")[0] not in over] + [f"{k}={v}" for k, v in over.items()]
    return read_site(args, "site.yaml")


def test_a_run_without_a_partition_is_local():
    assert read_site(["tmpdir=system_tmpdir", "mem_mb=1000"]) is None
    assert resources("train", load(REPO / "config.yaml"), None) == {}
    assert threads("train", None, 7) == 7


@pytest.mark.parametrize("key,value", [("slurm_partition", "<cpu-partition>"), ("slurm_account", "'<account>'"),
                                       ("gpu_partition", '"<gpu-partition>"'), ("slurm_account", "your-account")])
def test_a_placeholder_is_refused_by_name(key, value):
    with pytest.raises(PgolfError, match=f"site.yaml: default-resources {key}=.* is a placeholder"):
        site(**{key: value})


def test_missing_and_malformed_site_keys_are_refused():
    with pytest.raises(PgolfError, match="lacks gpu_partition"):
        read_site([a for a in SITE if not a.startswith("gpu_partition")], "site.yaml")
    with pytest.raises(PgolfError, match="cpus_per_task='eight' is not a whole number"):
        site(cpus_per_task="eight")


def test_cpu_preset_runs_on_the_cpu_partition_with_site_threads():
    cfg = load(REPO / "configs" / "smoke.yaml")
    s = site()
    train = resources("train", cfg, s)
    assert train["slurm_partition"] == "cpu" and train["nodes"] == 1
    assert train["cpus_per_task"] == 6 and threads("train", s, 64) == 6  # never the submitting host's 64
    assert resources("quantize", cfg, s)["cpus_per_task"] == 1 and threads("quantize", s, 64) == 1
    assert train["slurm_account"] == ""  # "none": submitted without -A
    assert all(resources(stage, cfg, s) == {} for stage in (t.name for t in STAGES if t.local))


def test_cuda_preset_asks_its_gpus_of_one_node():
    cfg = load(REPO / "configs" / "pr549.yaml")
    cfg["train"]["nproc"] = 4
    s = site(slurm_account="golf")
    train = resources("train", cfg, s)
    assert (train["slurm_partition"], train["nodes"], train["mem_mb"]) == ("gpu", 1, 120000)
    assert train["slurm_account"] == "golf" and train["cpus_per_task"] == 4 * 6  # the site's cores per GPU
    assert train["runtime"] >= 2 * cfg["train"]["max_wallclock_seconds"] / 60  # twice the budget, at least
    calibrate = resources("calibrate", cfg, s)
    assert calibrate["mem_mb"] == 30000 and calibrate["slurm_partition"] == "gpu"
    cfg["train"]["nproc"] = 8
    with pytest.raises(PgolfError, match="train.nproc=8: train would ask for 8 GPUs on one node.*gpus_per_node is 4"):
        resources("train", cfg, s)


def site_profile(tmp_path: Path, **over) -> Path:
    """A profile holding only a site's default-resources, layered after profiles/slurm."""
    values = dict(a.split("=", 1) for a in SITE if not a.startswith("tmpdir")) | over
    values = {k: int(v) if str(v).isdigit() else v for k, v in values.items()}
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "profile.yaml").write_text(yaml.safe_dump({"default-resources": values}))
    return tmp_path / "site"


def dry_run(tmp_path: Path, preset: str, *profiles: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    link_fixtures(tmp_path / "w")
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / "w"), "-n", "-p",
           *(a for p in profiles for a in ("--profile", str(p))), "--configfile", str(REPO / "configs" / preset)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def test_shipped_profile_refuses_its_placeholders_before_submitting(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    proc = dry_run(tmp_path, "smoke.yaml", REPO / "profiles" / "slurm")
    assert proc.returncode != 0
    assert "default-resources slurm_partition='<cpu-partition>' is a placeholder" in proc.stdout + proc.stderr


def jobs(out: str) -> dict[str, str]:
    """Each planned rule's resources line, by rule (group jobs listed by their member rules)."""
    found, rule = {}, None
    for line in out.splitlines():
        s = line.strip()
        if s.startswith(("rule ", "localrule ")):
            rule = s.split()[1].rstrip(":")
        elif s.startswith("resources:") and rule:
            found.setdefault(rule, s)
    return found


def test_smoke_preset_through_slurm_stays_on_cpu(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    proc = dry_run(tmp_path, "smoke.yaml", REPO / "profiles" / "slurm", site_profile(tmp_path))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "--device cpu" in out and "--device cuda" not in out  # the preset's device, not the profile's
    res = jobs(out)
    assert "slurm_partition=cpu" in res["train"] and "nodes=1" in res["train"] and "gpu=0" in res["train"]
    assert "cpus_per_task=6" in res["train"]
    assert "Group job seed" in out and "Group job data" in out


def test_cuda_preset_through_slurm_trains_on_the_gpu_partition(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    proc = dry_run(tmp_path, "pr549.yaml", REPO / "profiles" / "slurm", site_profile(tmp_path, gpus_per_node=8))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    res = jobs(out)
    for rule in ("train", "evaluate"):
        assert "slurm_partition=gpu" in res[rule] and "gpu=8" in res[rule] and "nodes=1" in res[rule], res[rule]
    assert "--nproc-per-node 8" in out and "--device cuda" in out
