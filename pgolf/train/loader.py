"""The baseline's sequential token stream, split over processes and micro-steps.

Every optimizer step reads the same global window of tokens whatever the number of processes:
micro-step m of rank r takes span (m * world + r) of the window, so one process accumulating two
micro-batches sees exactly what two processes see in one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pgolf.data.shards import list_shards, load_shard


class TokenStream:
    """Reads the train shards in order, wrapping around forever; shards stay memory-mapped."""

    def __init__(self, dataset_dir: str | Path) -> None:
        self.files = list_shards(dataset_dir, "train")
        self.shard, self.pos = 0, 0
        self.tokens = load_shard(self.files[0])

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.shard = (self.shard + 1) % len(self.files)
                self.tokens, self.pos = load_shard(self.files[self.shard]), 0
                continue
            k = min(n, len(self.tokens) - self.pos)
            parts.append(np.asarray(self.tokens[self.pos : self.pos + k]))
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)

    def state(self) -> dict:
        return {"shard": self.shard, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.shard, self.pos = state["shard"], state["pos"]
        self.tokens = load_shard(self.files[self.shard])


class DistributedLoader:
    def __init__(self, dataset_dir: str | Path, rank: int, world: int, device: torch.device) -> None:
        self.stream = TokenStream(dataset_dir)
        self.rank, self.world, self.device = rank, world, device

    def next_batch(self, seqs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) of `seqs` sequences from the next world-wide chunk."""
        span = seqs * seq_len + 1
        chunk = self.stream.take(span * self.world)
        local = torch.from_numpy(chunk[self.rank * span : (self.rank + 1) * span].astype(np.int64))
        x, y = local[:-1].view(seqs, seq_len), local[1:].view(seqs, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
