"""`pgolf check`: a record folder built on purpose for each failure the challenge's audit found (over
the byte cap with a claim under it, training plus calibration over 600 s, a missing seed log, a val
document inside a train shard, a non-canonical val count, a mean the logs do not give) fails with a
one-line reason naming the file; a clean folder passes; `pgolf record` puts the table in its README
and fails when a check does."""

import json
import os
import random
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import seed_argv

from pgolf.config import validate
from pgolf.data.overlap import documents, find_overlap
from pgolf.formats.results import write_result
from pgolf.formats.shards import write_shard
from pgolf.report import check, scorefirst, seedlog

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SEEDS = (1, 2, 3)
SCORES = {1: 1.10012345, 2: 1.10034567, 3: 1.09998765}
CASEOPS = "sp8192_lossless_caps_caseops_v1_reserved"


def run(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgolf", *map(str, argv)], capture_output=True, text=True, env=ENV)


def seed_log(seed: int, bpb: float, train_ms: int = 588_000, hessians_s: float = 3.5, eval_s: float = 420.0,
             model: int = 15_900_000, code: int = 30_000, val_tokens: int = 47_851_520) -> str:
    """A seed log in the form of the CaseOps records' (PR #1855's lines)."""
    return "\n".join([
        "Hyperparameters:", f"  seed: {seed}",
        f"  val_files: ./data/datasets/fineweb10B_{CASEOPS}/fineweb_val_*.bin",
        f"val_tokens: {val_tokens}",
        "500/20000 train_loss: 2.5615 train_time: 0.8m tok/s: 8217810",
        "4900/20000 val_loss: 2.3539 val_bpb: 1.0756",
        f"stopping_early: wallclock_cap train_time: {train_ms}ms step: 4900/20000",
        f"diagnostic pre-quantization post-ema val_loss:2.32848665 val_bpb:{bpb - 0.01:.8f} eval_time:6718ms",
        f"Code size (compressed): {code} bytes",
        f"GPTQ:collected 67 Hessians in {hessians_s}s",
        f"Serialized model quantized+brotli: {model} bytes",
        f"Total submission size quantized+brotli: {model + code} bytes",
        f"quantized_ttt_phased val_loss:{bpb * 2.186:.8f} val_bpb:{bpb:.8f} eval_time:{int(eval_s * 1000)}ms",
        f"total_eval_time:{eval_s}s", ""])


def record_folder(root: Path, **log_kw) -> Path:
    """A clean 3-seed record folder: a readable train_gpt.py, submission.json, a log per seed."""
    d = root / "record"
    d.mkdir(parents=True)
    (d / "train_gpt.py").write_text("import os\n" + "\n".join(f"X{i} = {i} * 2  # a line of code" for i in range(400)))
    for s in SEEDS:
        (d / f"train_seed{s}.log").write_text(seed_log(s, SCORES[s], **log_kw))
    values = list(SCORES.values())
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    sub = {"name": "test", "val_bpb": round(mean, 8), "val_bpb_std": round(std, 8), "seeds": list(SEEDS),
           "seed_results": {str(s): {"val_bpb": SCORES[s]} for s in SEEDS}, "bytes_total": 15_930_000}
    (d / "submission.json").write_text(json.dumps(sub, indent=2))
    return d


def failures(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("pgolf check: ")]


def assert_fails(proc: subprocess.CompletedProcess, name: str, *mentions) -> str:
    """Exit 1, no traceback, a `pgolf check: <check>: ...` line naming each of `mentions`."""
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in failures(proc) if line.startswith(f"pgolf check: {name}: ")]
    assert any(all(str(m) in line for m in mentions) for line in lines), proc.stdout + proc.stderr
    return lines[0]


def rows(proc: subprocess.CompletedProcess) -> dict[str, str]:
    out = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 3 and cells[0] not in ("check", "---"):
            out[cells[0]] = cells[1]
    return out


def test_a_clean_folder_passes(tmp_path):
    proc = run("check", record_folder(tmp_path), "--no-score-first")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert rows(proc) == {"bytes": "pass", "time": "pass", "seeds": "pass", "significance": "not checked",
                          "data": "pass", "score-first": "not checked"}
    assert "training + calibration at most 591.5 s" in proc.stdout  # 588 s + 3.5 s of Hessians
    assert "47,851,520" in proc.stdout and not failures(proc)


def test_over_the_byte_cap_with_a_claim_under_it(tmp_path):
    d = record_folder(tmp_path, model=15_995_000, code=1_000)  # the log counts 1,000 bytes of code
    (d / "train_gpt.py").write_bytes(random.Random(0).randbytes(10_000))  # the folder's: 10,000, incompressible
    proc = run("check", d, "--no-score-first")
    assert_fails(proc, "bytes", "train_seed1.log:", "16,005,000 bytes, over the 16,000,000-byte cap",
                 "the log claims 15,996,000")
    assert_fails(proc, "bytes", "submission.json: bytes_total 15,930,000 is under the cap")
    assert rows(proc)["time"] == "pass"


