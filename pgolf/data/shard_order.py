"""`pgolf shard-order`: score every train shard's difficulty, for hardest- or easiest-first training.

Two scores per shard, to compare (PR #549's shard-ordering claim, and PR #772's negative result):
- probe loss: a probe model's mean cross-entropy (nats/token) on `sample_tokens` of the shard, in
  evenly spaced windows;
- KL divergence of the shard's unigram distribution from the whole train set's (a token
  statistic that needs no model).
shard_order.json holds both, the orders, the probe loss spread and the two scores' correlation.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from pgolf.formats.shards import open_dataset, open_shard, shard_files
from pgolf.errors import PgolfError
from pgolf.formats.results import write_result
from pgolf.model.gpt import GPT, load_weights, token_losses


@torch.inference_mode()
def probe_loss(model: GPT, tokens: np.ndarray, sample: int, seq_len: int, batch: int = 32) -> float:
    """Mean nats/token of the model on evenly spaced windows covering about `sample` targets."""
    n = max(1, min(sample // seq_len, (len(tokens) - 1) // seq_len))
    starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
    total, count = 0.0, 0
    for i in range(0, n, batch):
        rows = np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts[i : i + batch]])
        idx = torch.from_numpy(rows)
        total += token_losses(model, idx[:, :-1], idx[:, 1:]).double().sum().item()
        count += idx[:, 1:].numel()
    return total / count


def unigram_kl(counts: np.ndarray, total: np.ndarray) -> float:
    """KL(shard || all) in nats, both add-one smoothed so unseen tokens stay finite."""
    p = (counts + 1) / (counts.sum() + len(counts))
    q = (total + 1) / (total.sum() + len(total))
    return float((p * np.log(p / q)).sum())


def pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 2:
        return float("nan")
    r = np.corrcoef(a, b)[0, 1]
    return float(r) if np.isfinite(r) else float("nan")


def score_shards(dataset_dir: str | Path, probe: str | Path, cfg: dict, vocab: int) -> dict:
    open_dataset(dataset_dir, vocab, "--vocab-size (tokenizer.vocab_size)")
    model = load_weights(probe).eval()
    if model.vocab_size != vocab:
        raise PgolfError(f"{probe}: the probe model's vocabulary is {model.vocab_size}, the shards' is {vocab}")
    listed = shard_files(dataset_dir, "train")
    files = [path for path, _ in listed]
    shards = [open_shard(path, sha, vocab) for path, sha in listed]
    counts = [np.bincount(s, minlength=vocab).astype(np.float64) for s in shards]
    total = np.sum(counts, axis=0)
    losses = [probe_loss(model, s, cfg["sample_tokens"], cfg["seq_len"]) for s in shards]
    kls = [unigram_kl(c, total) for c in counts]
    hardest = sorted(range(len(files)), key=lambda i: -losses[i])
    return {
        "probe": str(probe),
        "shards": [{"index": i, "name": f.name, "tokens": len(s), "probe_loss": loss, "unigram_kl": kl}
                   for i, (f, s, loss, kl) in enumerate(zip(files, shards, losses, kls, strict=True))],
        "hardest_first": hardest, "easiest_first": hardest[::-1],
        "probe_loss_spread": max(losses) - min(losses),
        "probe_loss_spread_bits": (max(losses) - min(losses)) / math.log(2),
        "unigram_kl_spread": max(kls) - min(kls),
        "correlation": pearson(losses, kls),
    }


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf shard-order", description=__doc__)
    ap.add_argument("--data", required=True, help="dataset folder (its train shards)")
    ap.add_argument("--probe", required=True, help="probe weights (tensor file)")
    ap.add_argument("--cfg", required=True, help="the order config section as JSON")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--out", required=True, help="shard_order.json")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = score_shards(args.data, args.probe, json.loads(args.cfg), args.vocab_size)
    result["seconds"] = time.perf_counter() - t0
    write_result(args.out, result)
    for s in result["shards"]:
        print(f"{s['name']}: probe loss {s['probe_loss']:.4f} nats/token, unigram KL {s['unigram_kl']:.5f}")
    print(f"spread {result['probe_loss_spread']:.4f} nats ({result['probe_loss_spread_bits']:.4f} bits), "
          f"correlation with KL {result['correlation']:.3f}; hardest first {result['hardest_first']}", flush=True)
