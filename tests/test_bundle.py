"""The packed code a submission runs (pgolf.pipeline.bundle): small, self-contained, and the same numbers as
the package, stage by stage, from a folder that holds nothing else. What goes into it (pgolf.pipeline.reach,
pgolf.pipeline.features) is tested here on small modules; each preset's own file in test_packed_presets.py."""

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
from pgolf.pipeline import bundle, features, reach, rename

# compress.code_reserve: what compress leaves of the budget for the code when it prunes. The whole
# package's file (every feature) was 35,869 bytes; each preset's own is smaller (docs/bytes.md).
CODE_BOUND = 40_000


def test_the_whole_package_packs_under_40_kb_and_holds_only_what_a_submission_runs():
    mods = bundle.modules()
    assert {"pgolf.cli", "pgolf.train.train", "pgolf.quant.calibrate", "pgolf.quant.gptq", "pgolf.quant.compress",
            "pgolf.eval.evaluate", "pgolf.eval.ttt", "pgolf.eval.phased", "pgolf.model.gpt"} <= set(mods)
    assert not set(mods) & {"pgolf.config", "pgolf.pipeline.provenance", "pgolf.pipeline.bundle", "pgolf.quant.size",
                            "pgolf.report.record", "pgolf.data.tokenizer", "pgolf.data.documents",
                            "pgolf.runtime.launch"}
    assert "def open_shard(" in mods["pgolf.formats.shards"] and "def write_shard(" not in mods["pgolf.formats.shards"]
    assert "def has_operators(" in mods["pgolf.data.caseops"] and "def decode(" not in mods["pgolf.data.caseops"]
    assert "bench_cli" not in mods["pgolf.train.loader"]  # a tool, not a stage
    assert len(bundle.build()) == bundle.code_bytes() < CODE_BOUND
    assert validate({})["compress"]["code_reserve"] == CODE_BOUND


MODULES = {
    "p": "",
    "p.a": """from p import b
from p.c import by_import
import numpy as np
STAGES = {"x": "p.a:by_string"}
def dead():
    return helper()
def helper():
    return 1
def called():
    return b.by_attr() + obj.lonely()
@register
def decorated():
    pass
@dataclass
class Unused:
    x: int = 1
TABLE = {"k": dead}
called()
""",
    "p.b": "from p.e import used_by_b\ndef by_attr():\n    return used_by_b()\ndef lonely():\n    pass\n",
    "p.c": "def by_import():\n    pass\n",
    "p.d": "def never():\n    pass\n",
    "p.e": "def used_by_b():\n    pass\n",
}


def test_what_no_reached_code_names_goes_by_module_not_by_spelling():
    """A definition stays if code that runs names it where it is bound: `b.by_attr` keeps p.b's, but
    `obj.lonely` keeps no `lonely`, a string keeps nothing, an unused import goes and with it the module
    it alone imported; a decorator that may register keeps its function."""
    trees = {m: ast.parse(src) for m, src in MODULES.items()}
    removed = reach.prune(trees, [("p.a", "called")])
    assert sorted(trees) == ["p", "p.a", "p.b", "p.e"]  # p.c: only an unused import named it; p.d: nothing
    assert sorted(removed) == ["p.a.STAGES", "p.a.TABLE", "p.a.Unused", "p.a.dead", "p.a.helper", "p.b.lonely",
                               "p.c", "p.d"]
    assert [line for line in ast.unparse(trees["p.a"]).splitlines() if line] == [
        "from p import b", "def called():", "    return b.by_attr() + obj.lonely()", "@register",
        "def decorated():", "    pass", "called()"]


def test_a_cut_leaves_names_only_where_a_switch_can_guard_them():
    """What a feature leaves out goes with its imports; a function may still spell it (behind its
    switch), code that runs on import may not, and nothing may name what was never there."""
    trees = {m: ast.parse(src) for m, src in {
        "p": "", "p.m": "from p.x import f, g\nfrom p import y\nR = {'a': f, 'b': g}\n"
                        "def use(on):\n    return y.h() if on else f()\n",
        "p.x": "def f():\n    pass\ndef g():\n    pass\n", "p.y": "def h():\n    pass\n"}.items()}
    done = reach.cut(trees, ["p.x:g", "p.m:R[b]", "p.y"])
    assert done.names == {"p.x": {"g"}, "p.m": {"g", "y"}} and "p.y" not in trees
    out = {m: bundle.unparse(t) for m, t in trees.items()}
    assert out["p.m"].splitlines()[:2] == ["from p.x import f", "R={'a':f}"]
    assert reach.problems(out, done) == []
    trees["p.m"].body += ast.parse("S = g\nfrom p import x\ndef k():\n    return x.g() + x.zzz() + nowhere").body
    assert reach.problems({m: bundle.unparse(t) for m, t in trees.items()}, done) == [
        "p.m: g is used on import but not defined",  # S = g runs on import: it would fail whatever the switch
        "p.m: nowhere is used but not defined", "p.m: x.zzz is not defined in p.x"]
    with pytest.raises(RuntimeError, match="no plain top-level definition"):
        reach.cut(trees, ["p.x:nothing"])


