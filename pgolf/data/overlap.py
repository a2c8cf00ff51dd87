"""Does any val document appear in the train shards? (PR #2130 was excluded for it: a data
preparation default put val documents into train, #2127.)

A document is a run of tokens from one BOS to the next (or to the end of the stream). Every val
document's fingerprint (its length and a 64-bit BLAKE2 hash of its tokens) goes into a set; then
every train shard is streamed in chunks of a fixed size, the documents that cross a chunk's end
carried into the next, and each train document whose length some val document has is hashed and
looked up. Memory: the val fingerprints (16 bytes a document, about 1 MB for the challenge's 50,000)
plus one chunk plus the longest document; time: one pass over the train tokens (the manifest's
sha256 of each shard is checked on the way, by pgolf.formats.shards).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pgolf.formats.shards import MANIFEST, list_shards, load_shard, open_shard, shard_files

CHUNK_TOKENS = 1 << 24  # 32 MB of uint16 tokens per read


@dataclass
class Overlap:
    val_docs: int
    train_docs: int
    train_tokens: int
    shards: int
    found: list[tuple[str, int, int]]  # (train shard, token offset in it, val document index), first few
    matches: int
    checksummed: bool  # shards read against their manifest's sha256


def fingerprint(doc: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(doc, dtype="<u2").tobytes(), digest_size=8).digest()


def split_shards(dataset_dir: Path, split: str) -> tuple[list[tuple[Path, str | None]], bool]:
    """The split's shards, each with the sha256 the manifest records (None without a pgolf manifest:
    a folder the challenge's own download script made is read with its headers checked only)."""
    if (dataset_dir / MANIFEST).exists():
        return list(shard_files(dataset_dir, split)), True
    return [(p, None) for p in list_shards(dataset_dir, split)], False


def read(path: Path, sha: str | None) -> np.ndarray:
    return open_shard(path, sha) if sha is not None else load_shard(path)


def documents(shards: list[tuple[Path, str | None]], bos: int,
              chunk: int = CHUNK_TOKENS) -> Iterator[tuple[np.ndarray, str, int]]:
    """Every BOS-to-BOS document of the shards read as one stream, with the shard and offset where it
    starts. Tokens before the stream's first BOS belong to no document."""
    carry: np.ndarray | None = None  # the open document: from its BOS to the end of what was read
    where = ("", 0)
    for path, sha in shards:
        tokens = read(path, sha)
        for lo in range(0, len(tokens), chunk):
            part = np.asarray(tokens[lo : lo + chunk])
            starts = np.flatnonzero(part == bos)
            if carry is not None:
                end = starts[0] if len(starts) else len(part)
                carry = np.concatenate([carry, part[:end]])
                if not len(starts):
                    continue
                yield carry, *where
                carry = None
            for a, b in zip(starts, [*starts[1:], len(part)], strict=True):
                if b == len(part):
                    carry, where = part[a:].copy(), (path.name, lo + int(a))
                else:
                    yield part[a:b], path.name, lo + int(a)
    if carry is not None:
        yield carry, *where


def val_fingerprints(dataset_dir: Path, bos: int) -> tuple[dict[tuple[int, bytes], int], int]:
    """(length, hash) of each val document -> its index in the val split; and how many there are."""
    shards, _ = split_shards(dataset_dir, "val")
    out: dict[tuple[int, bytes], int] = {}
    n = 0
    for n, (doc, _, _) in enumerate(documents(shards, bos), start=1):
        out.setdefault((len(doc), fingerprint(doc)), n - 1)
    return out, n


def find_overlap(dataset_dir: str | Path, bos: int = 1, chunk: int = CHUNK_TOKENS, keep: int = 5) -> Overlap:
    """Every train document looked up among the val documents' fingerprints."""
    dataset_dir = Path(dataset_dir)
    val, n_val = val_fingerprints(dataset_dir, bos)
    lengths = {n for n, _ in val}
    shards, checksummed = split_shards(dataset_dir, "train")
    n_docs = n_tokens = matches = 0
    found: list[tuple[str, int, int]] = []
    for doc, shard, offset in documents(shards, bos, chunk):
        n_docs, n_tokens = n_docs + 1, n_tokens + len(doc)
        if len(doc) in lengths and (hit := val.get((len(doc), fingerprint(doc)))) is not None:
            matches += 1
            if len(found) < keep:
                found.append((shard, offset, hit))
    return Overlap(n_val, n_docs, n_tokens, len(shards), found, matches, checksummed)
