"""Training: learning, one process versus two, and resume after a kill."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pgolf.config import validate
from pgolf.formats import tensorfile
from pgolf.train.train import Trainer, TrainJob
from pgolf.train.train import train as train_job

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


def configs(model: dict | None = None, **train):
    cfg = validate({"model": {"num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1, **(model or {})},
                    "train": {"seq_len": 32, "batch_tokens": 32 * 8, "micro_batch_seqs": 2, "iterations": 12,
                              "warmup_steps": 2, "warmdown_steps": 4, "checkpoint_every": 4, "log_every": 4,
                              **train}})
    return cfg["model"], cfg["train"]


def train(ds, out: Path, nproc: int = 1, stop_after: int = 0, seed: int = 7, model: dict | None = None,
          loader: str = "", order: Path | None = None, precision: str = "auto", device: str = "cpu",
          **over) -> subprocess.CompletedProcess:
    model, tr = configs(model, **over)
    cmd = [*TORCHRUN, f"--nproc-per-node={nproc}", "-m", "pgolf", "train", "--data", str(ds.dataset_dir),
           "--vocab-size", str(ds.vocab_size), "--model-cfg", json.dumps(model), "--cfg", json.dumps(tr),
           "--seed", str(seed), "--device", device, "--precision", precision, "--out-dir", str(out),
           "--ckpt-dir", str(out / "ckpt")]
    if stop_after:
        cmd += ["--stop-after-step", str(stop_after)]
    cmd += ["--loader-cfg", loader or json.dumps(validate({})["loader"])]
    if loader:
        cmd += ["--shard-order", str(order or "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if not stop_after and proc.returncode:
        pytest.fail(f"training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def losses(out: Path) -> list[float]:
    return pq.read_table(out / "metrics.parquet").column("loss").to_pylist()


@pytest.fixture(scope="module")
def baseline(tiny_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    train(tiny_dataset, out)
    return out


def test_training_lowers_the_loss_and_writes_outputs(baseline):
    ls = losses(baseline)
    assert len(ls) == 12 and ls[-1] < ls[0] - 0.5
    summary = json.loads((baseline / "train.json").read_text())
    assert summary["steps"] == 12 and summary["tokens"] == 12 * 256 and summary["grad_accum"] == 4
    ema, meta = tensorfile.load(baseline / "ema.pgt")
    raw, _ = tensorfile.load(baseline / "raw.pgt")
    assert meta["step"] == 12 and meta["vocab_size"] == 320
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


def test_two_processes_match_one(baseline, tiny_dataset, tmp_path):
    """Same global batch and seed: 2 gloo processes with 2 micro-steps each == 1 process with 4."""
    train(tiny_dataset, tmp_path, nproc=2)
    assert json.loads((tmp_path / "train.json").read_text())["world_size"] == 2
    torch.testing.assert_close(losses(tmp_path), losses(baseline), rtol=1e-4, atol=1e-5)
    a, _ = tensorfile.load(tmp_path / "ema.pgt")
    b, _ = tensorfile.load(baseline / "ema.pgt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_the_typed_entry_trains_as_the_command_line_does(baseline, tiny_dataset, tmp_path):
    """`train(TrainJob)` in this process, no argv: the baseline's run; a loader section without its
    mode fails at once (the schema holds the defaults, the trainer assumes none)."""
    model, tr = configs()
    job = TrainJob(model_cfg=model, train_cfg=tr, loader_cfg=validate({})["loader"],
                   data=Path(tiny_dataset.dataset_dir), vocab_size=tiny_dataset.vocab_size, seed=7, device="cpu",
                   precision="auto", out_dir=tmp_path, ckpt_dir=tmp_path / "ckpt", shard_order=None)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        train_job(job)
    finally:  # the trainer's preemption hook must not outlive it in pytest's own process
        signal.signal(signal.SIGTERM, handler)
    torch.testing.assert_close(losses(tmp_path), losses(baseline), rtol=1e-5, atol=1e-6)
    assert (tmp_path / "ckpt" / "latest.pt").exists()
    with pytest.raises(KeyError, match="mode"):
        Trainer(dataclasses.replace(job, loader_cfg={}, ckpt_dir=None))


def test_killed_training_resumes_to_the_same_result(baseline, tiny_dataset, tmp_path):
    proc = train(tiny_dataset, tmp_path, stop_after=6)  # dies after step 6; last checkpoint at step 4
    assert proc.returncode != 0 and not (tmp_path / "ema.pgt").exists()
    proc = train(tiny_dataset, tmp_path)
    assert "resumed" in proc.stdout and "at step 4" in proc.stdout
    assert losses(tmp_path) == losses(baseline)
    a, _ = tensorfile.load(tmp_path / "ema.pgt")
    b, _ = tensorfile.load(baseline / "ema.pgt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_of_another_config_is_not_resumed(tiny_dataset, tmp_path):
    train(tiny_dataset, tmp_path, stop_after=5)
    proc = train(tiny_dataset, tmp_path, matrix_lr=0.02)
    assert "starting fresh" in proc.stdout and "resumed" not in proc.stdout
    assert len(losses(tmp_path)) == 12


def test_sigterm_writes_a_checkpoint_and_the_rerun_resumes(tiny_dataset, tmp_path):
    """A scheduler's preemption: SIGTERM mid-run, then the resubmitted job finishes the same run."""
    over = {"iterations": 40, "checkpoint_every": 1000}  # no periodic checkpoint: only SIGTERM writes one
    model, tr = configs(**over)
    cmd = [sys.executable, "-m", "pgolf", "train", "--data", str(tiny_dataset.dataset_dir), "--vocab-size", "320",
           "--model-cfg", json.dumps(model), "--cfg", json.dumps(tr), "--seed", "7", "--device", "cpu",
           "--out-dir", str(tmp_path / "a"), "--ckpt-dir", str(tmp_path / "a" / "ckpt"),
           "--loader-cfg", json.dumps(validate({})["loader"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step 4/"):
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143 and "SIGTERM: checkpoint written" in out
    assert not (tmp_path / "a" / "ema.pgt").exists()
    rerun = train(tiny_dataset, tmp_path / "a", **over)
    assert "resumed" in rerun.stdout
    train(tiny_dataset, tmp_path / "b", **over)
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
