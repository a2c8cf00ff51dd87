"""Bits per byte exactly as the challenge counts it (train_gpt.py: build_sentencepiece_luts, eval_val).

Each target token y after a token x is worth base_bytes[y] + (has_leading_space[y] & ~is_boundary[x])
UTF-8 bytes: the "▁" of a word-initial piece is a real space except right after a document boundary.
A dataset whose tokenizer read transformed text (CaseOps) carries a byte sidecar instead: the
original text's bytes of each token of the stream, which the records count BPB against.
Sums are kept in float64 and all-reduced across processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm
import torch
import torch.distributed as dist

from pgolf.data import caseops
from pgolf.errors import PgolfError
from pgolf.formats.shards import MANIFEST, ShardError, check_tokenizer, load_sidecar


@dataclass(frozen=True)
class ByteLUTs:
    base_bytes: torch.Tensor  # int32 (V,)
    has_leading_space: torch.Tensor  # bool (V,)
    is_boundary: torch.Tensor  # bool (V,)

    def count(self, prev: torch.Tensor, tgt: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        return target_bytes(self, prev, tgt)


@dataclass(frozen=True)
class ByteSidecar:
    """Original UTF-8 bytes of each token of the scored stream, read from the dataset's sidecar."""

    token_bytes: torch.Tensor  # int64 (n_tokens,), aligned with the val tokens that are scored

    def count(self, prev: torch.Tensor, tgt: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        if pos is None:
            raise PgolfError("a byte sidecar counts bytes by stream position; the scorer passed none")
        return self.token_bytes[pos.long().cpu()].to(tgt.device)


ByteCounts = ByteLUTs | ByteSidecar


def byte_counts(dataset_dir: str | Path, tokenizer_path: str | Path, vocab_size: int, n_tokens: int) -> ByteCounts:
    """How the dataset's bytes are counted: its val sidecar, cut to the first n_tokens scored, when
    it has one, else the tokenizer's tables (the challenge's count). A CaseOps tokenizer's tables
    count the transformed text (operators, lowercased letters), not the original: it is never scored
    without its sidecar, and the tokenizer file itself says whether it is one. The tokenizer must be
    the one the shards were made with (the manifest's sha256), whoever counts with it."""
    check_tokenizer(dataset_dir, tokenizer_path)
    sidecar = load_sidecar(dataset_dir, "val")
    if sidecar is None:
        sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
        if caseops.has_operators(sp):
            raise ShardError(f"{Path(dataset_dir) / MANIFEST}: splits.val has no byte_sidecar, but {tokenizer_path} "
                             "is a CaseOps tokenizer (it holds the case operators U+E001..U+E004): its tables would "
                             "count the transformed text's bytes, not the original's; rebuild the dataset")
        return build_byte_luts(tokenizer_path, vocab_size)
    return ByteSidecar(torch.from_numpy(sidecar[:n_tokens]))


def build_byte_luts(tokenizer_path: str | Path, vocab_size: int | None = None) -> ByteLUTs:
    """Per-token byte tables, padded to vocab_size (ids the tokenizer lacks count 0 bytes, like unused ones)."""
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    n = sp.get_piece_size()
    size = max(vocab_size or n, n)
    base = torch.zeros(size, dtype=torch.int32)
    space = torch.zeros(size, dtype=torch.bool)
    boundary = torch.ones(size, dtype=torch.bool)
    for t in range(n):
        if sp.is_control(t) or sp.is_unknown(t) or sp.is_unused(t):
            continue
        boundary[t] = False
        if sp.is_byte(t):
            base[t] = 1
            continue
        piece = sp.id_to_piece(t)
        if piece.startswith("▁"):
            space[t] = True
            piece = piece[1:]
        base[t] = len(piece.encode("utf-8"))
    return ByteLUTs(base, space, boundary)


def target_bytes(luts: ByteLUTs, prev: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """UTF-8 bytes each target adds to the text, on the targets' device."""
    dev = tgt.device
    prev, tgt = prev.long().to(dev), tgt.long()
    space = luts.has_leading_space.to(dev)[tgt] & ~luts.is_boundary.to(dev)[prev]
    return luts.base_bytes.to(dev)[tgt] + space.int()


def summed(t: torch.Tensor) -> torch.Tensor:
    """`t` summed over all processes (itself in a single process), on the CPU."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    out = t.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(out)
    return out.cpu()


class BPBMeter:
    """Accumulates loss (nats), token and byte counts in float64."""

    def __init__(self, luts: ByteCounts) -> None:
        self.luts = luts
        self.sums = torch.zeros(3, dtype=torch.float64)  # loss, tokens, bytes

    def update(self, losses: torch.Tensor, prev: torch.Tensor, tgt: torch.Tensor,
               pos: torch.Tensor | None = None) -> None:
        """`pos`: each target's index in the val stream (a sidecar counts by it; the tables by the tokens)."""
        self.sums[0] += losses.detach().double().sum().cpu()
        self.sums[1] += tgt.numel()
        self.sums[2] += self.luts.count(prev, tgt, pos).double().sum().cpu()

    def all_reduce(self) -> None:
        self.sums = summed(self.sums)

    def result(self) -> dict:
        loss, tokens, nbytes = self.sums.tolist()
        val_loss = loss / tokens
        return {"val_loss": val_loss, "val_bpb": val_loss / math.log(2) * tokens / nbytes,
                "tokens": int(tokens), "bytes": int(nbytes)}