def test_training_plus_calibration_over_600_s(tmp_path):
    proc = run("check", record_folder(tmp_path, train_ms=598_000, hessians_s=4.7), "--no-score-first")
    assert_fails(proc, "time", "train_seed1.log: training 598.000 s + GPTQ calibration 4.700 s = 602.700 s, "
                 "over 600 s")


def test_evaluation_over_600_s(tmp_path):
    proc = run("check", record_folder(tmp_path, eval_s=612.5), "--no-score-first")
    assert_fails(proc, "time", "train_seed2.log: evaluation 612.5 s (total_eval_time), over 600 s")


def test_a_missing_seed_log(tmp_path):
    d = record_folder(tmp_path)
    (d / "train_seed3.log").unlink()
    proc = run("check", d, "--no-score-first")
    assert_fails(proc, "seeds", "train_seed3.log: missing: submission.json claims seed 3")
    assert_fails(proc, "seeds", "2 seed log(s) with a final score (train_seed1.log, train_seed2.log); at least 3")


def test_a_mean_that_does_not_match_the_logs(tmp_path):
    d = record_folder(tmp_path)
    sub = json.loads((d / "submission.json").read_text())
    sub["val_bpb"] = 1.0995  # rounded the wrong way: the logs' mean is 1.10015226
    (d / "submission.json").write_text(json.dumps(sub))
    proc = run("check", d, "--no-score-first")
    assert_fails(proc, "seeds", "submission.json: val_bpb 1.0995 is not the mean of the seed logs' final scores, "
                 "1.10015226")


def test_a_seed_score_the_log_does_not_hold(tmp_path):
    d = record_folder(tmp_path)
    sub = json.loads((d / "submission.json").read_text())
    sub["seed_results"]["2"]["val_bpb"] = 1.0901
    (d / "submission.json").write_text(json.dumps(sub))
    assert_fails(run("check", d, "--no-score-first"), "seeds",
                 "seed_results.2.val_bpb 1.0901, but train_seed2.log ends with 1.10034567")


def test_a_non_canonical_val_count_in_the_logs(tmp_path):
    proc = run("check", record_folder(tmp_path, val_tokens=40_960_000), "--no-score-first")
    assert_fails(proc, "data", f"train_seed1.log: val_tokens 40,960,000, but the {CASEOPS} export's val split has "
                 "47,851,520 target tokens")


def test_a_log_in_a_format_it_does_not_read(tmp_path):
    d = record_folder(tmp_path)
    (d / "train_seed2.log").write_text("epoch 1 loss 2.1\nscore=1.1003 bits per byte\nwall 601s\n")
    proc = run("check", d, "--no-score-first")
    assert_fails(proc, "seeds", "train_seed2.log: no final score line", "a log format pgolf check does not read")
    assert_fails(proc, "time", "train_seed2.log: no training time")
    assert_fails(proc, "bytes", "train_seed2.log: no model size")


# ---------------------------------------------------------------- data: a dataset folder


def shard_folder(root: Path, name: str, val: list[list[int]], train: list[list[list[int]]]) -> Path:
    """A dataset folder as the challenge's download script leaves it (shards, no pgolf manifest);
    each document is BOS (1) and its tokens."""
    d = root / name
    d.mkdir(parents=True)
    flat = lambda docs: np.array([t for doc in docs for t in [1, *doc]], dtype=np.uint16)  # noqa: E731
    write_shard(d / "fineweb_val_000000.bin", flat(val))
    for i, docs in enumerate(train):
        write_shard(d / f"fineweb_train_{i:06d}.bin", flat(docs))
    return d


def docs(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 300) for _ in range(rng.randrange(5, 60))] for _ in range(n)]


def test_a_val_document_inside_a_train_shard(tmp_path):
    val, train = docs(0, 40), [docs(1, 50), docs(2, 50)]
    train[1].insert(17, val[23])  # the #2130 failure: a val document in the train data
    data = shard_folder(tmp_path, "ds", val, train)
    proc = run("check", record_folder(tmp_path), "--data", data, "--no-score-first")
    assert_fails(proc, "data", f"{data / 'fineweb_train_000001.bin'}: holds val document 23",
                 "1 train document(s) in all are val documents")
    assert "40 val documents compared with 101 train documents" in proc.stdout


