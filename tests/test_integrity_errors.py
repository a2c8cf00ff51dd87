"""The error contract, as a user sees it: a known error is one line `pgolf <stage>: <file>: <problem>`,
exit status 1, no traceback; under torchrun (as the rules run it) the line is printed once and ends
the log. Unknown errors keep their traceback. Results with wrong types or NaN are refused by name.
A trainer dies with its launcher, and a second trainer on a locked seed folder is refused."""

import ast
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_files, seed_argv
from test_train import configs

from pgolf.cli import main
from pgolf.config import validate
from pgolf.errors import PgolfError
from pgolf.eval.audit import audit
from pgolf.eval.bpb import build_byte_luts
from pgolf.eval.evaluate import refuse_nonfinite, val_tokens
from pgolf.formats.results import write_result
from pgolf.report.aggregate import aggregate
from pgolf.runtime import process

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PACKAGE = Path(__file__).resolve().parent.parent / "pgolf"


def stage(*argv) -> subprocess.CompletedProcess:
    """`pgolf <stage> ...` in its own process, as a rule runs it."""
    return subprocess.run([sys.executable, "-m", "pgolf", *map(str, argv)], capture_output=True, text=True, env=ENV)


def launched(log: Path, nproc: int, *argv) -> tuple[int, str]:
    """`pgolf launch --standalone --nproc-per-node N -m pgolf <stage> ... > log 2>&1`, as rules/common.smk's
    TORCHRUN; its exit status and log."""
    cmd = [sys.executable, "-m", "pgolf", "launch", "--standalone", f"--nproc-per-node={nproc}", "-m", "pgolf",
           *map(str, argv)]
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV).returncode
    return rc, log.read_text()


def assert_one_line(rc: int, output: str, name: str, *mentions) -> str:
    """Exit 1, no traceback, exactly one `pgolf <name>:` line, naming each of `mentions`."""
    assert rc == 1, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith(f"pgolf {name}:")]
    assert len(errors) == 1, output[-3000:]
    for m in mentions:
        assert str(m) in errors[0], errors[0]
    return errors[0]


def assert_log_ends_with_the_error(rc: int, log: str, name: str, *mentions) -> None:
    line = assert_one_line(rc, log, name, *mentions)
    assert log.strip().splitlines()[-1] == line, log[-3000:]


def train_argv(data: Path, out: Path, **over) -> list[str]:
    model, tr = configs(**over)
    return ["train", "--data", data, "--vocab-size", 320, "--model-cfg", json.dumps(model), "--cfg", json.dumps(tr),
            "--seed", 1, "--device", "cpu", "--out-dir", out, "--ckpt-dir", out / "ckpt",
            "--loader-cfg", json.dumps(validate({})["loader"])]


def eval_argv(setup, artifact: Path, out: Path) -> list[str]:
    cfg = validate({"eval": {"seq_len": 32, "stride": 16, "batch_seqs": 8, "max_tokens": 2000}})["eval"]
    return ["evaluate", "--data", setup.data, "--tokenizer", setup.tokenizer, "--ema", setup.ema,
            "--artifact", artifact, "--cfg", json.dumps(cfg), "--device", "cpu", "--out", out]


@pytest.fixture(scope="module")
def bad_shard_dataset(tiny_dataset, tmp_path_factory) -> Path:
    """The tiny dataset with its first train shard's magic overwritten."""
    d = tmp_path_factory.mktemp("bad") / "dataset"
    d.mkdir()
    for f in tiny_dataset.dataset_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    shard = d / "fineweb_train_000000.bin"
    shard.write_bytes(b"XXXX" + shard.read_bytes()[4:])
    return d


