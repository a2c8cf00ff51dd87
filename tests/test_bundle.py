"""The packed code a submission runs (pgolf.pipeline.bundle): small, self-contained, and the same numbers as
the package, stage by stage, from a folder that holds nothing else."""

import ast
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgolf.cli import main
from pgolf.config import validate
from pgolf.formats import tensorfile
from pgolf.pipeline import bundle

# The packed file was 35,265 bytes with PR #1855's parts in (phased TTT, LQER, pergroup, CaseOps
# sidecar); compress.code_reserve keeps the same 40,000 for it.
CODE_BOUND = 40_000


def test_packed_code_is_under_40_kb_and_holds_only_what_a_submission_runs():
    mods = bundle.modules()
    assert {"pgolf.cli", "pgolf.train.train", "pgolf.quant.calibrate", "pgolf.quant.gptq", "pgolf.quant.compress",
            "pgolf.eval.evaluate", "pgolf.eval.ttt", "pgolf.eval.phased", "pgolf.model.gpt"} <= set(mods)
    assert not set(mods) & {"pgolf.config", "pgolf.pipeline.provenance", "pgolf.pipeline.bundle", "pgolf.quant.size",
                            "pgolf.report.record", "pgolf.data.tokenizer", "pgolf.data.documents",
                            "pgolf.runtime.launch"}
    assert "def open_shard(" in mods["pgolf.formats.shards"] and "def write_shard(" not in mods["pgolf.formats.shards"]
    assert len(bundle.build()) == bundle.code_bytes() < CODE_BOUND
    assert validate({})["compress"]["code_reserve"] == CODE_BOUND


UNUSED = {
    "a": """import b
from c import by_import
STAGES = {"x": "a:by_string"}
def dead():
    return helper()
def helper():
    return 1
def called():
    return b.by_attr()
@register
def decorated():
    pass
@dataclass
class Unused:
    x: int = 1
def by_string():
    pass
called()
""",
    "b": "def by_attr():\n    pass\ndef lonely():\n    pass\n",
    "c": "def by_import():\n    pass\n",
}


def test_definitions_no_packed_module_names_are_dropped_and_named_ones_kept():
    trees = {m: ast.parse(src) for m, src in UNUSED.items()}
    dropped = bundle.drop_unused(trees)
    assert sorted(dropped) == ["a.Unused", "a.dead", "a.helper", "b.lonely"]  # helper: only dead called it
    kept = {m: [s.name for s in t.body if hasattr(s, "name")] for m, t in trees.items()}
    assert kept == {"a": ["called", "decorated", "by_string"], "b": ["by_attr"], "c": ["by_import"]}


def test_every_byte_survives_the_latin1_literal():
    rng = random.Random(0)
    data = bytes(rng.randrange(256) for _ in range(5000)) + b"\0" + b"7\0\0'\\\r\n\0"
    text = "'" + bundle.literal(data) + "'"
    assert ast.literal_eval(text).encode("latin-1") == data
    source = f"# coding: latin-1\nx = {text}\n".encode("latin-1")
    space: dict = {}
    exec(compile(source, "t.py", "exec"), space)
    assert space["x"].encode("latin-1") == data


SNIPPET = '''"""the module text"""
from __future__ import annotations
import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    import nothing_here
@dataclass
class Box:
    """the docstring"""
    size: int = 2
def f(a: int, *rest: str, flag: bool = False) -> str:
    """the docstring"""
    total: int = a + 1  # comment
    x = 1 .real
    if (n := len(rest)) > 1:
        return'many'
    w = 7
    return f"{total!r:>{w}}|{a=}|{n}" + ("yes" if flag else 'no') + str(x) + str(Box().size) + f'{{}}'
def cli(argv):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--a", type=int, help="what a is")
    ap.add_argument("--b", default=3, help=argparse.SUPPRESS)
    return vars(ap.parse_args(argv))
'''


def test_minified_code_does_what_the_source_does():
    small = bundle.minify(SNIPPET)
    assert not any(word in small for word in ("text", "docstring", "comment", "nothing_here"))
    assert "what a is" not in small and "SUPPRESS" in small
    assert "\n  return'many'" in small and "   " not in small  # one space per level, none between tokens
    spaces: list[dict] = [{}, {}]
    for src, space in zip((SNIPPET, small), spaces, strict=True):
        exec(compile(src, "m.py", "exec"), space)
    for args in ((1,), (5, "p", "q"), (2, "p")):
        assert spaces[0]["f"](*args, flag=True) == spaces[1]["f"](*args, flag=True)
    assert spaces[0]["cli"](["--a", "4"]) == spaces[1]["cli"](["--a", "4"]) == {"a": 4, "b": 3}