def test_the_overlap_streams_documents_across_chunks_and_shards(tmp_path):
    """Chunks of 7 tokens cut almost every document; the documents and the one match come out whole."""
    val, train = docs(3, 10), [docs(4, 8), docs(5, 8)]
    train[0].append(val[4])  # the last document of shard 0: it runs into shard 1's reads
    data = shard_folder(tmp_path, "ds", val, train)
    got = [d.tolist() for d, _, _ in documents([(data / "fineweb_train_000000.bin", None),
                                                (data / "fineweb_train_000001.bin", None)], 1, chunk=7)]
    assert got == [[1, *doc] for shard in train for doc in shard]
    o = find_overlap(data, chunk=7)
    assert (o.val_docs, o.train_docs, o.matches) == (10, 17, 1) and o.found[0][0] == "fineweb_train_000000.bin"


def test_a_non_canonical_val_split_in_the_dataset_folder(tmp_path):
    """A folder of the sp1024 export whose val split is not the challenge's (#2109)."""
    data = shard_folder(tmp_path, "fineweb10B_sp1024", docs(0, 40), [docs(1, 50)])
    proc = run("check", record_folder(tmp_path), "--data", data, "--no-score-first")
    assert_fails(proc, "data", f"{data / 'fineweb_val_000000.bin'}: the val split holds",
                 "the sp1024 export has 62,021,632: not the canonical split")


def test_a_pgolf_dataset_with_its_manifest_has_no_overlap(tiny_dataset, tmp_path):
    proc = run("check", record_folder(tmp_path), "--data", tiny_dataset.dataset_dir, "--no-score-first")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    o = find_overlap(tiny_dataset.dataset_dir)
    assert o.checksummed and o.val_docs > 0 and o.train_docs > o.val_docs and o.matches == 0
    assert f"{o.val_docs:,} val documents compared with {o.train_docs:,} train documents" in proc.stdout


# ---------------------------------------------------------------- significance


def test_significance_against_a_predecessor_at_both_levels(tmp_path):
    d = record_folder(tmp_path)
    near = run("check", d, "--no-score-first", "--predecessor-bpb", "1.1010", "1.1012", "1.1008")
    assert_fails(near, "significance", "does not reach the rules level (0.005 nats at p < 0.01)")
    assert "(practice, p < 0.25: yes)" in near.stdout and "(rules, p < 0.01: no)" in near.stdout
    assert run("check", d, "--no-score-first", "--level", "practice", "--predecessor-bpb",
               "1.1010", "1.1012", "1.1008").returncode == 0
    far = record_folder(tmp_path / "old")  # the predecessor as a folder, 0.01 BPB worse
    for s in SEEDS:
        (far / f"train_seed{s}.log").write_text(seed_log(s, SCORES[s] + 0.01))
    proc = run("check", d, "--no-score-first", "--predecessor", far)
    assert rows(proc)["significance"] == "pass", proc.stdout


# ---------------------------------------------------------------- score-first


def small_config() -> dict:
    return validate({"tokenizer": {"vocab_size": 320}, "model": {"num_layers": 2, "model_dim": 32, "num_heads": 2,
                                                                  "num_kv_heads": 1},
                     "eval": {"seq_len": 32, "stride": 8}})


def test_score_first_audits_sliding_and_every_ttt_mode():
    lines, reasons = scorefirst.audit_config(small_config())
    assert not reasons, reasons
    assert lines[0].startswith("sliding: ") and "0 changed" in lines[0]
    assert any(x.startswith("ttt chunk: ") for x in lines) and any(x.startswith("ttt phased_lora: ") for x in lines)


def test_score_first_fails_a_config_whose_own_ttt_breaks_the_rule():
    """rescore re-scores tokens after training on them: validate refuses it, so the check must fail on
    it, not call every TTT mode "not applicable" and pass."""
    cfg = small_config()
    cfg["eval"]["ttt"].update(enabled=True, mode="chunk", rescore=True)
    lines, reasons = scorefirst.audit_config(cfg)
    assert reasons and "config.yaml" in reasons[0] and "rescore" in reasons[0], (lines, reasons)


@pytest.mark.parametrize("text, problem", [('{"model": {', "damaged"), ('{"a": 1}', "not a pgolf config")])
def test_a_damaged_pgolf_config_fails_score_first(tmp_path, text, problem):
    (tmp_path / "config.yaml").write_text(text)
    folder = check.Folder(tmp_path, None, "submission.json", "", [], {}, {}, check.read_config(tmp_path))
    c = check.check_score_first(folder)
    assert c.status == check.FAIL and problem in " ".join(c.reasons), c


class Peeking(torch.nn.Module):
    """A model whose output at position i also reads the input at i + 3, two tokens past the target
    it predicts: what the audit exists to catch."""

    def __init__(self, model):
        super().__init__()
        self.model, self.vocab_size = model, model.vocab_size

    def forward(self, idx, targets=None):
        return self.model(idx) + self.model(torch.roll(idx, -3, dims=1))


