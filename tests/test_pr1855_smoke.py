"""configs/pr1855-smoke.yaml end to end under Snakemake: PR #1855's whole stack, only smaller, on the
fixture corpus; its outputs are sane and `pgolf audit` passes its phased TTT."""

import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import stage_file

from pgolf.config import load
from pgolf.eval.bpb import build_byte_luts
from pgolf.eval.evaluate import val_tokens
from pgolf.formats import tensorfile
from pgolf.formats.shards import load_sidecar
from pgolf.pipeline import bundle
from pgolf.quant.artifact import read_header, read_tensors

REPO = Path(__file__).resolve().parent.parent
PRESET, SMOKE = REPO / "configs" / "pr1855.yaml", REPO / "configs" / "pr1855-smoke.yaml"
RUN = "results/pr1855-smoke"
DATASET, TOKENIZER = "data/datasets/smoke_sp320_caseops", "data/tokenizers/smoke_sp320_caseops.model"

# What the smoke variant may change: sizes, step counts, where it runs and on what data. Every other
# key, each of the record's switches among them, resolves as in the preset.
SHRUNK = {
    "run", "seeds", "device", "data.source", "data.name", "data.paths", "data.val_fraction", "data.shard_tokens",
    "tokenizer.vocab_size", "model.num_layers", "model.model_dim", "model.num_heads", "model.num_kv_heads",
    "model.xsa_last_n", "model.rope_dims", "model.recur_layers", "model.parallel_from",
    "train.nproc", "train.seq_len", "train.batch_tokens", "train.micro_batch_seqs", "train.iterations",
    "train.max_wallclock_seconds", "train.prime_steps", "train.muon_momentum_warmup_steps", "train.ema_decay",
    "train.checkpoint_every", "train.log_every", "calibrate.batches", "calibrate.seqs", "calibrate.seq_len",
    "quant.min_numel", "quant.block_size", "eval.seq_len", "eval.stride", "eval.batch_seqs", "eval.max_tokens",
    "eval.ttt.lora_rank", "eval.ttt.lora_alpha", "eval.ttt.lora_docs", "eval.ttt.phases", "eval.ttt.phase_docs",
    "eval.ttt.chunk_tokens", "eval.ttt.batch_seqs", "compare.baseline_mean", "compare.baseline_std",
    "record.check",  # one seed can never pass pgolf check's three: the smoke run reports the check
}


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The finished run's folder."""
    workdir = tmp_path_factory.mktemp("pr1855_smoke")
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["data"]["paths"] = [str(REPO / p) for p in cfg["data"]["paths"]]
    cfg["extends"] = str(PRESET)  # the copy is elsewhere
    (workdir / "run.yaml").write_text(yaml.safe_dump(cfg))
    # One core: on a loaded 2-core machine a job's two OpenMP threads wait on each other, and phased
    # TTT, hundreds of tiny steps, ran 8x slower (59 s against 5 s).
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "1",
           "--configfile", str(workdir / "run.yaml")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=workdir)
    if proc.returncode:
        logs = "".join(f"\n== {p}\n{p.read_text()[-1500:]}" for p in sorted(workdir.glob("results/stages/*/*/*.log")))
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{proc.stderr[-3000:]}{logs}")
    return workdir


def seed_file(run: Path, stage: str, name: str) -> Path:
    """A file of seed 1's job of `stage` in the finished run."""
    return stage_file(run, RUN.removeprefix("results/"), 1, stage, name)


def test_the_smoke_variant_keeps_every_part_of_the_preset():
    preset, smoke = flatten(load(PRESET)), flatten(load(SMOKE))
    changed = {k for k in preset if smoke[k] != preset[k]}
    assert changed <= SHRUNK, sorted(changed - SHRUNK)
    assert smoke["tokenizer.caseops"] and smoke["eval.ttt.mode"] == "phased_lora" and smoke["model.doc_attention"]
    assert smoke["model.recur_start_frac"] == 0.35 and smoke["train.max_wallclock_seconds"] == 0  # by iterations


def test_every_stage_runs_and_scores_below_a_uniform_guess(run):
    ev = json.loads(seed_file(run, "evaluate", "eval.json").read_text())
    for part in ("pre_quant", "post_quant", "sliding", "ttt"):
        bpb = ev[part]["val_bpb"]
        uniform = math.log2(320) * ev[part]["tokens"] / ev[part]["bytes"]  # bits of a uniform guess per byte
        assert math.isfinite(bpb) and 0 < bpb < uniform, (part, bpb, uniform)
    assert ev["ttt"]["phases"] == 2 and ev["ttt"]["docs"] == 5  # both global phases ran on the scored documents
    summary = json.loads((run / RUN / "summary.json").read_text())
    assert summary["mean"]["ttt_bpb"] == pytest.approx(ev["ttt"]["val_bpb"])
    log = seed_file(run, "train", "train.log").read_text()
    assert "step 7: depth recurrence on" in log  # 35% of 20 iterations
    size = json.loads(seed_file(run, "size", "size.json").read_text())
    assert size["total_bytes"] == size["model_bytes"] + size["code_bytes"]


