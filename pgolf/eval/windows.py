"""Evaluation windows over the val stream, and the one loop that scores them.

The sliding-window evaluation and chunk TTT's scoring go through `score_windows`: batches of a fixed
shape (the last one padded), one autocast call site, the losses of each window's scored targets
into a BPB meter through `record`, with each target's place in the stream (a byte sidecar counts
bytes by it). Phased TTT runs its own forward, whose loss it then trains on, and records it through
the same `record`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.eval.bpb import BPBMeter
from pgolf.eval.ngram import TiltedMeter
from pgolf.model.gpt import logit_losses
from pgolf.runtime.device import autocast

# (start, first scored offset) or (start, first, stop): a window scores its offsets first..stop-1,
# up to its end when stop is absent (phased TTT scores a chunk that ends before its window does).
Window = tuple[int, ...]


@dataclass
class Scores:
    """Per-target losses this process recorded, in scoring order (the audit compares them)."""

    targets: list[Tensor] = field(default_factory=list)
    losses: list[Tensor] = field(default_factory=list)
    tilted: list[Tensor] = field(default_factory=list)  # under the n-gram tilt, each target's tilted loss too

    def by_target(self) -> dict[int, float | tuple[float, float]]:
        """Each target's loss, or (loss, tilted loss) under the n-gram tilt."""
        if not self.targets:
            return {}
        t, loss = torch.cat(self.targets).tolist(), torch.cat(self.losses).tolist()
        if self.tilted:
            loss = list(zip(loss, torch.cat(self.tilted).tolist(), strict=True))
        return dict(zip(t, loss, strict=True))


def windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """(start, first scored offset) of each window over a stream of n_tokens tokens (n_tokens-1 targets).

    Each window holds seq_len inputs from `start`; it scores its targets from offset `first` on, so
    every target is scored exactly once, with as much context as the window allows. stride ==
    seq_len gives the challenge's plain non-overlapping evaluation.
    """
    n_targets = n_tokens - 1
    if n_targets < seq_len:
        raise PgolfError(f"{n_tokens} val tokens are fewer than one window of {seq_len}")
    if not 1 <= stride <= seq_len:
        raise PgolfError(f"eval.stride={stride} must lie in 1..eval.seq_len={seq_len}")
    out, scored = [(0, 0)], seq_len
    while scored < n_targets:
        end = min(scored + stride, n_targets)
        start = end - seq_len
        out.append((start, scored - start))
        scored = end
    return out


def plain_windows(n_tokens: int, seq_len: int) -> list[Window]:
    """The challenge's eval_val: non-overlapping windows, the tail that does not fill one dropped."""
    usable = (n_tokens - 1) // seq_len * seq_len
    return [(s, 0) for s in range(0, usable, seq_len)]


def window_batch(tokens: Tensor, part: list[Window], seq_len: int, batch: int) -> Tensor:
    """(batch, seq_len + 1) token rows of the windows `part`, padded with copies of the first row so
    that every forward has one shape (a compiled forward would otherwise recompile for the last)."""
    rows = [tokens[s : s + seq_len + 1] for s, *_ in part]
    rows += rows[:1] * (batch - len(rows))
    return torch.stack(rows)


def scored_mask(part: list[Window], seq_len: int) -> Tensor:
    """(len(part), seq_len): the offsets each window scores."""
    first = torch.tensor([w[1] for w in part])
    stop = torch.tensor([w[2] if len(w) > 2 else seq_len for w in part])
    offsets = torch.arange(seq_len)[None, :]
    return (offsets >= first[:, None]) & (offsets < stop[:, None])


def targets_of(part: list[Window], seq_len: int) -> Tensor:
    """(len(part), seq_len): the stream index of the target at each offset of each window."""
    return torch.tensor([w[0] for w in part])[:, None] + torch.arange(seq_len)[None, :]


def forward_losses(forward: nn.Module, idx: Tensor, part: list[Window], seq_len: int,
                   meter: BPBMeter) -> tuple[Tensor, Tensor | None]:
    """A forward's per-target losses over the token rows `idx` (batch, seq_len + 1), and under the
    n-gram tilt each scored target's log p(hint) from the same logits, which are then let go: the
    tilt needs one number per target, and (batch, seq_len, vocab) logits kept until `record` would
    outweigh everything else a phased TTT step holds."""
    logits = forward(idx[:, :-1])
    losses = logit_losses(logits, idx[:, 1:])
    if not isinstance(meter, TiltedMeter):
        return losses, None
    n = len(part)
    return losses, meter.log_q(logits.detach()[:n], targets_of(part, seq_len), scored_mask(part, seq_len))


def record(losses: Tensor, idx: Tensor, part: list[Window], seq_len: int, meter: BPBMeter,
           scores: Scores | None, log_q: Tensor | None = None) -> None:
    """Add the scored targets of the windows `part` to `meter` (and `scores`): `losses` (batch, seq_len)
    are a forward's per-target losses over `idx`, the batch's token rows, whose first len(part) rows
    are those windows; the rest is padding and counts nowhere. `losses` may carry a graph (phased TTT
    backpropagates the forward it scores): what is recorded is detached from it. A tilted meter
    takes the same targets' tilted losses too, from `log_q` (forward_losses gives it)."""
    losses, idx = losses[: len(part)].detach().float().cpu(), idx[: len(part)].cpu()
    keep, pos = scored_mask(part, seq_len), targets_of(part, seq_len)
    prev, tgt, at = idx[:, :-1][keep], idx[:, 1:][keep], pos[keep] + 1  # target t is token t + 1
    meter.update(losses[keep], prev, tgt, at)
    tilted = None
    if isinstance(meter, TiltedMeter):
        if log_q is None:  # a scorer that forgot the tilt would report the untilted score as tilted
            raise RuntimeError("a tilted meter was given no log p(hint): score through forward_losses")
        tilted = meter.tilt(losses, log_q, idx[:, 1:], pos, keep)[keep]
        meter.tilted.update(tilted, prev, tgt, at)
    if scores is not None:
        scores.targets.append(pos[keep])
        scores.losses.append(losses[keep])
        if tilted is not None:
            scores.tilted.append(tilted)


@torch.inference_mode()
def score_windows(forward: nn.Module, tokens: Tensor, part_windows: list[Window], seq_len: int, batch: int,
                  meter: BPBMeter, device: torch.device, precision: str = "auto",
                  scores: Scores | None = None, label: str = "") -> None:
    """Add the scored targets of `part_windows` to `meter`; with `scores`, also record each scored
    target's stream index and loss (the audit compares them)."""
    n_batches = -(-len(part_windows) // batch)
    for b, i in enumerate(range(0, len(part_windows), batch)):
        part = part_windows[i : i + batch]
        idx = window_batch(tokens, part, seq_len, batch).to(device)
        with autocast(device, precision):
            losses, log_q = forward_losses(forward, idx, part, seq_len, meter)
        record(losses, idx, part, seq_len, meter, scores, log_q)
        if label and (b + 1) % max(1, n_batches // 10) == 0:
            print(f"{label}: batch {b + 1}/{n_batches}", flush=True)
