import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pgolf.config import validate
from pgolf.data import documents, shards, tokenizer
from pgolf.formats import tensorfile
from pgolf.model.gpt import GPT
from pgolf.quant.compress import compress
from pgolf.quant.quantize import quantize

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> SimpleNamespace:
    """Documents, a 320-token tokenizer and shards built from the fixture corpus by the real stages."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = validate({"data": {"source": "local", "paths": [str(FIXTURES / "corpus")], "val_fraction": 0.1,
                             "shard_tokens": 20000}, "tokenizer": {"vocab_size": 320}})
    docs, tok, ds = root / "docs.parquet", root / "tok.model", root / "dataset"
    documents.build(cfg["data"], None, docs)
    tokenizer.train(docs, cfg["tokenizer"], tok)
    shards.build(docs, tok, cfg["data"], ds)
    return SimpleNamespace(docs=docs, tokenizer=tok, dataset_dir=ds, vocab_size=320, config=cfg)


@pytest.fixture(scope="session")
def small_model(tiny_dataset):
    torch.manual_seed(0)
    cfg = validate({"model": {"num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1}})["model"]
    model = GPT(tiny_dataset.vocab_size, cfg)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="session")
def setup(tiny_dataset, small_model, tmp_path_factory):
    """EMA weights, quantized file and artifact of the small model, as the pipeline writes them."""
    d = tmp_path_factory.mktemp("eval")
    tensorfile.save(d / "ema.pgt", small_model.state_dict(), {**small_model.meta(), "step": 0, "seed": 0})
    int8 = {g: 8 for g in ("embed", "attn", "mlp", "other")}
    quant = {"method": "rtn", "clip": "quantile", "bits": int8, "clip_quantile": 1.0, "min_numel": 256}
    quantize(d / "ema.pgt", validate({"quant": quant})["quant"], d / "q.pgt")
    compress(d / "q.pgt", {**validate({})["compress"], "codec": "zstd", "level": 3}, d / "a.pgz")
    return argparse.Namespace(data=tiny_dataset.dataset_dir, tokenizer=tiny_dataset.tokenizer,
                              ema=d / "ema.pgt", artifact=d / "a.pgz")


def evaluate_on_two_processes(setup, cfg: dict, out: Path) -> dict:
    """`pgolf evaluate` under torchrun with 2 gloo processes; its eval.json."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "pgolf",
           "evaluate", "--cfg", json.dumps(cfg), "--device", "cpu", "--out", str(out)]
    for key in ("data", "tokenizer", "ema", "artifact"):
        cmd += [f"--{key}", str(getattr(setup, key))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


SEED_FILE_NAMES = {"eval": "eval.json", "size": "size.json", "train": "train.json", "metrics": "metrics.parquet",
                   "quant": "quant.pgt", "artifact": "artifact.pgz"}


from pgolf.formats.results import write_result  # noqa: E402
from pgolf.pipeline.plan import stage_dir  # noqa: E402


def run_files(run_dir: Path, seeds: list[int], kinds: tuple[str, ...] = ("eval", "size", "train")) -> dict:
    """seed -> kind -> path in a run folder's layout, as the report rules declare them; kind `log` is
    logs/train_seed<S>.log."""
    def path(s: int, kind: str) -> Path:
        if kind == "log":
            return run_dir / "logs" / f"train_seed{s}.log"
        return run_dir / f"seed{s}" / SEED_FILE_NAMES[kind]
    return {s: {k: path(s, k) for k in kinds} for s in seeds}


def stage_file(workdir: Path, run: str, seed: int, stage: str, name: str) -> Path:
    """A file of a finished run's stage job: its folder from results/<run>/stages.json."""
    return Path(stage_dir(workdir / "results" / run, seed, stage)) / name


def link_fixtures(workdir: Path) -> Path:
    """The repository's tests/fixtures inside a Snakemake working directory: the smoke presets'
    corpus (data.paths: tests/fixtures/corpus) is read relative to it, and listed before any job."""
    (workdir / "tests").mkdir(parents=True, exist_ok=True)
    link = workdir / "tests" / "fixtures"
    if not link.exists():
        link.symlink_to(Path(__file__).resolve().parent / "fixtures")
    return workdir


def place_artifact(run: Path, seed: int, artifact: Path) -> Path:
    """A run folder with `artifact` as seed's compress output, found through its stages.json as the
    pipeline leaves it (results/stages/compress/<key>/ beside results/<run>/)."""
    job = run.parent / "stages" / "compress" / f"seed{seed}"
    job.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(artifact, job / "artifact.pgz")
    run.mkdir(parents=True, exist_ok=True)
    write_result(run / "stages.json", {str(seed): {"compress": os.path.relpath(job, run)}})
    return job / "artifact.pgz"


def seed_argv(files: dict) -> list:
    """The report stages' --seeds and per-kind options for `files` (run_files)."""
    seeds = list(files)
    argv: list = ["--seeds", *seeds]
    for kind in next(iter(files.values())):
        argv += [f"--{kind}", *(files[s][kind] for s in seeds)]
    return argv
