"""Training token streams over memory-mapped shards, split over processes and micro-steps.

Modes (the `loader` config section):
- sequential: the challenge baseline; the shards in name order, end to end, wrapping around.
- ordered: the same walk, but through the shards in a given order (e.g. hardest first, from
  `pgolf shard-order`'s shard_order.json).
- shuffled: non-overlapping windows of seq_len + 1 tokens from every shard, in a fresh random
  permutation per epoch, seeded by the training seed.

Every optimizer step reads the same global batch whatever the number of processes: micro-step m of
rank r takes part (m * world + r) of it, so one process accumulating two micro-batches sees exactly
what two processes see in one. Shards are memory-mapped, never copied: the sequential modes map one
at a time, the shuffled mode maps every shard and keeps one int64 per window, so private memory
stays flat however many shards there are (`pgolf bench-loader` prints it). Each shard is checked
against the sha256 its dataset's manifest records when the loader first opens it, before any of its
tokens is used (pgolf.formats.shards.open_shard: about 0.17 s for a 200 MB FineWeb shard), so a
sequential run's start pays for one shard; the shuffled mode draws from every shard at once and pays
for each in its first steps. Given the model's vocabulary, every shard's ids are checked against it
then too.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import PgolfError
from pgolf.formats.shards import open_shard, read_header, shard_files


class TokenStream:
    """Reads the train shards in `order` (default: name order), wrapping around forever.

    The next shard is verified (sha256 and ids, pgolf.formats.shards.open_shard) on a thread while
    the current one is read, so a switch inside a timed step finds it checked: on a 600 s record run
    that walks ~40 FineWeb shards, hashing them in the step would cost ~7 s of every rank's budget
    (0.17 s a shard, measured; the total estimated). hashlib and numpy's max release the GIL on
    buffers this large, so the thread competes with the step only for a CPU core."""

    def __init__(self, dataset_dir: str | Path, order: list[int] | None = None, vocab_size: int | None = None) -> None:
        files = shard_files(dataset_dir, "train")
        if order is not None and sorted(order) != list(range(len(files))):
            raise PgolfError(f"shard order {order} is not a permutation of the {len(files)} train shards")
        self.files = [files[i] for i in order] if order is not None else files
        self.shard, self.pos, self.vocab_size = 0, 0, vocab_size
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgolf-shard-check")
        self._ahead: tuple[int, Future] | None = None
        self.tokens = self._open(0)

    def _open(self, shard: int) -> np.ndarray:
        """Shard `shard`'s verified tokens (from the thread when it checked it ahead), and the next
        shard's check started."""
        if self._ahead is not None and self._ahead[0] == shard:
            tokens = self._ahead[1].result()  # a damaged shard raises here, naming it, as before
        else:
            tokens = open_shard(*self.files[shard], self.vocab_size)
        following = (shard + 1) % len(self.files)
        self._ahead = (following, self._pool.submit(open_shard, *self.files[following], self.vocab_size))
        return tokens

    def take(self, n: int) -> np.ndarray:
        parts = []
        while n > 0:
            if self.pos >= len(self.tokens):
                self.shard = (self.shard + 1) % len(self.files)
                self.tokens, self.pos = self._open(self.shard), 0
                continue
            k = min(n, len(self.tokens) - self.pos)
            parts.append(np.asarray(self.tokens[self.pos : self.pos + k]))
            self.pos, n = self.pos + k, n - k
        return np.concatenate(parts)

    def state(self) -> dict:
        return {"shard": self.shard, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.shard, self.pos = state["shard"], state["pos"]
        self.tokens = self._open(self.shard)


class ShuffledWindows:
    """Non-overlapping windows of `width` tokens from all shards, permuted anew each epoch."""

    def __init__(self, dataset_dir: str | Path, width: int, seed: int, vocab_size: int | None = None) -> None:
        self.files, self.width, self.seed = shard_files(dataset_dir, "train"), width, seed
        self.vocab_size = vocab_size
        counts = np.array([read_header(f) // width for f, _ in self.files], dtype=np.int64)
        if counts.sum() == 0:
            raise PgolfError(f"{dataset_dir}: no train shard holds one window of {width} tokens")
        self.first = np.concatenate([[0], np.cumsum(counts)])  # window id -> shard by searchsorted
        self.epoch, self.index = 0, 0
        self.perm = self._permutation()
        self.maps: dict[int, np.ndarray] = {}  # open memmaps: address space only, no resident memory

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(int(self.first[-1]))

    def _window(self, wid: int) -> np.ndarray:
        shard = int(np.searchsorted(self.first, wid, side="right")) - 1
        start = (wid - int(self.first[shard])) * self.width
        if shard not in self.maps:
            path, sha = self.files[shard]
            self.maps[shard] = open_shard(path, sha, self.vocab_size)
        return np.asarray(self.maps[shard][start : start + self.width])

    def windows(self, n: int, width: int) -> np.ndarray:
        rows = []
        for _ in range(n):
            if self.index == len(self.perm):
                self.epoch, self.index = self.epoch + 1, 0
                self.perm = self._permutation()
            rows.append(self._window(int(self.perm[self.index])))
            self.index += 1
        return np.stack(rows)

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = state["epoch"], state["index"]
        self.perm = self._permutation()


class DistributedLoader:
    def __init__(self, dataset_dir: str | Path, rank: int, world: int, device: torch.device, cfg: dict,
                 seq_len: int, seed: int, order: list[int] | None = None, vocab_size: int | None = None) -> None:
        """`cfg` is the loader config section (only its mode is read here: the trainer resolves the
        shard order into `order`); `seq_len` sets the shuffled windows, `seed` their permutation."""
        mode = cfg["mode"]
        if mode == "shuffled":
            self.stream = ShuffledWindows(dataset_dir, seq_len + 1, seed, vocab_size)
        else:
            self.stream = TokenStream(dataset_dir, order if mode == "ordered" else None, vocab_size)
        self.shuffled = mode == "shuffled"
        self.rank, self.world, self.device = rank, world, device

    def next_batch(self, seqs: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (x, y) of `seqs` sequences from the next world-wide part of the stream."""
        if self.shuffled:
            rows = self.stream.windows(seqs * self.world, seq_len + 1)[self.rank * seqs : (self.rank + 1) * seqs]
            local = torch.from_numpy(rows.astype(np.int64))
            x, y = local[:, :-1], local[:, 1:]
        else:
            span = seqs * seq_len + 1
            chunk = self.stream.take(span * self.world)
            local = torch.from_numpy(chunk[self.rank * span : (self.rank + 1) * span].astype(np.int64))
            x, y = local[:-1].view(seqs, seq_len), local[1:].view(seqs, seq_len)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def bench_cli(argv: list[str]) -> None:
    """`pgolf bench-loader`: tokens/s of the loader alone, per mode, on a dataset's train shards."""
    import argparse
    import resource
    import time

    ap = argparse.ArgumentParser(prog="pgolf bench-loader", description=bench_cli.__doc__)
    ap.add_argument("--data", required=True, help="dataset folder with fineweb_train_*.bin")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-seqs", type=int, default=48, help="sequences per call (records: 48 per GPU)")
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--modes", nargs="+", default=["sequential", "shuffled", "ordered"])
    args = ap.parse_args(argv)
    n_shards = len(shard_files(args.data, "train"))
    for mode in args.modes:
        order = list(range(n_shards))[::-1] if mode == "ordered" else None
        loader = DistributedLoader(args.data, 0, 1, torch.device("cpu"), {"mode": mode}, args.seq_len, 0, order)
        t0 = time.perf_counter()
        for _ in range(args.batches):
            loader.next_batch(args.batch_seqs, args.seq_len)
        dt = time.perf_counter() - t0
        tokens = args.batches * args.batch_seqs * args.seq_len
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{mode}: {tokens / dt:,.0f} tokens/s ({tokens:,} tokens, {dt:.2f}s) over {n_shards} shards, "
              f"peak RSS {rss:,.0f} MB, private {private_mb():,.0f} MB", flush=True)


def private_mb() -> float:
    """Anonymous resident memory in MB (Linux; NaN elsewhere). Peak RSS also counts the mapped shard
    pages the loader has read, which are page cache the kernel can drop, so it grows with what was
    read; the private part is what must stay flat however many shards there are."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")
