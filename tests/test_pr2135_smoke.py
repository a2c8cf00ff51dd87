"""configs/pr2135-smoke.yaml end to end under Snakemake: PR #2135's stack, only smaller, on the fixture
corpus; its parts reach the outputs, and the packed train_gpt.py alone gives the same artifact and BPB.
As lean as tests/test_pr1855_smoke.py allows: one run, read by two tests."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import stage_file
from test_pr1855_smoke import SHRUNK as SHRUNK_1855
from test_pr1855_smoke import env, flatten, stage_commands

from pgolf.config import load
from pgolf.formats import tensorfile
from pgolf.pipeline import bundle
from pgolf.quant.artifact import read_tensors

REPO = Path(__file__).resolve().parent.parent
PRESET, SMOKE = REPO / "configs" / "pr2135.yaml", REPO / "configs" / "pr2135-smoke.yaml"
RUN = "pr2135-smoke"

# What the smoke variant may change: what pr1855-smoke may, less the phase count (#2135 runs one), and
# the tilt's context length (15 tokens never recur in 6,144).
SHRUNK = SHRUNK_1855 - {"eval.ttt.phases"} | {"eval.ngram_tilt.order"}


def test_the_smoke_variant_keeps_every_part_of_the_preset():
    preset, smoke = flatten(load(PRESET)), flatten(load(SMOKE))
    assert {k for k in preset if smoke[k] != preset[k]} <= SHRUNK
    assert smoke["calibrate.batches"] and smoke["eval.seq_len"] > smoke["train.seq_len"]  # as 2,560 > 2,048


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """The finished run's folder."""
    workdir = tmp_path_factory.mktemp("pr2135_smoke")
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["data"]["paths"] = [str(REPO / p) for p in cfg["data"]["paths"]]
    cfg["extends"] = str(PRESET)
    (workdir / "run.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "1",
           "--configfile", str(workdir / "run.yaml")]  # one core: see tests/test_pr1855_smoke.py
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=workdir)
    if proc.returncode:
        logs = "".join(f"\n== {p}\n{p.read_text()[-1500:]}" for p in sorted(workdir.glob("results/stages/*/*/*.log")))
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{proc.stderr[-3000:]}{logs}")
    return workdir


def seed_file(run: Path, stage: str, name: str) -> Path:
    return stage_file(run, RUN, 1, stage, name)


def test_every_stage_runs_with_the_records_parts(run):
    ev = json.loads(seed_file(run, "evaluate", "eval.json").read_text())
    for part in ("pre_quant", "post_quant", "sliding", "ttt"):
        uniform = math.log2(320) * ev[part]["tokens"] / ev[part]["bytes"]
        assert 0 < ev[part]["val_bpb"] < uniform, (part, ev[part]["val_bpb"], uniform)
    assert ev["ttt"]["phases"] == 1 and ev["ttt"]["docs"] == 5 and ev["sliding"]["seq_len"] == 80
    for part in ("sliding", "ttt"):  # the n-gram tilt scores both scored passes, and fires
        tilted = ev[f"{part}_ngram"]
        assert tilted["hinted"] > 50 and tilted["tokens"] == ev[part]["tokens"] and tilted["gain_bpb"] != 0
    sub = json.loads((run / "results" / RUN / "record" / "submission.json").read_text())
    assert sub["metric"] == "ttt_ngram_bpb" and sub["val_bpb"] == ev["ttt_ngram"]["val_bpb"]  # the record's score
    _, meta = tensorfile.load(seed_file(run, "calibrate", "hessians.pgt"))
    assert meta["tokens"] == 2 * 16 * 64  # calibrate.batches: 2 of the training micro-batch's 16 x 64
    for name in ("ema.pgt", "raw.pgt"):  # training leaves the asymmetric caps where they started
        weights, _ = tensorfile.load(seed_file(run, "train", name))
        assert weights["softcap_pos"].item() == weights["softcap_neg"].item() == 30.0
    packed, qmeta = read_tensors(seed_file(run, "compress", "artifact.pgz"))
    assert packed["softcap_pos"].item() == 30.0  # stored with the control tensors
    assert not [k for k in qmeta["quant"]["bits"] if "attn_gate" in k]  # fp16 gate rows, not int8
    assert len(qmeta["quant"]["lqer"]) == 3


def test_the_packed_submission_quantizes_compresses_and_scores_as_the_package_did(run, tmp_path):
    (tmp_path / bundle.FILE_NAME).write_bytes(bundle.build())
    for stage, name in (("train", "ema.pgt"), ("calibrate", "hessians.pgt")):
        shutil.copy(seed_file(run, stage, name), tmp_path / name)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
    clean = {k: v for k, v in env().items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    for cmd in stage_commands(run, ("quantize", "compress", "evaluate")):
        args = [str(tmp_path / Path(a).name) if a.startswith("results/stages/") else
                str(run / a) if a.startswith("data/") else a for a in cmd[1:]]
        launcher = torchrun if cmd[0] == "evaluate" else [sys.executable]
        proc = subprocess.run([*launcher, bundle.FILE_NAME, cmd[0], *args], cwd=tmp_path, env=clean,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{cmd[0]}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "artifact.pgz").read_bytes() == seed_file(run, "compress", "artifact.pgz").read_bytes()
    theirs = json.loads(seed_file(run, "evaluate", "eval.json").read_text())
    ours = json.loads((tmp_path / "eval.json").read_text())
    for part in ("post_quant", "sliding", "ttt", "sliding_ngram", "ttt_ngram"):
        assert ours[part]["val_bpb"] == theirs[part]["val_bpb"], part