def test_bpb_counts_the_original_bytes_from_the_sidecar(run):
    ev = json.loads(seed_file(run, "evaluate", "eval.json").read_text())
    n = ev["sliding"]["tokens"]
    sidecar = load_sidecar(run / DATASET, "val")
    assert ev["sliding"]["bytes"] == ev["ttt"]["bytes"] == int(sidecar[1 : n + 1].sum())  # target i is token i + 1
    # The tokenizer's tables would count the case operators' UTF-8 bytes too: more bytes, a lower BPB.
    tokens = val_tokens(run / DATASET, n, 64)
    luts = build_byte_luts(run / TOKENIZER, 320)
    assert int(luts.count(tokens[:-1], tokens[1:], None).sum()) > ev["sliding"]["bytes"]


def test_the_artifact_holds_every_quantized_part_and_reads_back_exactly(run):
    artifact = seed_file(run, "compress", "artifact.pgz")
    header = read_header(artifact)
    assert header["codec"] == "pergroup" and len(header["streams"]) > 1
    quant, meta = tensorfile.load(seed_file(run, "quantize", "quant.pgt"))
    packed, packed_meta = read_tensors(artifact)
    assert packed_meta == meta and packed.keys() == quant.keys()
    assert all(torch.equal(packed[k], quant[k]) for k in quant)
    assert len(meta["quant"]["lqer"]) == 3 and "tok_emb.weight" in meta["quant"]["lqer"]
    gates = [k for k in meta["quant"]["bits"] if "attn_gate" in k]
    assert len(gates) == 4 and all(meta["quant"]["bits"][k] == 8 for k in gates)  # int8 rows, one per block


def test_pgolf_audit_passes_the_phased_ttt_of_the_run(run):
    # With its default 3 chunks the audit reads on until val holds 3 documents per phase, so the
    # audited targets lie in a document scored after the first global phase.
    cmd = [sys.executable, "-m", "pgolf", "audit", "--run", RUN, "--seed", "1", "--config", "run.yaml",
           "--data", DATASET, "--tokenizer", TOKENIZER]
    proc = subprocess.run(cmd, cwd=run, capture_output=True, text=True, env={**env(), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    m = re.search(r"phased TTT over (\d+) documents, batches of (\d+), phases after \[(\d+)", proc.stdout)
    assert m and int(m[1]) >= 6 and int(m[3]) < int(m[1]), proc.stdout[:500]
    assert "pgolf audit: passed" in proc.stdout


def stage_commands(run: Path, stages: tuple[str, ...]) -> list[list[str]]:
    """The stages' command lines as Snakemake runs them (a dry run's printed shell commands), each
    from its stage name on: `pgolf <stage> ...` or `pgolf launch ... -m pgolf <stage> ...`."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(run),
                           "--cores", "1", "--configfile", str(run / "run.yaml"), "-n", "-p", "--forcerun", *stages],
                          capture_output=True, text=True, env=env(), cwd=run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln.removeprefix("Shell command: ").split(" > ")[0] for ln in proc.stdout.splitlines()]
    words = [shlex.split(ln) for ln in lines if ln.startswith("pgolf ")]
    return [w[w.index(stage):] for stage in stages for w in words if stage in w]


def test_the_packed_submission_quantizes_compresses_and_scores_as_the_package_did(run, tmp_path):
    """train_gpt.py alone, in an empty folder, runs LQER, int8 rows, pergroup, the CaseOps sidecar and
    phased TTT: the same artifact bytes and BPB as the run's own stages."""
    (tmp_path / bundle.FILE_NAME).write_bytes(bundle.build())
    shutil.copy(seed_file(run, "train", "ema.pgt"), tmp_path / "ema.pgt")
    shutil.copy(seed_file(run, "calibrate", "hessians.pgt"), tmp_path / "hessians.pgt")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    clean = {k: v for k, v in env().items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    cmds = stage_commands(run, ("quantize", "compress", "evaluate"))
    assert [c[0] for c in cmds] == ["quantize", "compress", "evaluate"]
    for cmd in cmds:
        args = [str(tmp_path / Path(a).name) if a.startswith("results/stages/") else
                str(run / a) if a.startswith("data/") else a for a in cmd[1:]]
        launcher = torchrun if cmd[0] == "evaluate" else [sys.executable]
        proc = subprocess.run([*launcher, bundle.FILE_NAME, cmd[0], *args], cwd=tmp_path, env=clean,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd[0]}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "artifact.pgz").read_bytes() == seed_file(run, "compress", "artifact.pgz").read_bytes()
    theirs = json.loads(seed_file(run, "evaluate", "eval.json").read_text())
    ours = json.loads((tmp_path / "eval.json").read_text())
    for part in ("post_quant", "sliding", "ttt"):
        assert ours[part]["val_bpb"] == theirs[part]["val_bpb"], part