def test_score_first_catches_an_evaluation_that_reads_ahead():
    cfg = small_config()
    model = scorefirst.model_of(cfg)
    r = scorefirst.audit_sliding(Peeking(model), scorefirst.stream(320, 1), scorefirst.small_eval(cfg, None))
    assert not r["ok"] and r["changed"] > 0


# ---------------------------------------------------------------- pgolf record runs it


def write_seed(run_dir: Path, seed: int, v: float, train_s: float, calib_s: float) -> dict:
    d = run_dir / f"seed{seed}"
    d.mkdir(parents=True)
    part = {"val_bpb": v, "val_loss": v * 0.7, "tokens": 1000, "bytes": 3000}
    write_result(d / "eval.json", {"pre_quant": part, "post_quant": part, "sliding": part, "quant_gap_bpb": 0.0,
                                   "scored_eval_seconds": 12.5})
    write_result(d / "size.json", {"model_bytes": 10, "total_bytes": 20})
    write_result(d / "train.json", {"steps": 5, "train_seconds": train_s, "tokens_per_s": 9.0})
    (d / "artifact.pgz").write_bytes(bytes(10))
    from pgolf.formats import tensorfile

    tensorfile.save(d / "hessians.pgt", {"w": torch.eye(2)}, {"seconds": calib_s})
    (d / "train.log").write_text("training 1,234 parameters\ndone: 5 steps\n")
    return {"eval": d / "eval.json", "size": d / "size.json", "train": d / "train.json",
            "artifact": d / "artifact.pgz", "log": d / "train.log", "hessians": d / "hessians.pgt"}


def record_run(tmp_path: Path, train_s: float, check: str = "enforce") -> subprocess.CompletedProcess:
    from pgolf.report.aggregate import aggregate

    files = {s: write_seed(tmp_path / "run", s, 1.5 + s / 100, train_s, 2.5) for s in SEEDS}
    summary = tmp_path / "run" / "summary.json"
    write_result(summary, aggregate("run", {s: {k: f[k] for k in ("eval", "size", "train")} for s, f in files.items()}))
    (tmp_path / "run" / "summary.md").write_text("| seed |\n")
    cfg = {**small_config(), "record": {**small_config()["record"], "check": check}}
    return run("record", "--summary", summary, *seed_argv(files),
               "--config", json.dumps(cfg), "--out", tmp_path / "record")


def test_record_puts_the_check_in_its_readme_and_its_seed_logs_the_calibration(tmp_path):
    proc = record_run(tmp_path, train_s=100.0)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    readme = (tmp_path / "record" / "README.md").read_text()
    assert "## pgolf check" in readme and "| time | pass | training + calibration at most 102.5 s" in readme
    assert "| score-first | pass | sliding: " in readme
    log = (tmp_path / "record" / "train_seed2.log").read_text()
    assert log.startswith("training") and "calibration_time:2500ms" in log
    sub = json.loads((tmp_path / "record" / "submission.json").read_text())
    assert sub["seed_results"]["1"]["calibration_seconds"] == 2.5 and sub["seed_results"]["1"]["eval_seconds"] == 12.5


def test_a_failed_check_fails_the_record_stage(tmp_path):
    proc = record_run(tmp_path, train_s=599.0)  # + 2.5 s of calibration
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = [x for x in proc.stderr.splitlines() if x.startswith("pgolf record: ")]
    assert len(line) == 1 and "pgolf check failed (time)" in line[0]
    assert "train_seed1.log: training 599.000 s + GPTQ calibration 2.500 s = 601.500 s, over 600 s" in line[0]
    assert not (tmp_path / "record").exists()
    report = record_run(tmp_path / "again", train_s=599.0, check="report")
    assert report.returncode == 0, report.stderr
    assert "| time | FAIL |" in (tmp_path / "again" / "record" / "README.md").read_text()


def test_a_full_precision_std_agrees_with_logs_rounded_to_8_places():
    """Rounding three scores to 8 places moved their sample std by 1.0017 half-units here: a record
    that states the std of its unrounded scores must still pass (the bound is h * sqrt(n / (n - 1)))."""
    true = [1.0003131460983248, 1.000752994636369, 1.0001741455651842]
    scored = {s: seedlog.Score("final", round(v, 8), 2.0, 8, None, 1) for s, v in enumerate(true)}
    sub = {"val_bpb": statistics.fmean(true), "val_bpb_std": statistics.stdev(true)}
    folder = check.Folder(Path("."), sub, "submission.json", "", list(scored), {}, {}, None)
    assert check.mean_and_std(folder, scored) == []
    sub["val_bpb_std"] += 3e-8
    assert "val_bpb_std" in check.mean_and_std(folder, scored)[0]
