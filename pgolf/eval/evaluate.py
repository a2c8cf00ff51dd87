"""`pgolf evaluate`: val BPB of the EMA weights, of the weights read back from the artifact, and by
sliding window over the artifact weights. Windows are spread over processes under torchrun."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pgolf import tensorfile
from pgolf.data.shards import load_split
from pgolf.distributed import setup_distributed
from pgolf.eval.bpb import BPBMeter, build_byte_luts
from pgolf.io import write_json
from pgolf.model import GPT, load_weights, token_losses
from pgolf.quant.artifact import read_artifact
from pgolf.quant.quantize import load_quantized


def windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int]]:
    """(start, first scored offset) of each window over a stream of n_tokens tokens (n_tokens-1 targets).

    Each window holds seq_len inputs from `start`; it scores its targets from offset `first` on, so
    every target is scored exactly once, with as much context as the window allows. stride ==
    seq_len gives the challenge's plain non-overlapping evaluation.
    """
    n_targets = n_tokens - 1
    if n_targets < seq_len:
        raise ValueError(f"{n_tokens} val tokens are fewer than one window of {seq_len}")
    out, scored = [(0, 0)], seq_len
    while scored < n_targets:
        end = min(scored + stride, n_targets)
        start = end - seq_len
        out.append((start, scored - start))
        scored = end
    return out


def plain_windows(n_tokens: int, seq_len: int) -> list[tuple[int, int]]:
    """The challenge's eval_val: non-overlapping windows, the tail that does not fill one dropped."""
    usable = (n_tokens - 1) // seq_len * seq_len
    return [(s, 0) for s in range(0, usable, seq_len)]


@torch.inference_mode()
def score(model: GPT, tokens: torch.Tensor, wins: list[tuple[int, int]], seq_len: int, batch: int,
          meter: BPBMeter, rank: int = 0, world: int = 1) -> dict:
    device = next(model.parameters()).device
    mine = wins[rank::world]
    for i in range(0, len(mine), batch):
        chunk = mine[i : i + batch]
        idx = torch.stack([tokens[s : s + seq_len + 1] for s, _ in chunk]).to(device)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            losses = token_losses(model, idx[:, :-1], idx[:, 1:]).float().cpu()
        idx = idx.cpu()
        for j, (_, first) in enumerate(chunk):
            meter.update(losses[j, first:], idx[j, first:-1], idx[j, first + 1 :])
    meter.all_reduce()
    return meter.result()


def artifact_model(path: str | Path) -> GPT:
    tensors, meta = tensorfile.loads(read_artifact(path), str(path))
    model = GPT.from_meta(meta)
    model.load_state_dict(load_quantized(tensors, meta))
    return model


def evaluate(args: argparse.Namespace, cfg: dict, rank: int, world: int, device: torch.device) -> dict:
    tokens = torch.from_numpy(load_split(args.data, "val").astype(np.int64))
    if cfg["max_tokens"]:
        tokens = tokens[: cfg["max_tokens"] + 1]
    T, B = cfg["seq_len"], cfg["batch_seqs"]
    ema, art = load_weights(args.ema).to(device).eval(), artifact_model(args.artifact).to(device).eval()
    luts = build_byte_luts(args.tokenizer, ema.vocab_size)
    parts = {"pre_quant": (ema, plain_windows(len(tokens), T)), "post_quant": (art, plain_windows(len(tokens), T)),
             "sliding": (art, windows(len(tokens), T, cfg["stride"]))}
    result, seconds = {}, {}
    for name, (model, wins) in parts.items():
        t0 = time.perf_counter()
        result[name] = score(model, tokens, wins, T, B, BPBMeter(luts), rank, world)
        seconds[name] = time.perf_counter() - t0
        if rank == 0:
            print(f"{name}: bpb {result[name]['val_bpb']:.4f} loss {result[name]['val_loss']:.4f} "
                  f"({len(wins)} windows, {seconds[name]:.1f}s)", flush=True)
    result["sliding"].update(seq_len=T, stride=cfg["stride"])
    result["quant_gap_bpb"] = result["post_quant"]["val_bpb"] - result["pre_quant"]["val_bpb"]
    result["eval_seconds"] = seconds
    return result


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf evaluate", description=__doc__)
    for name in ("--data", "--tokenizer", "--ema", "--artifact", "--cfg", "--out"):
        ap.add_argument(name, required=True)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    rank, world, device = setup_distributed(args.device)
    try:
        result = evaluate(args, json.loads(args.cfg), rank, world, device)
    except ValueError as e:
        raise SystemExit(f"pgolf evaluate: {e}") from None
    if rank == 0:
        write_json(args.out, result)
    if world > 1:
        dist.destroy_process_group()
