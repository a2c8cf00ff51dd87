"""Dense bit packing of integer codes and the byte shuffle, both exactly invertible.

A b-bit code c in [-2^(b-1), 2^(b-1)-1] is stored as the unsigned c + 2^(b-1) in b bits, least
significant bit first, so n codes take ceil(n*b/8) bytes instead of n.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from pgolf.errors import PgolfError


class PackError(PgolfError):
    """Codes that do not fit their width, or packed bytes that do not match their shape."""


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """int8 codes (any shape) -> uint8 bytes, `bits` bits per code."""
    if not 1 <= bits <= 8:
        raise PackError(f"cannot pack {bits}-bit codes")
    u = codes.flatten().numpy().astype(np.int16) + (1 << (bits - 1))
    if u.size and (u.min() < 0 or u.max() >= 1 << bits):
        raise PackError(f"codes in [{int(codes.min())}, {int(codes.max())}] do not fit in {bits} bits")
    planes = (u[:, None] >> np.arange(bits, dtype=np.int16)) & 1  # (n, bits), LSB first
    return torch.from_numpy(np.packbits(planes.astype(np.uint8).ravel(), bitorder="little"))


def unpack_codes(packed: Tensor, bits: int, shape: list[int]) -> Tensor:
    """The inverse of pack_codes; checks the byte count before allocating anything."""
    numel = int(np.prod(shape, dtype=np.int64))
    if not 1 <= bits <= 8 or packed.dtype != torch.uint8 or packed.numel() != packed_nbytes(numel, bits):
        raise PackError(f"{packed.numel()} packed bytes do not hold {numel} codes of {bits} bits")
    planes = np.unpackbits(packed.numpy(), bitorder="little", count=numel * bits).reshape(numel, bits)
    u = (planes.astype(np.int16) << np.arange(bits, dtype=np.int16)).sum(axis=1, dtype=np.int16)
    return torch.from_numpy((u - (1 << (bits - 1))).astype(np.int8)).reshape(shape)


def shuffle(data: bytes, stride: int) -> bytes:
    """Byte i%stride of every group of `stride` bytes together: fp16 high bytes are far more alike."""
    if stride <= 1:
        return data
    return b"".join(data[i::stride] for i in range(stride))


def unshuffle(data: bytes, stride: int) -> bytes:
    if stride <= 1:
        return data
    out, pos = bytearray(len(data)), 0
    for i in range(stride):
        n = len(range(i, len(data), stride))
        out[i::stride] = data[pos : pos + n]
        pos += n
    return bytes(out)