def test_every_feature_names_code_that_exists():
    """Every entry of the table removes something from the whole package's modules: one cut of all
    of them, whole modules last (a stale name fails)."""
    trees = {bundle.module_name(p): bundle.stripped(p.read_text()) for p in bundle.runtime_files()}
    entries = [e for f in features.FEATURES for e in f.code]
    reach.cut(trees, sorted(entries, key=lambda e: ":" not in e))
    assert len(features.BY_NAME) == len(features.FEATURES)


@pytest.mark.parametrize("quote, literal", [("'", bundle.literal), ("'" * 3, bundle.triple_literal)])
def test_every_byte_survives_the_latin1_literal(quote, literal):
    """Every byte value, and the runs a literal must not take for its end or an escape: quotes (in
    triple quotes one may stand alone, but not two or three in a row, nor one at the end), a NUL
    before a digit, line ends, backslashes; the packed file's triple quotes need fewer escapes."""
    rng = random.Random(0)
    data = bytes(rng.randrange(256) for _ in range(5000)) + b"\0" + b"7\0\0'\\\r\n\0" + b"'''a''''\\'\n'x"
    for tail in (b"", b"'", b"''", b"\\", b"\n"):
        text = quote + literal(data + tail) + quote
        assert ast.literal_eval(text).encode("latin-1") == data + tail
        source = f"# coding: latin-1\nx = {text}\n".encode("latin-1")
        space: dict = {}
        exec(compile(source, "t.py", "exec"), space)
        assert space["x"].encode("latin-1") == data + tail
    assert len(bundle.triple_literal(data)) < len(bundle.literal(data))


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


RENAMES = """
class K:
    def __init__(self, width, depth=2):
        self.width, self.depth = width, depth
    def area(self, scale):
        return [self.width * scale for _ in range(self.depth)]
    @staticmethod
    def twice(value):
        return value * 2
def spread(first, second, *values, **named):
    return first + second + sum(values) + sum(named.values())
def keep(count, label=''):
    return label * count
def use():
    k = K(3, depth=4)
    return k.area(2), K.twice(5), spread(1, 2, 3, x=4), keep(2, label='ab')
"""


def test_a_parameter_is_renamed_only_where_no_caller_can_name_it():
    tree = ast.parse(RENAMES)
    rename.rename_locals(tree, frozenset(rename.keywords_of(tree)))
    params = {f.name: [a.arg for a in ast.walk(f.args) if isinstance(a, ast.arg)]
              for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)}
    assert params["__init__"][0] != "self" and params["__init__"][1:] == ["width", "depth"]  # a method's own
    assert params["area"][1:] == ["scale"] and params["twice"] == ["value"]
    assert not set(params["spread"]) & {"first", "second", "values", "named"}  # no call names them
    assert params["keep"][0] != "count" and params["keep"][1] == "label"  # keep(label=...) names it
    spaces: list[dict] = [{}, {}]
    for src, space in zip((RENAMES, ast.unparse(tree)), spaces, strict=True):
        exec(compile(src, "m.py", "exec"), space)
    assert spaces[0]["use"]() == spaces[1]["use"]() == ([6, 6, 6, 6], 10, 10, "abab")


GLOBALS = {
    "ga": """
LIMIT = 3
class Box:
    size = 2
class BadError(Exception):
    pass
def helper(x):
    return x + LIMIT + Box.size
def shadowed(y):
    return y
def load():
    return 'loaded'
def cli(argv):
    return helper(len(argv))
def uses_a_local():
    shadowed = 5
    return shadowed
""",
    "gb": """
import ga
from ga import helper, Box as B, BadError, shadowed
def run():
    try:
        raise BadError('no')
    except BadError:
        pass
    return helper(1), B().size, shadowed(4), ga.load(), ga.cli(['x'])
""",
}


def test_top_level_names_are_renamed_only_where_every_spelling_means_them():
    trees = {m: ast.parse(src) for m, src in GLOBALS.items()}
    rename.rename_globals(trees, frozenset({"cli", "run"}))  # what code outside calls
    names = {m: {n.name for n in t.body if isinstance(n, ast.FunctionDef | ast.ClassDef)} | {
        t.id for n in t.body if isinstance(n, ast.Assign) for t in n.targets} for m, t in trees.items()}
    # an exception class; a name a function binds as its local; one read as ga.load; one kept by the caller
    kept = {"BadError", "shadowed", "load", "cli"}
    assert names["ga"] & {"LIMIT", "Box", "helper", "uses_a_local"} == set() and kept <= names["ga"]
    assert "helper" not in ast.unparse(trees["gb"]) and "B()" in ast.unparse(trees["gb"])
    results = []
    for sources in (GLOBALS, {m: ast.unparse(t) for m, t in trees.items()}):
        for m in GLOBALS:
            sys.modules.pop(m, None)
        try:
            for m in GLOBALS:
                module = type(sys)(m)
                sys.modules[m] = module
                exec(compile(sources[m], m + ".py", "exec"), module.__dict__)
            results.append(sys.modules["gb"].run())
        finally:
            for m in GLOBALS:
                sys.modules.pop(m, None)
    assert results[0] == results[1] == (6, 2, 4, "loaded", 6)


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


