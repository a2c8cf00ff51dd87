"""Legal score-first test-time training (the PR #461 / #549 recipe).

The val stream's sliding windows are grouped into chunks of `chunk_tokens` targets. For each chunk,
in order: its windows are scored under torch.inference_mode and their losses recorded, and only
then does the model train on the targets just scored (SGD with momentum or AdamW, a few epochs,
the first blocks frozen, the LR cosine-decayed across chunks, gradients clipped and averaged over
processes). The last chunk is never trained on. `run_chunks` is the one place that orders the two
steps, so no configuration can train on a token before it is scored; `pgolf audit` checks it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.eval.bpb import BPBMeter
from pgolf.eval.windows import Scores, Window, score_windows
from pgolf.model import GPT, token_losses
from pgolf.runtime import autocast


@dataclass
class Chunk:
    windows: list[Window]
    lo: int  # first target index scored by the chunk's windows
    hi: int  # one past the last


def chunk_windows(wins: list[Window], seq_len: int, chunk_tokens: int) -> list[Chunk]:
    """Group windows by the chunk of their first scored target; windows keep their order."""
    chunks: dict[int, Chunk] = {}
    for s, first in wins:
        lo, hi = s + first, s + seq_len
        c = chunks.setdefault(lo // chunk_tokens, Chunk([], lo, hi))
        c.windows.append((s, first))
        c.lo, c.hi = min(c.lo, lo), max(c.hi, hi)
    return [chunks[k] for k in sorted(chunks)]


def score_chunk(forward: torch.nn.Module, tokens: Tensor, chunk: Chunk, seq_len: int, batch: int,
                meter: BPBMeter, scores: Scores | None, rank: int, world: int, precision: str = "auto") -> None:
    """Score this process's share of the chunk's windows into the meter (and `scores`)."""
    device = next(forward.parameters()).device
    score_windows(forward, tokens, chunk.windows[rank::world], seq_len, batch, meter, device, precision, scores)


def training_sequences(tokens: Tensor, chunk: Chunk, seq_len: int) -> Tensor:
    """The chunk's scored targets as (n, seq_len + 1) token rows; a chunk shorter than seq_len is one row."""
    span = tokens[chunk.lo : chunk.hi + 1]
    n = (len(span) - 1) // seq_len
    if n == 0:
        return span[None]
    return span[: n * seq_len + 1].unfold(0, seq_len + 1, seq_len)


def make_optimizer(params: list[torch.nn.Parameter], cfg: dict) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])
    return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def chunk_lr(cfg: dict, c: int, n_trained: int) -> float:
    """Cosine decay from lr to 0 across the chunks that are trained on."""
    if not cfg["cosine"] or n_trained <= 1:
        return cfg["lr"]
    return cfg["lr"] * 0.5 * (1 + math.cos(math.pi * c / (n_trained - 1)))


def train_chunk(model: GPT, opt: torch.optim.Optimizer, rows: Tensor, cfg: dict, lr: float,
                rank: int, world: int, precision: str = "auto") -> None:
    """`epochs` passes over the chunk's rows in global batches of batch_seqs; the gradient is the
    mean over the whole batch, whatever the number of processes."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    for g in opt.param_groups:
        g["lr"] = lr
    for _ in range(cfg["epochs"]):
        for i in range(0, len(rows), cfg["batch_seqs"]):
            batch = rows[i : i + cfg["batch_seqs"]]
            n_targets = batch[:, 1:].numel()
            mine = batch[rank::world].to(device)
            opt.zero_grad(set_to_none=False)
            if len(mine):
                with autocast(device, precision):
                    loss = token_losses(model, mine[:, :-1], mine[:, 1:]).sum() / n_targets
                loss.backward()
            average(params, world)
            if cfg["grad_clip"] > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
            opt.step()


def average(params: list[torch.nn.Parameter], world: int) -> None:
    """Sum the per-process gradients (each is already divided by the global target count)."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if world > 1:
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()


Step = Callable[[int, Chunk], None]


def run_chunks(chunks: list[Chunk], score: Step, train: Step) -> None:
    """The score-before-update rule, in one place: score chunk c, then (unless it is the last) train on it."""
    for c, chunk in enumerate(chunks):
        score(c, chunk)
        if c < len(chunks) - 1:
            train(c, chunk)


def freeze(model: GPT, cfg: dict) -> None:
    """TTT leaves the first `freeze_blocks` blocks as they are."""
    for block in model.blocks[: cfg["freeze_blocks"]]:
        block.requires_grad_(False)


def ttt_eval(model: GPT, tokens: Tensor, wins: list[Window], seq_len: int, batch: int, cfg: dict,
             meter: BPBMeter, rank: int = 0, world: int = 1, scores: Scores | None = None,
             order: Callable[[list[Chunk], Step, Step], None] = run_chunks, precision: str = "auto",
             forward: torch.nn.Module | None = None) -> dict:
    """BPB of the windows `wins` under legal TTT; the model is adapted in place. Scoring runs
    `forward` (the model's compiled form; `model` by default), training the model itself. `order`
    exists for the audit's tests only (they pass a deliberately illegal one to prove the audit
    catches it). eval.ttt.mode phased_lora runs pgolf.eval.phased instead, on the same val stream."""
    freeze(model, cfg)
    if cfg["mode"] == "phased_lora":
        from pgolf.eval.phased import phased_eval  # it builds on this module's steps

        return phased_eval(model, tokens, seq_len, cfg, meter, rank, world, scores, order, precision)
    run = forward if forward is not None else model  # a compiled module has no truth value
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg)
    chunks = chunk_windows(wins, seq_len, cfg["chunk_tokens"])

    def score(c: int, chunk: Chunk) -> None:
        model.eval()
        score_chunk(run, tokens, chunk, seq_len, batch, meter, scores, rank, world, precision)

    def train(c: int, chunk: Chunk) -> None:
        if cfg["epochs"] == 0:
            return
        model.train()
        train_chunk(model, opt, training_sequences(tokens, chunk, seq_len), cfg,
                    chunk_lr(cfg, c, len(chunks) - 1), rank, world, precision)

    order(chunks, score, train)
    meter.all_reduce()
    return {**meter.result(), "chunks": len(chunks)}
