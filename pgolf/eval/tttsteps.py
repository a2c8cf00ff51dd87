"""The steps both test-time training modes share: chunk mode (pgolf/eval/ttt.py) and phased LoRA
mode (pgolf/eval/phased.py) import them from here, and evaluate picks the mode.

`run_chunks` is the score-before-update rule in one place: either mode scores a chunk, then (unless
it is the last) trains on it, through the `order` it is given, which is this function unless a test
of `pgolf audit` passes a deliberately illegal one. The rest trains the base model on a chunk that
was already scored: its rows, the optimizer, the cosine LR across chunks, and the epochs of global
batches with gradients averaged over processes and clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from pgolf.eval.windows import Window
from pgolf.model.gpt import GPT, token_losses
from pgolf.runtime.device import autocast


@dataclass
class Chunk:
    windows: list[Window]
    lo: int  # first target index scored by the chunk's windows
    hi: int  # one past the last


Step = Callable[[int, Chunk], None]


def run_chunks(chunks: list[Chunk], score: Step, train: Step) -> None:
    """The score-before-update rule, in one place: score chunk c, then (unless it is the last) train on it."""
    for c, chunk in enumerate(chunks):
        score(c, chunk)
        if c < len(chunks) - 1:
            train(c, chunk)


def freeze(model: GPT, cfg: dict) -> None:
    """What TTT's base-model steps train: not the first `freeze_blocks` blocks, and the asymmetric
    softcaps (fixed since training) only with train_softcap."""
    for block in model.blocks[: cfg["freeze_blocks"]]:
        block.requires_grad_(False)
    if model.cfg["asym_softcap"]:
        for p in (model.softcap_pos, model.softcap_neg):
            p.requires_grad_(cfg["train_softcap"])


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
