"""Legal score-first test-time training in chunk mode (the PR #461 / #549 recipe).

The val stream's sliding windows are grouped into chunks of `chunk_tokens` targets. For each chunk,
in order: its windows are scored under torch.inference_mode and their losses recorded, and only
then does the model train on the targets just scored (SGD with momentum or AdamW, a few epochs,
the first blocks frozen, the LR cosine-decayed across chunks, gradients clipped and averaged over
processes). The last chunk is never trained on. The two steps are ordered by
pgolf.eval.tttsteps.run_chunks, the one place that does, so no configuration can train on a token
before it is scored; `pgolf audit` checks it. Phased LoRA TTT (pgolf/eval/phased.py) shares those
steps; evaluate picks between the two modes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from pgolf.eval.bpb import BPBMeter
from pgolf.eval.tttsteps import (
    Chunk,
    Step,
    chunk_lr,
    freeze,
    make_optimizer,
    run_chunks,
    train_chunk,
    training_sequences,
)
from pgolf.eval.windows import Scores, Window, score_windows
from pgolf.model.gpt import GPT


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


def ttt_eval(model: GPT, tokens: Tensor, wins: list[Window], seq_len: int, batch: int, cfg: dict,
             meter: BPBMeter, rank: int = 0, world: int = 1, scores: Scores | None = None,
             order: Callable[[list[Chunk], Step, Step], None] = run_chunks, precision: str = "auto",
             forward: torch.nn.Module | None = None) -> dict:
    """BPB of the windows `wins` under chunk-mode TTT; the model is adapted in place. Scoring runs
    `forward` (the model's compiled form; `model` by default), training the model itself. `order`
    exists for the audit's tests only (they pass a deliberately illegal one to prove the audit
    catches it)."""
    freeze(model, cfg)
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
