"""The challenge's token shard format: 256 little-endian int32 header, then uint16 tokens.

header[0] = 20240520 (magic), header[1] = 1 (version), header[2] = number of tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pgolf.io import atomic_path

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(ValueError):
    """A shard file that is not in the challenge's format."""


def write_shard(path: str | Path, tokens: np.ndarray) -> None:
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(header.tobytes())
        f.write(tokens.astype("<u2").tobytes())


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ShardError(f"{path}: shard not found") from None
    if size < HEADER_BYTES:
        raise ShardError(f"{path}: {size} bytes is shorter than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if header[0] != MAGIC:
        raise ShardError(f"{path}: bad magic {header[0]} (expected {MAGIC}); not a token shard")
    if header[1] != VERSION:
        raise ShardError(f"{path}: unsupported version {header[1]} (expected {VERSION})")
    n = int(header[2])
    expected = HEADER_BYTES + 2 * n
    if n < 0 or size != expected:
        raise ShardError(f"{path}: file is {size} bytes but the header promises {n} tokens ({expected} bytes)")
    return n


def load_shard(path: str | Path, mmap: bool = True) -> np.ndarray:
    """Tokens of a validated shard as uint16 (memory-mapped by default)."""
    n = read_header(path)
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    return np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def list_shards(dataset_dir: str | Path, split: str) -> list[Path]:
    files = sorted(Path(dataset_dir).glob(f"fineweb_{split}_*.bin"))
    if not files:
        raise ShardError(f"{dataset_dir}: no fineweb_{split}_*.bin shards")
    return files


def load_split(dataset_dir: str | Path, split: str) -> np.ndarray:
    """All tokens of a split, concatenated in shard order."""
    return np.concatenate([load_shard(p, mmap=False) for p in list_shards(dataset_dir, split)])
