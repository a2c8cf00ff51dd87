"""Legal score-first TTT: the order is structural, the audit proves it and catches the wrong one."""

import ast
import copy
from pathlib import Path

import pytest
import torch
from conftest import evaluate_on_two_processes
from test_evaluate import evaluate_on_one_process

from pgolf.config import ConfigError, validate
from pgolf.eval.audit import audit
from pgolf.eval.bpb import BPBMeter, build_byte_luts
from pgolf.eval.evaluate import score, val_tokens, windows
from pgolf.eval.ttt import chunk_windows, ttt_eval

SEQ, STRIDE = 32, 8


def eval_cfg(**ttt) -> dict:
    base = {"enabled": True, "lr": 0.05, "epochs": 2, "chunk_tokens": 256, "batch_seqs": 4}
    return validate({"eval": {"seq_len": SEQ, "stride": STRIDE, "batch_seqs": 8, "max_tokens": 1200,
                              "ttt": {**base, **ttt}}})["eval"]


@pytest.fixture(scope="module")
def val(tiny_dataset):
    tokens = val_tokens(tiny_dataset.dataset_dir, 1200, SEQ)
    return tokens, build_byte_luts(tiny_dataset.tokenizer, tiny_dataset.vocab_size)


def run(model, val, cfg, **kw):
    tokens, luts = val
    return ttt_eval(copy.deepcopy(model), tokens, windows(len(tokens), SEQ, STRIDE), SEQ, 8, cfg["ttt"],
                    BPBMeter(luts), **kw)


def test_chunks_cover_every_window_in_order():
    wins = windows(1201, SEQ, STRIDE)
    chunks = chunk_windows(wins, SEQ, 256)
    assert [w for c in chunks for w in c.windows] == wins
    assert all(a.hi <= b.lo for a, b in zip(chunks, chunks[1:], strict=False))
    assert chunks[0].lo == 0 and chunks[-1].hi == 1200 and len(chunks) == 5


def test_zero_epochs_is_exactly_the_sliding_window_score(small_model, val):
    tokens, luts = val
    sliding = score(small_model, tokens, windows(len(tokens), SEQ, STRIDE), SEQ, 8, BPBMeter(luts))
    got = run(small_model, val, eval_cfg(epochs=0))
    assert got["tokens"] == sliding["tokens"] and got["bytes"] == sliding["bytes"]
    assert got["val_bpb"] == pytest.approx(sliding["val_bpb"], rel=1e-12, abs=0)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_ttt_adapts_and_freezes_what_it_is_told(small_model, val, optimizer):
    lr = 0.05 if optimizer == "sgd" else 0.003
    model = copy.deepcopy(small_model)
    tokens, luts = val
    sliding = score(model, tokens, windows(len(tokens), SEQ, STRIDE), SEQ, 8, BPBMeter(luts))
    cfg = eval_cfg(optimizer=optimizer, lr=lr, freeze_blocks=1)
    got = ttt_eval(model, tokens, windows(len(tokens), SEQ, STRIDE), SEQ, 8, cfg["ttt"], BPBMeter(luts))
    assert got["val_bpb"] < sliding["val_bpb"]  # the chunks it has trained on help the next ones
    for k, v in small_model.blocks[0].state_dict().items():
        assert torch.equal(model.blocks[0].state_dict()[k], v)  # frozen
    assert not torch.equal(model.blocks[1].mlp.fc.weight, small_model.blocks[1].mlp.fc.weight)


def test_audit_passes_the_legal_order_inside_a_chunk_and_on_its_boundary(small_model, val):
    tokens, luts = val
    report = audit(small_model, tokens, eval_cfg(), luts)
    assert [r["t"] for r in report] == [384, 255] and all(r["ok"] and r["checked"] > 200 for r in report)


def train_then_score(chunks, score, train):
    """The illegal order (PR #1517's pattern within a chunk), only here to show the audit catches it."""
    for c, chunk in enumerate(chunks):
        train(c, chunk)
        score(c, chunk)


def test_audit_catches_training_before_scoring(small_model, val):
    tokens, luts = val
    report = audit(small_model, tokens, eval_cfg(), luts, order=train_then_score)
    inside = report[0]
    assert not inside["ok"] and inside["first_changed"] <= 256 + 128  # chunk 1's own targets moved


def test_the_two_ttt_modes_import_the_shared_steps_not_each_other():
    """Chunk and phased TTT build on pgolf.eval.tttsteps; evaluate picks the mode. Either mode importing
    the other (at the top or inside a function) would bring back the import circle."""
    root = Path(__file__).resolve().parent.parent / "pgolf" / "eval"
    for mode, other in (("ttt", "phased"), ("phased", "ttt")):
        tree = ast.parse((root / f"{mode}.py").read_text())
        names = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "pgolf.eval.tttsteps" in names and f"pgolf.eval.{other}" not in names, mode


def test_illegal_ttt_configs_are_refused_naming_the_rule():
    for bad in ({"prequant": True}, {"passes": 2}, {"rescore": True}):
        with pytest.raises(ConfigError, match="score-before-update rule"):
            validate({"eval": {"ttt": bad}})


def test_eval_budget_warns_or_fails(setup, capsys, tmp_path):
    cfg = eval_cfg(epochs=1)
    cfg.update(time_budget_seconds=1e-6, max_tokens=400)
    r = evaluate_on_one_process(setup, cfg, tmp_path / "eval.json")
    assert "WARNING: the scored evaluation" in capsys.readouterr().out
    assert r["scored_eval_seconds"] == r["eval_seconds"]["sliding"] + r["eval_seconds"]["ttt"]
    assert r["ttt_gain_bpb"] == r["ttt"]["val_bpb"] - r["sliding"]["val_bpb"]
    cfg["on_over_budget"] = "fail"
    with pytest.raises(ValueError, match="over eval.time_budget_seconds"):
        evaluate_on_one_process(setup, cfg, tmp_path / "failed.json")
    assert not (tmp_path / "failed.json").exists()


def test_two_processes_match_one(setup, tmp_path):
    cfg = eval_cfg(batch_seqs=4)
    cfg["max_tokens"] = 600
    one = evaluate_on_one_process(setup, cfg, tmp_path / "one.json")
    two = evaluate_on_two_processes(setup, cfg, tmp_path / "eval.json")
    assert two["ttt"]["tokens"] == one["ttt"]["tokens"]
    assert two["ttt"]["val_bpb"] == pytest.approx(one["ttt"]["val_bpb"], rel=1e-5)
    assert two["ttt"]["val_bpb"] != two["sliding"]["val_bpb"]
