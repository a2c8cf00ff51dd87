"""Each preset's own train_gpt.py (pgolf.pipeline.bundle, from the features its config switches on): it
builds (the packer refuses a file whose code names what it left out), holds the code of every switch the
preset turns on and none of the others, and runs every stage alone, on CPU, for a shrunk copy of the
preset whose switches, and so whose packed bytes, are the preset's own. PR #1855's and #2135's files run
in test_pr1855_smoke.py and test_pr2135_smoke.py (their CaseOps datasets come from those runs)."""

import ast
import json
import subprocess
import sys

import pytest
from test_bundle import CODE_BOUND, packed_env, stage_args

from pgolf.config import deep_merge, load, validate
from pgolf.pipeline import bundle, features

PRESETS = ["config.yaml", "configs/smoke.yaml", "configs/pr549.yaml", "configs/pr1326.yaml",
           "configs/pr1517.yaml", "configs/pr461.yaml", "configs/pr1855.yaml", "configs/pr1855-smoke.yaml",
           "configs/pr2135.yaml", "configs/pr2135-smoke.yaml"]


def defined(mods: dict[str, str], entry: str) -> bool:
    """Whether the packed modules hold what a feature's entry names: a module, a definition, a method
    ('Class.method') or a dict's key ('NAME[key]')."""
    module, _, rest = entry.partition(":")
    if module not in mods or not rest:
        return module in mods
    name, _, key = rest.rstrip("]").partition("[")
    name, _, method = name.partition(".")
    for stmt in ast.parse(mods[module]).body:
        target = stmt.targets[0] if isinstance(stmt, ast.Assign) else getattr(stmt, "target", None)
        if key and getattr(target, "id", None) == name:
            return any(isinstance(k, ast.Constant) and k.value == key for k in stmt.value.keys)
        if not key and getattr(stmt, "name", None) == name:
            return not method or any(getattr(s, "name", None) == method for s in stmt.body)
    return False


@pytest.mark.parametrize("preset", PRESETS)
def test_a_preset_packs_the_code_its_switches_reach_and_no_other(preset):
    on = features.needed(load(preset))
    mods = bundle.modules(on)
    for f in features.FEATURES:
        for entry in f.code:
            if f.name in on:  # a module its own feature keeps may still lose what only other features used
                assert defined(mods, entry), (f.name, entry)
            else:
                assert not defined(mods, entry), (f.name, entry)
    assert ("pgolf.quant.calibrate" in mods) == ("gptq" in on)  # the calibrate stage serves GPTQ only
    assert bundle.code_bytes(on) < min(CODE_BOUND, bundle.code_bytes())


def shrunk(preset: str, vocab_size: int) -> dict:
    """The preset with every size and step count cut to seconds on CPU and its switches untouched."""
    cfg = load(preset)
    m, t = cfg["model"], cfg["train"]
    small = {
        "device": "cpu", "data": {"source": "local", "name": "tiny", "paths": ["tests/fixtures/corpus"]},
        "tokenizer": {"vocab_size": vocab_size},
        "model": {"model_dim": 32, "num_heads": 2, "num_kv_heads": 1, "rope_dims": min(m["rope_dims"], 16),
                  "ve_dim": 16, "bigram_dim": 16, **({"recur_start_step": 1} if m["recur_start_step"] else {})},
        "train": {"nproc": 1, "seq_len": 32, "batch_tokens": 256, "micro_batch_seqs": 8, "iterations": 3,
                  "max_wallclock_seconds": 0, "prime_steps": min(t["prime_steps"], 1), "muon_momentum_warmup_steps": 2,
                  "swa_every": 1, "checkpoint_every": 2, "log_every": 1},
        "calibrate": {"seqs": 4, "seq_len": 32, "batch_seqs": 4},
        "quant": {"min_numel": 256, "block_size": 16},
        "eval": {"seq_len": 32, "stride": 16, "batch_seqs": 8, "max_tokens": 1500,
                 "ttt": {"chunk_tokens": 256, "batch_seqs": 4, "epochs": 1}},
    }
    return validate(deep_merge(cfg, small))