def packed_env() -> dict:
    """The environment of a submission's folder: no PYTHONPATH, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PGOLF_TRACEBACK")}
    return {**env, "OMP_NUM_THREADS": "1"}


def test_the_packed_file_never_falls_back_to_an_installed_pgolf(tmp_path):
    (tmp_path / bundle.FILE_NAME).write_bytes(bundle.build())
    probe = ("import sys; sys.argv = ['t', '--help']\n"
             f"exec(compile(open({bundle.FILE_NAME!r}, 'rb').read(), {bundle.FILE_NAME!r}, 'exec'))\n"
             "import pgolf.quant.clip\n"
             "assert pgolf.quant.clip.__spec__.origin is None, 'a packed module comes from no file'\n"
             "try:\n    import pgolf.config\nexcept ImportError as e:\n    print('refused:', e)\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=packed_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: pgolf <stage>" in proc.stdout and "refused: pgolf.config is not packed" in proc.stdout


def stage_args(ds, d: Path) -> dict[str, list[str]]:
    """Every runtime stage's command line, reading and writing in folder d."""
    cfg = validate({"model": {"num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1},
                    "train": {"seq_len": 32, "batch_tokens": 256, "micro_batch_seqs": 8, "iterations": 4,
                              "warmdown_steps": 2, "checkpoint_every": 100, "log_every": 1},
                    "calibrate": {"source": "train", "seqs": 8, "seq_len": 32},
                    "quant": {"method": "gptq", "min_numel": 256},
                    "compress": {"codec": "brotli", "level": 5},
                    "eval": {"seq_len": 32, "stride": 16, "batch_seqs": 8, "max_tokens": 2000}})
    js = lambda name: json.dumps(cfg[name])  # noqa: E731
    return {
        "train": ["--data", str(ds.dataset_dir), "--vocab-size", str(ds.vocab_size), "--model-cfg", js("model"),
                  "--cfg", js("train"), "--seed", "3", "--device", "cpu", "--out-dir", str(d), "--ckpt-dir",
                  str(d / "ckpt"), "--loader-cfg", js("loader")],
        "calibrate": ["--weights", str(d / "ema.pgt"), "--data", str(ds.dataset_dir), "--cfg", js("calibrate"),
                      "--seed", "3", "--device", "cpu", "--out", str(d / "hessians.pgt")],
        "quantize": ["--weights", str(d / "ema.pgt"), "--hessians", str(d / "hessians.pgt"), "--cfg", js("quant"),
                     "--out", str(d / "quant.pgt")],
        "compress": ["--quant", str(d / "quant.pgt"), "--cfg", js("compress"), "--out", str(d / "artifact.pgz")],
        "evaluate": ["--data", str(ds.dataset_dir), "--tokenizer", str(ds.tokenizer), "--ema", str(d / "ema.pgt"),
                     "--artifact", str(d / "artifact.pgz"), "--cfg", js("eval"), "--device", "cpu",
                     "--out", str(d / "eval.json")],
    }


def test_the_packed_file_trains_and_scores_as_the_package_does(tiny_dataset, tmp_path):
    """Train (under torchrun), calibrate, quantize, compress and evaluate (torchrun, two processes) from
    train_gpt.py alone in an empty folder; the package runs the same stages in this process."""
    folder = tmp_path / "submission"
    folder.mkdir()
    (folder / bundle.FILE_NAME).write_bytes(bundle.build())
    packed, package = tmp_path / "packed", tmp_path / "package"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for stage, args in stage_args(tiny_dataset, packed).items():
        launcher = {"train": [*torchrun, "--nproc-per-node=1"], "evaluate": [*torchrun, "--nproc-per-node=2"]}
        cmd = [*launcher.get(stage, [sys.executable]), bundle.FILE_NAME, stage, *args]
        proc = subprocess.run(cmd, cwd=folder, env=packed_env(), capture_output=True, text=True)
        assert proc.returncode == 0, f"{stage}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for stage, args in stage_args(tiny_dataset, package).items():
        main([stage, *args])
    ema = [tensorfile.load(d / "ema.pgt")[0] for d in (packed, package)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[1])
    for name in ("quant.pgt", "artifact.pgz"):
        assert (packed / name).read_bytes() == (package / name).read_bytes(), name
    ev = [json.loads((d / "eval.json").read_text()) for d in (packed, package)]
    for part in ("pre_quant", "post_quant", "sliding"):
        assert ev[0][part]["tokens"] == ev[1][part]["tokens"] > 0
        assert ev[0][part]["val_bpb"] == pytest.approx(ev[1][part]["val_bpb"], rel=1e-9)
