"""Each profile resolves: a dry run shows the resources and commands it would submit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def dry_run(profile: str, tmp_path: Path) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n", "-p",
           "--profile", str(REPO / "profiles" / profile), "--configfile", str(REPO / "config.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def train_command(out: str) -> str:
    return next(line for line in out.splitlines() if "-m pgolf train" in line)


def test_local_profile_trains_on_cpu(tmp_path):
    cmd = train_command(dry_run("local", tmp_path))
    assert "--nproc-per-node 1" in cmd and "--device cpu" in cmd


def test_gpu_profile_runs_one_process_per_gpu(tmp_path):
    out = dry_run("gpu", tmp_path)
    assert "--nproc-per-node 8" in train_command(out) and "--device cuda" in train_command(out)
    assert "nproc=8, gpu=8" in out


def test_one_gpu_profile(tmp_path):
    cmd = train_command(dry_run("gpu1", tmp_path))
    assert "--nproc-per-node 1" in cmd and "--device cuda" in cmd


def test_slurm_profile_is_refused_until_its_site_is_filled_in(tmp_path):
    """The shipped profile holds placeholders: a dry run names the first one (tests/test_cluster.py
    layers a filled-in site profile and checks what each stage would ask)."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "-n",
           "--profile", str(REPO / "profiles" / "slurm"), "--configfile", str(REPO / "config.yaml")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "is a placeholder" in out.stdout + out.stderr


@pytest.mark.parametrize("profile,limit", [("gpu1", 1), ("gpu", 8)])
def test_every_cuda_job_holds_the_whole_gpu_limit(profile, limit, tmp_path):
    """The profile's gpu limit runs GPU jobs one at a time: each job on --device cuda asks for all of
    it, so two seeds never share a GPU by accident (calibration included)."""
    jobs = dry_run(profile, tmp_path).split("\nrule ")[1:]
    cuda = [j for j in jobs if "--device cuda" in j]
    assert {j.split(":")[0] for j in cuda} >= {"train", "calibrate", "evaluate"}
    for job in cuda:
        resources = next(line for line in job.splitlines() if line.strip().startswith("resources:"))
        assert f"gpu={limit}" in resources, job[:400]