@pytest.fixture(scope="module")
def flipped_artifact(setup, tmp_path_factory) -> Path:
    data = bytearray(setup.artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path = tmp_path_factory.mktemp("flip") / "artifact.pgz"
    path.write_bytes(bytes(data))
    return path


# ---- under torchrun, as the rules run it ----

@pytest.mark.parametrize("nproc", [1, 2])
def test_train_on_a_damaged_shard_under_torchrun(bad_shard_dataset, tmp_path, nproc):
    rc, log = launched(tmp_path / "train.log", nproc, *train_argv(bad_shard_dataset, tmp_path / "seed1"))
    assert_log_ends_with_the_error(rc, log, "train", bad_shard_dataset / "fineweb_train_000000.bin", "bad magic")
    assert not (tmp_path / "seed1" / "ema.pgt").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_evaluate_on_a_damaged_artifact_under_torchrun(setup, flipped_artifact, tmp_path, nproc):
    rc, log = launched(tmp_path / "eval.log", nproc, *eval_argv(setup, flipped_artifact, tmp_path / "eval.json"))
    assert_log_ends_with_the_error(rc, log, "evaluate", flipped_artifact)
    assert not (tmp_path / "eval.json").exists()


def test_a_second_trainer_on_a_locked_seed_folder_is_refused(tiny_dataset, tmp_path):
    seed = tmp_path / "seed1"
    held = process.lock_folder(seed / "ckpt")  # as a trainer still running on this folder holds it
    try:
        rc, log = launched(tmp_path / "train.log", 1, *train_argv(tiny_dataset.dataset_dir, seed))
    finally:
        held.close()
    assert_log_ends_with_the_error(rc, log, "train", seed / "ckpt", f"pid {os.getpid()}", "another trainer")
    assert not (seed / "ema.pgt").exists() and not (seed / "ckpt" / "latest.pt").exists()


def test_unknown_errors_keep_their_traceback_and_torchrun_its_failure_table(tiny_dataset, tmp_path):
    argv = train_argv(tiny_dataset.dataset_dir, tmp_path / "seed1")
    argv[argv.index("--model-cfg") + 1] = "{}"  # a KeyError deep in the model: a bug, not a bad input
    proc = stage(*argv)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "KeyError" in proc.stderr
    rc, log = launched(tmp_path / "train.log", 1, *argv)
    assert rc == 1 and "KeyError" in log and "exitcode  : 1" in log


# ---- single-process stages ----

def truncated(path: Path, dest: Path) -> Path:
    dest.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return dest


def test_stage_errors_are_one_line(setup, tiny_dataset, flipped_artifact, tmp_path):
    """One subprocess per stage: each refuses a damaged or missing input in one line naming it."""
    quant = validate({})["quant"] | {"method": "rtn"}
    compress = validate({})["compress"]
    missing = tmp_path / "missing.pgt"
    garbage = tmp_path / "garbage.model"
    garbage.write_text("not a model")
    cases = [
        ("quantize", ["--weights", missing, "--cfg", json.dumps(quant), "--out", tmp_path / "q.pgt"], missing),
        ("compress", ["--quant", truncated(setup.ema, tmp_path / "half.pgt"), "--cfg", json.dumps(compress),
                      "--out", tmp_path / "a.pgz"], tmp_path / "half.pgt"),
        ("size", ["--artifact", truncated(setup.artifact, tmp_path / "half.pgz"), "--cfg", json.dumps(compress),
                  "--features", "", "--out", tmp_path / "size.json"], tmp_path / "half.pgz"),
        ("evaluate", eval_argv(setup, flipped_artifact, tmp_path / "eval.json")[1:], flipped_artifact),
        ("shards", ["--docs", tiny_dataset.docs, "--tokenizer", garbage, "--cfg", json.dumps(validate({})["data"]),
                    "--out", tmp_path / "ds"], garbage),
        ("config", [tmp_path / "nowhere.yaml"], tmp_path / "nowhere.yaml"),
    ]
    for name, argv, culprit in cases:
        proc = stage(name, *argv)
        assert_one_line(proc.returncode, proc.stderr, name, culprit)
        assert not any(p.exists() for p in (tmp_path / "q.pgt", tmp_path / "a.pgz", tmp_path / "size.json",
                                            tmp_path / "eval.json", tmp_path / "ds")), name


def test_a_config_with_two_bad_keys_is_one_line_naming_both(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("train:\n  trian: 1\n  matrix_lr: x\n")
    with pytest.raises(SystemExit, match="^1$"):
        main(["config", str(tmp_path / "bad.yaml")])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'trian' was unexpected); train.matrix_lr: 'x' is not of type" in err


def test_train_usage_error_is_one_line(tiny_dataset, tmp_path):
    argv = train_argv(tiny_dataset.dataset_dir, tmp_path / "seed1")
    proc = stage(*argv, "--loader-cfg", json.dumps({"mode": "ordered", "order": "hardest"}))
    assert_one_line(proc.returncode, proc.stderr, "train", "needs --shard-order")


# ---- results with wrong types or NaN: evaluate, aggregate, record ----

def write_seed(run_dir: Path, seed: int, v: float = 1.5) -> None:
    d = run_dir / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    part = {"val_bpb": v, "val_loss": v * 0.7, "tokens": 1000, "bytes": 3000}
    write_result(d / "eval.json", {"pre_quant": part, "post_quant": part, "sliding": part, "quant_gap_bpb": 0.0})
    write_result(d / "size.json", {"model_bytes": 10, "total_bytes": 20})
    write_result(d / "train.json", {"steps": 5, "train_seconds": 1.0, "tokens_per_s": 9.0})
    (d / "artifact.pgz").write_bytes(bytes(10))  # record counts its bytes from the file


def edit(path: Path, keys: tuple[str, ...], value) -> None:
    """Set one field of a result as a stage that wrote it so would (its checksum taken anew); NaN is
    written as JSON's NaN token, as json.dumps does."""
    obj = json.loads(path.read_text())
    obj.pop("content_sha256", None)
    inner = obj
    for k in keys[:-1]:
        inner = inner[k]
    inner[keys[-1]] = value
    write_result(path, obj)


BOTH = ("aggregate", "record")
# (stages that read the field, file, keys, bad value, the problem named); record quotes the compare
# metric's part (sliding here) and aggregate its table's columns.
BAD_FIELDS = [
    (BOTH, "train.json", ("steps",), "12", "steps is '12', not a number"),
    (BOTH, "train.json", ("train_seconds",), None, "train_seconds is None, not a number"),
    (BOTH, "eval.json", ("sliding", "val_bpb"), math.nan, "sliding.val_bpb is nan, not a finite number"),
    (BOTH, "eval.json", ("sliding",), [1.0], "missing sliding.val_bpb"),
    (("aggregate",), "eval.json", ("post_quant", "val_loss"), math.nan, "post_quant.val_loss is nan"),
    (("record",), "eval.json", ("sliding", "val_loss"), math.inf, "sliding.val_loss is inf"),
    (BOTH, "size.json", ("model_bytes",), True, "model_bytes is True, not a number"),
    (BOTH, "size.json", ("model_bytes",), -math.inf, "model_bytes is -inf"),
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Two seeds' results, their summary and logs: what aggregate and record read."""
    d = tmp_path_factory.mktemp("results") / "run"
    for s, v in ((1, 1.5), (2, 1.52)):
        write_seed(d, s, v)
    write_result(d / "summary.json", aggregate("run", run_files(d, [1, 2])))
    (d / "summary.md").write_text("| seed |\n")
    (d / "logs").mkdir()
    for s in (1, 2):
        (d / "logs" / f"train_seed{s}.log").write_text("step 5/5\n")
    return d


def copy_run(src: Path, dest: Path) -> Path:
    for f in src.rglob("*"):
        if f.is_file():
            (dest / f.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dest / f.relative_to(src)).write_bytes(f.read_bytes())
    return dest


def aggregate_argv(d: Path, out: Path) -> list:
    return ["aggregate", "--run", "run", *seed_argv(run_files(d, [1, 2])), "--out-json", out / "s.json",
            "--out-parquet", out / "s.parquet", "--out-table", out / "s.md"]


def record_argv(d: Path, out: Path) -> list:
    # two seeds and no eval time: pgolf check fails, and report leaves that to its README; a small
    # model keeps its score-first audit short
    cfg = validate({"compare": {"metric": "sliding_bpb"}, "record": {"check": "report"},
                    "model": {"num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1}})
    files = run_files(d, [1, 2], ("eval", "size", "train", "artifact", "log"))
    return ["record", "--summary", d / "summary.json", *seed_argv(files),
            "--config", json.dumps(cfg), "--out", out / "record"]


@pytest.mark.parametrize("name, file, keys, value, problem",
                         [(n, *case) for names, *case in BAD_FIELDS for n in names],
                         ids=[f"{n}-{f}-{'.'.join(k)}-{v}" for names, f, k, v, _ in BAD_FIELDS for n in names])
def test_aggregate_and_record_refuse_a_bad_field(run_dir, tmp_path, name, file, keys, value, problem):
    d = copy_run(run_dir, tmp_path / "run")
    edit(d / "seed2" / file, keys, value)
    argv = aggregate_argv(d, tmp_path) if name == "aggregate" else record_argv(d, tmp_path)
    proc = stage(*argv)
    assert_one_line(proc.returncode, proc.stderr, name, d / "seed2" / file, problem)
    assert not list(tmp_path.glob("s.*")) and not (tmp_path / "record").exists()


def test_record_refuses_a_nan_summary_and_aggregate_a_non_object(run_dir, tmp_path):
    d = copy_run(run_dir, tmp_path / "run")
    edit(d / "summary.json", ("mean", "sliding_bpb"), math.nan)
    proc = stage(*record_argv(d, tmp_path))
    assert_one_line(proc.returncode, proc.stderr, "record", d / "summary.json", "mean.sliding_bpb is nan")
    (d / "seed1" / "eval.json").write_text("[1, 2]")
    proc = stage(*aggregate_argv(d, tmp_path))
    assert_one_line(proc.returncode, proc.stderr, "aggregate", d / "seed1" / "eval.json", "expected a JSON object")


def test_clean_results_pass_and_record_writes_finite_numbers(run_dir, tmp_path):
    d = copy_run(run_dir, tmp_path / "run")
    assert stage(*aggregate_argv(d, tmp_path)).returncode == 0
    proc = stage(*record_argv(d, tmp_path))
    assert proc.returncode == 0, proc.stderr
    sub = json.loads((tmp_path / "record" / "submission.json").read_text())
    assert math.isfinite(sub["val_loss"]) and sub["val_bpb"] == pytest.approx(1.51)


def test_evaluate_refuses_a_nan_score(setup, tmp_path):
    args = (setup.ema, setup.artifact, tmp_path / "eval.json")
    ok = {"pre_quant": {"val_bpb": 3.0}, "post_quant": {"val_bpb": 3.1}, "quant_gap_bpb": 0.1}
    refuse_nonfinite(ok, *args)
    with pytest.raises(PgolfError, match=rf"{setup.artifact}: post_quant.val_bpb is nan .*eval.json not written"):
        refuse_nonfinite({**ok, "post_quant": {"val_bpb": math.nan}}, *args)
    with pytest.raises(PgolfError, match=rf"{setup.ema}: pre_quant.val_bpb is inf"):
        refuse_nonfinite({**ok, "pre_quant": {"val_bpb": math.inf}}, *args)


# ---- the contract holds for code not yet written ----

def test_pgolf_raises_no_bare_value_error():
    """A bare ValueError is not a known error (it would print a traceback): pgolf raises PgolfError or
    one of its subclasses, so that every input problem it phrases reaches the user as one line."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                if getattr(node.exc.func, "id", None) == "ValueError":
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, (f"bare ValueError at {', '.join(found)}: a bad input raises PgolfError (pgolf.errors), "
                       "a broken internal invariant RuntimeError or AssertionError")


# ---- a trainer dies with its launcher ----

def alive(pid: int) -> bool:
    """Running, not a zombie its dead parent's reaper has yet to collect."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_trainer_dies_when_its_launcher_is_killed(tiny_dataset, tmp_path):
    seed = tmp_path / "seed1"
    argv = train_argv(tiny_dataset.dataset_dir, seed, iterations=100_000, checkpoint_every=2, log_every=1000)
    cmd = [sys.executable, "-m", "pgolf", "launch", "--standalone", "--nproc-per-node=1", "-m", "pgolf",
           *map(str, argv)]
    with open(tmp_path / "train.log", "w") as log:  # its own process group, as Snakemake's job shell has
        launcher = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    lock, deadline = seed / "ckpt" / process.LOCK_NAME, time.time() + 60
    while not (seed / "ckpt" / "latest.pt").exists() and time.time() < deadline and launcher.poll() is None:
        time.sleep(0.2)
    assert (seed / "ckpt" / "latest.pt").exists(), (tmp_path / "train.log").read_text()[-3000:]
    trainer = int(lock.read_text())
    assert trainer != launcher.pid and alive(trainer)
    os.killpg(launcher.pid, signal.SIGKILL)  # the trainer is not in this group: torchrun gave it a session
    launcher.wait()
    deadline = time.time() + 5
    while alive(trainer) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(trainer)
    before = snapshot(seed)
    time.sleep(1.5)
    assert snapshot(seed) == before and not (seed / "ema.pgt").exists() and not (seed / "train.json").exists()
    process.lock_folder(seed / "ckpt").close()  # the lock went with it: the next run may train here


@pytest.mark.parametrize("prctl", [True, False], ids=["prctl", "watch"])
def test_die_with_parent_by_prctl_or_by_watching(tmp_path, prctl):
    """A parent starts a child that arms the guard, then exits; the child must not outlive it."""
    child = ("import time, pgolf.runtime.process as p\n"
             + ("" if prctl else "p._pdeathsig = lambda sig: False\n")
             + "print(p.die_with_parent(poll_s=0.1), flush=True)\ntime.sleep(60)\n")
    parent = ("import subprocess, sys\n"
              f"c = subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE, "
              "stderr=subprocess.DEVNULL, text=True)\n"
              "print(c.pid, c.stdout.readline().strip(), flush=True)\n")
    out = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, env=ENV, timeout=30)
    pid, how = out.stdout.split()
    assert how == ("prctl" if prctl else "watch")
    deadline = time.time() + 5
    while alive(int(pid)) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(int(pid))


def test_audit_reports_each_pass_as_it_goes(small_model, tiny_dataset):
    """`pgolf audit` runs for minutes on a real model: it says which pass runs and how long is left."""
    ttt = {"enabled": True, "epochs": 1, "chunk_tokens": 256, "batch_seqs": 4}
    cfg = validate({"eval": {"seq_len": 32, "stride": 8, "batch_seqs": 8, "max_tokens": 600, "ttt": ttt}})["eval"]
    lines = []
    audit(small_model, val_tokens(tiny_dataset.dataset_dir, 600, 32), cfg,
          build_byte_luts(tiny_dataset.tokenizer, tiny_dataset.vocab_size), positions=[255], log=lines.append)
    assert [line.split(":")[1].strip()[:8] for line in lines] == ["pass 1/2", "pass 2/2", "t=255"]
    assert "s left" in lines[1] and "losses checked, 0 changed" in lines[2]
