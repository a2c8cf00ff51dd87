"""`pgolf evaluate`: val BPB of the EMA weights, of the weights read back from the artifact, by
sliding window over the artifact weights, and with legal score-first TTT when eval.ttt.enabled.
Windows are spread over processes under torchrun; the scored path is checked against the budget."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pgolf import tensorfile
from pgolf.data.shards import check_tokenizer, check_vocab, load_split, open_dataset
from pgolf.distributed import setup_distributed, teardown
from pgolf.errors import PgolfError
from pgolf.eval.bpb import BPBMeter, byte_counts
from pgolf.eval.ttt import freeze, ttt_eval
from pgolf.eval.windows import plain_windows, score_windows, windows
from pgolf.io import write_json
from pgolf.model import GPT, load_weights
from pgolf.quant.artifact import read_artifact, read_header
from pgolf.quant.quantize import dequantize
from pgolf.results import first_nonfinite
from pgolf.runtime import PRECISIONS, compiled

__all__ = ["evaluate", "plain_windows", "score", "val_tokens", "windows"]


def val_tokens(data: str | Path, max_tokens: int, seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """All val shards in order, cut to max_tokens targets when max_tokens > 0 (ids checked against
    vocab_size when given)."""
    tokens = torch.from_numpy(load_split(data, "val", vocab_size).astype(np.int64))
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    if len(tokens) - 1 < seq_len:
        raise PgolfError(f"{data}: {len(tokens)} val tokens are fewer than one window "
                         f"of eval.seq_len={seq_len} + 1")
    return tokens


@torch.inference_mode()
def score(model: GPT, tokens: torch.Tensor, wins: list[tuple[int, int]], seq_len: int, batch: int,
          meter: BPBMeter, rank: int = 0, world: int = 1, label: str = "", precision: str = "auto",
          forward: torch.nn.Module | None = None) -> dict:
    """BPB over windows `wins` (this process takes every world-th one), summed over all processes.
    `forward` is the model to run (its compiled form), `model` by default."""
    device = next(model.parameters()).device
    run = forward if forward is not None else model  # a compiled module has no truth value
    score_windows(run, tokens, wins[rank::world], seq_len, batch, meter, device, precision,
                  label=label if rank == 0 else "")
    meter.all_reduce()
    return meter.result()


def artifact_model(path: str | Path) -> GPT:
    """The model as the artifact holds it: read, checked, decompressed and dequantized."""
    return quantized_model(*dequantize(*tensorfile.loads(read_artifact(path), str(path))))


def quantized_model(state: dict[str, torch.Tensor], meta: dict) -> GPT:
    model = GPT.from_meta(meta)
    model.load_state_dict(state)
    return model


def pruning(args: argparse.Namespace, post_quant: dict, score_model: Callable[[GPT], dict]) -> dict:
    """How many +-1 codes compress pruned and the BPB before pruning: the quantized tensors compress
    read (--unpruned), scored as post_quant is; post_quant itself when nothing was pruned. Without
    --unpruned, a pruned artifact reports only its count."""
    pruned = int(read_header(args.artifact).get("pruned_codes", 0))
    if pruned and getattr(args, "unpruned", None) is None:
        return {"pruned_codes": pruned}
    unpruned = score_model(quantized_model(*dequantize(args.unpruned))) if pruned else post_quant
    return {"pruned_codes": pruned, "unpruned": unpruned, "prune_cost_bpb": post_quant["val_bpb"] - unpruned["val_bpb"]}


def evaluate(args: argparse.Namespace, cfg: dict, rank: int, world: int, device: torch.device) -> dict:
    T, B = cfg["seq_len"], cfg["batch_seqs"]
    # A tokenizer other than the shards' counts other bytes: a plausible BPB, and a wrong one.
    check_tokenizer(args.data, args.tokenizer)
    ema, art = load_weights(args.ema).to(device).eval(), artifact_model(args.artifact).to(device).eval()
    open_dataset(args.data, ema.vocab_size, f"the vocabulary of {args.ema}")
    check_vocab(args.data, art.vocab_size, f"the vocabulary of {args.artifact}")
    tokens = val_tokens(args.data, cfg["max_tokens"], T, ema.vocab_size)
    luts = byte_counts(args.data, args.tokenizer, ema.vocab_size, len(tokens))  # a CaseOps sidecar, or the tables
    plain, sliding = plain_windows(len(tokens), T), windows(len(tokens), T, cfg["stride"])
    if cfg["ttt"]["enabled"]:  # frozen before the first compile: requires_grad is part of a compiled graph's guards
        freeze(art, cfg["ttt"])
    precision = getattr(args, "precision", "auto")
    fwd = {id(m): compiled(m, cfg["compile"], device) for m in (ema, art)}
    parts = {"pre_quant": (ema, plain), "post_quant": (art, plain), "sliding": (art, sliding)}
    result, seconds = {}, {}
    for name, (model, wins) in parts.items():
        t0 = time.perf_counter()
        result[name] = score(model, tokens, wins, T, B, BPBMeter(luts), rank, world, label=name,
                             precision=precision, forward=fwd[id(model)])
        seconds[name] = time.perf_counter() - t0
        log(rank, f"{name}: bpb {result[name]['val_bpb']:.4f} loss {result[name]['val_loss']:.4f} "
                  f"({len(wins)} windows, {seconds[name]:.1f}s)")
    result["sliding"].update(seq_len=T, stride=cfg["stride"])
    t0 = time.perf_counter()  # not part of the scored path: a diagnostic of pruning's cost
    result.update(pruning(args, result["post_quant"], lambda m: score(
        m.to(device).eval(), tokens, plain, T, B, BPBMeter(luts), rank, world, label="unpruned", precision=precision)))
    if "unpruned" in result and result["pruned_codes"]:
        seconds["unpruned"] = time.perf_counter() - t0
        log(rank, f"unpruned: bpb {result['unpruned']['val_bpb']:.4f}, pruning {result['pruned_codes']:,} codes cost "
                  f"{result['prune_cost_bpb']:+.4f} ({seconds['unpruned']:.1f}s)")
    if cfg["ttt"]["enabled"]:  # adapts `art` in place: it runs last
        t0 = time.perf_counter()
        result["ttt"] = ttt_eval(art, tokens, sliding, T, B, cfg["ttt"], BPBMeter(luts), rank, world,
                                 precision=precision, forward=fwd[id(art)])
        seconds["ttt"] = time.perf_counter() - t0
        result["ttt_gain_bpb"] = result["ttt"]["val_bpb"] - result["sliding"]["val_bpb"]
        log(rank, f"ttt: bpb {result['ttt']['val_bpb']:.4f} (gain {result['ttt_gain_bpb']:+.4f}) over "
                  f"{result['ttt']['chunks']} chunks, {seconds['ttt']:.1f}s")
    result["quant_gap_bpb"] = result["post_quant"]["val_bpb"] - result["pre_quant"]["val_bpb"]
    result["eval_seconds"] = seconds
    result["scored_eval_seconds"] = seconds["sliding"] + seconds.get("ttt", 0.0)
    check_budget(cfg, result["scored_eval_seconds"], rank)
    return result


def log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def check_budget(cfg: dict, used: float, rank: int) -> None:
    """Warn or fail (eval.on_over_budget) when the scored path ran past eval.time_budget_seconds."""
    budget = cfg["time_budget_seconds"]
    if not budget or used <= budget:
        return
    msg = f"the scored evaluation (sliding window + TTT) took {used:.1f}s, over eval.time_budget_seconds={budget}"
    if cfg["on_over_budget"] == "fail":
        raise PgolfError(msg)
    log(rank, f"WARNING: {msg}")


def refuse_nonfinite(result: dict, args: argparse.Namespace) -> None:
    """A NaN score is no score: name the weights it came from, and write no eval.json for aggregate to average."""
    bad = first_nonfinite(result)
    if bad is not None:
        source = args.ema if bad[0].startswith("pre_quant") else args.artifact
        raise PgolfError(f"{source}: {bad[0]} is {bad[1]} (NaN/Inf weights or an overflow); {args.out} not written")


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf evaluate", description=__doc__)
    for name in ("--data", "--tokenizer", "--ema", "--artifact", "--cfg", "--out"):
        ap.add_argument(name, required=True)
    ap.add_argument("--unpruned", help="the quantized tensors before pruning, to score what pruning cost")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="autocast: bf16, fp32, auto (bf16 on CUDA)")
    args = ap.parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    result = evaluate(args, json.loads(args.cfg), rank, world, device)
    refuse_nonfinite(result, args)  # every process holds the same all-reduced result, so all stop alike
    if rank == 0:
        write_json(args.out, result)
    teardown(world)
