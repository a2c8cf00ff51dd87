"""Evaluation: window coverage, sliding == plain at stride == window, and the stage end to end."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import evaluate_on_two_processes

from pgolf.cli import main
from pgolf.config import validate
from pgolf.eval.bpb import BPBMeter, build_byte_luts
from pgolf.eval.evaluate import evaluate, plain_windows, score, val_tokens, windows
from pgolf.formats.results import read_result
from pgolf.formats.shards import load_split
from pgolf.model.gpt import token_losses


@pytest.mark.parametrize("n,seq,stride", [(101, 10, 3), (100, 10, 10), (57, 8, 5), (9, 8, 4), (40, 8, 1)])
def test_sliding_windows_score_every_target_once(n, seq, stride):
    seen = []
    wins = windows(n, seq, stride)
    for i, (start, first) in enumerate(wins):
        assert 0 <= start and start + seq <= n - 1 and 0 <= first < seq
        assert (start, first) == (0, 0) if i == 0 else seq - first <= stride  # only the first scores it all
        if 0 < i < len(wins) - 1:
            assert first == seq - stride  # full context: each scored target sees seq - stride earlier tokens
        seen += range(start + first, start + seq)
    assert sorted(seen) == list(range(n - 1))


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="stride=9 must lie in 1..eval.seq_len=8"):
        windows(100, 8, 9)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows(8, 8, 4)


def test_plain_windows_drop_the_tail_like_the_challenge():
    assert plain_windows(25, 10) == [(0, 0), (10, 0)]
    assert plain_windows(21, 10) == [(0, 0), (10, 0)]
    assert plain_windows(20, 10) == [(0, 0)]


def test_stride_equal_to_window_is_the_plain_evaluation(tiny_dataset, small_model):
    seq = 16
    tokens = val_tokens(tiny_dataset.dataset_dir, 3000, seq)
    tokens = tokens[: (len(tokens) - 1) // seq * seq + 1]
    luts = build_byte_luts(tiny_dataset.tokenizer, tiny_dataset.vocab_size)
    plain = score(small_model, tokens, plain_windows(len(tokens), seq), seq, 8, BPBMeter(luts))
    slide = score(small_model, tokens, windows(len(tokens), seq, seq), seq, 8, BPBMeter(luts))
    assert plain == slide and plain["tokens"] == len(tokens) - 1


def test_plain_score_matches_a_direct_computation(tiny_dataset, small_model):
    seq, n = 16, 16 * 20 + 5
    tokens = val_tokens(tiny_dataset.dataset_dir, n - 1, seq)
    luts = build_byte_luts(tiny_dataset.tokenizer, tiny_dataset.vocab_size)
    got = score(small_model, tokens, plain_windows(n, seq), seq, 7, BPBMeter(luts))
    x = tokens[: 20 * seq].view(20, seq)
    y = tokens[1 : 20 * seq + 1].view(20, seq)
    with torch.no_grad():
        nats = token_losses(small_model, x, y).double().sum().item()
    nbytes = (luts.base_bytes[y] + (luts.has_leading_space[y] & ~luts.is_boundary[x]).int()).sum().item()
    assert got["tokens"] == 20 * seq and got["bytes"] == nbytes
    assert got["val_bpb"] == pytest.approx(nats / np.log(2) / nbytes, rel=1e-6)


def test_val_tokens_concatenate_the_split_and_cap(tiny_dataset):
    full = load_split(tiny_dataset.dataset_dir, "val")
    assert torch.equal(val_tokens(tiny_dataset.dataset_dir, 0, 16), torch.from_numpy(full.astype(np.int64)))
    assert len(val_tokens(tiny_dataset.dataset_dir, 100, 16)) == 101
    with pytest.raises(ValueError, match="fewer than one window of eval.seq_len=200"):
        val_tokens(tiny_dataset.dataset_dir, 100, 200)


def evaluate_on_one_process(setup, cfg: dict, out: Path, **kw) -> dict:
    """The evaluate stage's entry in this process (no torchrun: rank 0 of 1), on the CPU."""
    return evaluate(cfg, setup.data, setup.tokenizer, setup.ema, setup.artifact, out, "cpu", **kw)


def test_evaluate_end_to_end(setup, tmp_path):
    cfg = validate({"eval": {"seq_len": 32, "stride": 8, "batch_seqs": 16, "max_tokens": 2000}})["eval"]
    r = evaluate_on_one_process(setup, cfg, tmp_path / "eval.json")
    assert read_result(tmp_path / "eval.json") == r  # what the stage returns is what it wrote
    assert r["pre_quant"]["tokens"] == r["post_quant"]["tokens"] == 1984 and r["sliding"]["tokens"] == 2000
    assert r["quant_gap_bpb"] == r["post_quant"]["val_bpb"] - r["pre_quant"]["val_bpb"]
    assert 0 < abs(r["quant_gap_bpb"]) < 0.05  # int8 barely moves the loss, but it does move it
    assert r["sliding"]["seq_len"] == 32 and r["sliding"]["stride"] == 8
    assert set(r["eval_seconds"]) == {"pre_quant", "post_quant", "sliding"}


def test_two_processes_match_one(setup, tmp_path):
    """Under torchrun the windows are split over processes and the sums all-reduced: same numbers."""
    cfg = validate({"eval": {"seq_len": 32, "stride": 8, "batch_seqs": 4, "max_tokens": 1000}})["eval"]
    one = evaluate_on_one_process(setup, cfg, tmp_path / "one.json")
    two = evaluate_on_two_processes(setup, cfg, tmp_path / "eval.json")
    for part in ("pre_quant", "post_quant", "sliding"):
        assert two[part]["tokens"] == one[part]["tokens"] and two[part]["bytes"] == one[part]["bytes"]
        assert two[part]["val_bpb"] == pytest.approx(one[part]["val_bpb"], rel=1e-6)


def test_cli_reports_bad_input_without_a_traceback(setup, tmp_path, capsys):
    cfg = {"seq_len": 32, "stride": 64, "batch_seqs": 4, "max_tokens": 1000}
    argv = ["--cfg", json.dumps(cfg), "--device", "cpu", "--out", str(tmp_path / "e.json")]
    for key in ("data", "tokenizer", "ema"):
        argv += [f"--{key}", str(getattr(setup, key))]
    with pytest.raises(SystemExit, match="^1$"):
        main(["evaluate", *argv, "--artifact", str(setup.artifact)])
    assert capsys.readouterr().err.startswith("pgolf evaluate: eval.stride=64 must lie in")
    (tmp_path / "bad.pgz").write_bytes(setup.artifact.read_bytes()[:-10])
    with pytest.raises(SystemExit, match="^1$"):
        main(["evaluate", *argv, "--artifact", str(tmp_path / "bad.pgz")])
    assert re.match(r"pgolf evaluate: .*bad\.pgz: ", capsys.readouterr().err)
