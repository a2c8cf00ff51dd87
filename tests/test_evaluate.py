import argparse

import numpy as np
import pytest
import torch

from pgolf import tensorfile
from pgolf.config import validate
from pgolf.data.shards import load_split
from pgolf.eval.bpb import BPBMeter, build_byte_luts
from pgolf.eval.evaluate import evaluate, plain_windows, score, windows
from pgolf.model import GPT
from pgolf.quant.compress import compress
from pgolf.quant.quantize import quantize


@pytest.mark.parametrize("n,seq,stride", [(101, 10, 3), (100, 10, 10), (57, 8, 5), (9, 8, 4)])
def test_sliding_windows_score_every_target_once(n, seq, stride):
    seen = []
    for start, first in windows(n, seq, stride):
        assert 0 <= start and start + seq <= n - 1 and 0 <= first < seq
        seen += range(start + first, start + seq)
    assert sorted(seen) == list(range(n - 1))


def test_plain_windows_drop_the_tail_like_the_challenge():
    assert plain_windows(25, 10) == [(0, 0), (10, 0)]


@pytest.fixture(scope="module")
def small_model(tiny_dataset):
    torch.manual_seed(0)
    cfg = validate({"model": {"num_layers": 2, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1}})["model"]
    model = GPT(tiny_dataset.vocab_size, cfg)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_stride_equal_to_window_is_the_plain_evaluation(tiny_dataset, small_model):
    tokens = torch.from_numpy(load_split(tiny_dataset.dataset_dir, "val").astype(np.int64))
    seq = 16
    tokens = tokens[: (len(tokens) - 1) // seq * seq + 1]
    luts = build_byte_luts(tiny_dataset.tokenizer, tiny_dataset.vocab_size)
    plain = score(small_model, tokens, plain_windows(len(tokens), seq), seq, 8, BPBMeter(luts))
    slide = score(small_model, tokens, windows(len(tokens), seq, seq), seq, 8, BPBMeter(luts))
    assert plain == slide


def test_evaluate_end_to_end(tiny_dataset, small_model, tmp_path):
    meta = {**small_model.meta(), "step": 0, "seed": 0}
    tensorfile.save(tmp_path / "ema.pgt", small_model.state_dict(), meta)
    quantize(tmp_path / "ema.pgt", {"method": "rtn", "bits": 8, "clip_quantile": 1.0, "min_numel": 256},
             tmp_path / "q.pgt")
    compress(tmp_path / "q.pgt", {"codec": "zstd", "level": 3}, tmp_path / "a.pgz")
    args = argparse.Namespace(data=tiny_dataset.dataset_dir, tokenizer=tiny_dataset.tokenizer,
                              ema=tmp_path / "ema.pgt", artifact=tmp_path / "a.pgz")
    cfg = {"seq_len": 32, "stride": 8, "batch_seqs": 16, "max_tokens": 2000}
    r = evaluate(args, cfg, 0, 1, torch.device("cpu"))
    assert r["pre_quant"]["tokens"] == 1984 and r["sliding"]["tokens"] == 2000
    assert 0 < abs(r["quant_gap_bpb"]) < 0.05  # int8 barely moves the loss, but it does move it
    assert r["sliding"]["val_bpb"] < r["post_quant"]["val_bpb"] + 0.05