# The n-gram tilt at evaluation, on in no preset: the default run with it on is run too (contexts of two
# tokens, so that it fires on the tiny val stream).
TILT = {"eval": {"ngram_tilt": {"enabled": True, "order": 3, "threshold": 0.5}}}


def test_the_ngram_tilt_is_packed_only_where_the_config_turns_it_on():
    cfg = load("config.yaml")
    off, on = features.needed(cfg), features.needed(validate(deep_merge(cfg, TILT)))
    assert on == off | {"ngram_tilt"}
    assert "pgolf.eval.ngram" in bundle.modules(on) and "pgolf.eval.ngram" not in bundle.modules(off)
    assert bundle.code_bytes(off) < bundle.code_bytes(on) < CODE_BOUND


# The smoke run's file is the default run's (the same switches): run once.
RUN = ["config.yaml", "configs/pr549.yaml", "configs/pr1326.yaml", "configs/pr1517.yaml", "configs/pr461.yaml"]
DRIVER = """import json, sys
sys.argv = [sys.argv[0], '--help']
exec(compile(open('train_gpt.py', 'rb').read(), 'train_gpt.py', 'exec'))
from pgolf.cli import main
for argv in json.loads(sys.stdin.read()):
    print('== ' + argv[0], flush=True)
    main(argv)
"""


@pytest.mark.parametrize(("preset", "tilt"), [*((p, False) for p in RUN), ("config.yaml", True)],
                         ids=[*RUN, "config.yaml+ngram_tilt"])
def test_a_preset_packed_file_runs_every_stage_alone(preset, tilt, tiny_dataset, tmp_path):
    """train, calibrate (GPTQ presets), quantize, compress and evaluate, one after another in one process
    that holds nothing of pgolf but the packed file (it refuses any other pgolf module); with `tilt`,
    the preset with the n-gram tilt on, whose file must score the tilted passes too."""
    cfg = shrunk(preset, tiny_dataset.vocab_size)
    cfg = validate(deep_merge(cfg, TILT)) if tilt else cfg
    on = features.needed(cfg)
    assert on == features.needed(load(preset)) | ({"ngram_tilt"} if tilt else set())  # the file the run packs
    if preset == "config.yaml" and not tilt:
        assert features.needed(load("configs/smoke.yaml")) == on  # the smoke run's file too
    folder, work = tmp_path / "submission", tmp_path / "work"
    folder.mkdir()
    (folder / bundle.FILE_NAME).write_bytes(bundle.build(on))
    stages = stage_args(tiny_dataset, work, cfg)
    assert ("calibrate" in stages) == ("gptq" in on)
    proc = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps([[s, *a] for s, a in stages.items()]),
                          cwd=folder, env=packed_env(), capture_output=True, text=True)
    assert proc.returncode == 0, f"{preset}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    ev = json.loads((work / "eval.json").read_text())
    parts = ["pre_quant", "post_quant", "sliding", *(["ttt"] if cfg["eval"]["ttt"]["enabled"] else [])]
    assert all(0 < ev[p]["val_bpb"] < 20 for p in parts) and ("ttt" in ev) == ("ttt" in parts)
    assert ("sliding_ngram" in ev) == tilt
    if tilt:  # the tilt fired and moved the score; the untilted one stays beside it
        assert ev["sliding_ngram"]["hinted"] > 0 and ev["sliding_ngram"]["gain_bpb"] != 0
        assert ev["sliding_ngram"]["tokens"] == ev["sliding"]["tokens"]
    if "gptq" not in on:
        assert "unknown stage 'calibrate'" in subprocess.run(
            [sys.executable, bundle.FILE_NAME, "calibrate"], cwd=folder, env=packed_env(), capture_output=True,
            text=True).stderr