# A tiny run of every stage: GPTQ, brotli, no TTT.
TINY = {"model": {"num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1},
        "train": {"seq_len": 32, "batch_tokens": 256, "micro_batch_seqs": 8, "iterations": 4,
                  "warmdown_steps": 2, "checkpoint_every": 100, "log_every": 1},
        "calibrate": {"source": "train", "seqs": 8, "seq_len": 32},
        "quant": {"method": "gptq", "min_numel": 256},
        "compress": {"codec": "brotli", "level": 5},
        "eval": {"seq_len": 32, "stride": 16, "batch_seqs": 8, "max_tokens": 2000}}


def stage_args(ds, d: Path, cfg: dict) -> dict[str, list[str]]:
    """Every stage's command line for the resolved config `cfg`, as the rules build them (pgolf/pipeline/
    plan.py: Hessians only for GPTQ, and for compress only with pruning; the unpruned tensors for
    evaluate with pruning), reading and writing in folder d."""
    js = lambda name: json.dumps(cfg[name])  # noqa: E731
    gptq, prune = cfg["quant"]["method"] == "gptq", cfg["compress"]["prune"]
    hessians = ["--hessians", str(d / "hessians.pgt")] if gptq else []
    out = {"train": ["--data", str(ds.dataset_dir), "--vocab-size", str(ds.vocab_size), "--model-cfg", js("model"),
                     "--cfg", js("train"), "--seed", "3", "--device", "cpu", "--out-dir", str(d), "--ckpt-dir",
                     str(d / "ckpt"), "--loader-cfg", js("loader")]}
    if gptq:
        out["calibrate"] = ["--weights", str(d / "ema.pgt"), "--data", str(ds.dataset_dir), "--cfg", js("calibrate"),
                            "--seed", "3", "--device", "cpu", "--out", str(d / "hessians.pgt")]
    out["quantize"] = ["--weights", str(d / "ema.pgt"), *hessians, "--cfg", js("quant"), "--out", str(d / "quant.pgt")]
    out["compress"] = ["--quant", str(d / "quant.pgt"), "--cfg", js("compress"), *(hessians if prune else []),
                       "--out", str(d / "artifact.pgz")]
    out["evaluate"] = ["--data", str(ds.dataset_dir), "--tokenizer", str(ds.tokenizer), "--ema", str(d / "ema.pgt"),
                       "--artifact", str(d / "artifact.pgz"), "--cfg", js("eval"), "--device", "cpu",
                       "--out", str(d / "eval.json"), *(["--unpruned", str(d / "quant.pgt")] if prune else [])]
    return out


def test_the_packed_file_trains_and_scores_as_the_package_does(tiny_dataset, tmp_path):
    """Train (under torchrun), calibrate, quantize, compress and evaluate (torchrun, two processes) from
    train_gpt.py alone in an empty folder; the package runs the same stages in this process."""
    folder = tmp_path / "submission"
    folder.mkdir()
    cfg = validate(TINY)
    (folder / bundle.FILE_NAME).write_bytes(bundle.for_config(cfg))  # this run's own file
    packed, package = tmp_path / "packed", tmp_path / "package"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    for stage, args in stage_args(tiny_dataset, packed, cfg).items():
        launcher = {"train": [*torchrun, "--nproc-per-node=1"], "evaluate": [*torchrun, "--nproc-per-node=2"]}
        cmd = [*launcher.get(stage, [sys.executable]), bundle.FILE_NAME, stage, *args]
        proc = subprocess.run(cmd, cwd=folder, env=packed_env(), capture_output=True, text=True)
        assert proc.returncode == 0, f"{stage}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    for stage, args in stage_args(tiny_dataset, package, cfg).items():
        main([stage, *args])
    ema = [tensorfile.load(d / "ema.pgt")[0] for d in (packed, package)]
    assert all(torch.equal(ema[0][k], ema[1][k]) for k in ema[1])
    for name in ("quant.pgt", "artifact.pgz"):
        assert (packed / name).read_bytes() == (package / name).read_bytes(), name
    ev = [json.loads((d / "eval.json").read_text()) for d in (packed, package)]
    for part in ("pre_quant", "post_quant", "sliding"):
        assert ev[0][part]["tokens"] == ev[1][part]["tokens"] > 0
        assert ev[0][part]["val_bpb"] == pytest.approx(ev[1][part]["val_bpb"], rel=1e-9)
