"""A plain tensor container: magic, JSON header, raw little-endian tensor bytes. Never pickle.

Layout (pgolf.formats.container): b"PGOLFTEN" | u32 version | u64 header length | JSON header | tensor bytes.
The header lists each tensor's dtype, shape, byte offset into the body and sha256, plus free-form
`meta` (model config, step, ...), and the sha256 of all that. Reading checks every offset against
the real body size first, so a corrupt header can never make us allocate or read more than the file
holds; then the header must be byte for byte what `dumps` writes for its contents, the tensors must
tile the body exactly, and every checksum must match: one flipped, missing or added byte anywhere
is refused. Every floating tensor must be finite: NaN or Inf weights, Hessians or scales would only
turn into a wrong score (or a baffling GPTQ error) stages later.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.errors import PgolfError
from pgolf.formats.container import PREFIX_BYTES, file_size, frame, header_length, read_file, unframe
from pgolf.formats.io import write_bytes

MAGIC = b"PGOLFTEN"
VERSION = 2  # 2: per-tensor and header checksums
MAX_HEADER_BYTES = 1 << 24

# bf16 has no numpy dtype: it is stored as its raw 16 bits.
_DTYPES = {
    "float32": (torch.float32, np.float32),
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.uint16),
    "int8": (torch.int8, np.int8),
    "uint8": (torch.uint8, np.uint8),
    "int16": (torch.int16, np.int16),
    "int32": (torch.int32, np.int32),
    "int64": (torch.int64, np.int64),
}
_NAMES = {tdt: name for name, (tdt, _) in _DTYPES.items()}


# Tensor files are pipeline intermediates: the fix for a damaged one is to make it again.
CORRUPT = "the file is damaged (delete it and rerun the stage that wrote it)"


class TensorFileError(PgolfError):
    """A tensor file that is corrupt, truncated or not ours."""


def dumps(tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None, checksums: bool = True) -> bytes:
    """The tensor file; without `checksums` (the artifact's payload, which its own sha256 covers) the
    header holds no digests, which would cost the artifact ~65 bytes per tensor."""
    entries, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: unsupported dtype {t.dtype}")
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        entries[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "offset": offset, "nbytes": len(raw)}
        if checksums:
            entries[name]["sha256"] = hashlib.sha256(raw).hexdigest()
        chunks.append(raw)
        offset += len(raw)
    return _head(entries, meta or {}, checksums) + b"".join(chunks)


def _head(entries: dict, meta: dict, checksums: bool = True) -> bytes:
    """Everything before the body. The header's own sha256 covers the tensor table (and through it
    every tensor's bytes) and the meta, so a changed value there cannot pass for the original."""
    table = {"tensors": entries, "meta": meta}
    if not checksums:
        return frame(MAGIC, VERSION, table)
    digest = hashlib.sha256(json.dumps(table, sort_keys=True).encode()).hexdigest()
    return frame(MAGIC, VERSION, {**table, "sha256": digest})


def loads(data: bytes, source: str, checksums: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of tensor file `data`; raise TensorFileError naming `source` unless every check
    passes. `checksums=False` reads a file written without digests (its caller checks a sha256 of its own)."""
    header, body = unframe(data, MAGIC, VERSION, MAX_HEADER_BYTES, source, TensorFileError, "tensor file")
    entries, meta = header.get("tensors"), header.get("meta")
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise TensorFileError(f"{source}: header has no valid tensor table")
    if not isinstance(meta, dict) or _head(entries, meta, checksums) != bytes(data[: len(data) - len(body)]):
        raise TensorFileError(f"{source}: checksum mismatch in the header: {CORRUPT}")
    out, end = {}, 0
    # In body order, not the header's sorted order, so that dumps(*loads(data)) == data.
    for name, e in sorted(entries.items(), key=_body_order):
        out[name] = _decode(name, e, body, source, checksums)
        if e["offset"] != end:
            raise TensorFileError(f"{source}: tensor {name!r} does not start where the one before it ends: {CORRUPT}")
        end += e["nbytes"]
    if end != len(body):
        raise TensorFileError(f"{source}: {len(body) - end:,} bytes after the last tensor (appended?): {CORRUPT}")
    check_finite(out, source)
    return out, meta


def _body_order(item: tuple[str, dict]) -> tuple[int, int]:
    off, nbytes = item[1].get("offset"), item[1].get("nbytes")
    return (off if isinstance(off, int) else 0, nbytes if isinstance(nbytes, int) else 0)


def _decode(name: str, e: dict, body: memoryview, source: str, checksums: bool = True) -> torch.Tensor:
    if e.get("dtype") not in _DTYPES:
        raise TensorFileError(f"{source}: tensor {name!r} has unknown dtype {e.get('dtype')!r}")
    tdt, ndt = _DTYPES[e["dtype"]]
    shape, off, nbytes = e.get("shape"), e.get("offset"), e.get("nbytes")
    if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(off, int) and isinstance(nbytes, int)):
        raise TensorFileError(f"{source}: tensor {name!r} has a malformed entry {e!r}")
    if nbytes != int(np.prod(shape, dtype=np.int64)) * np.dtype(ndt).itemsize:
        raise TensorFileError(f"{source}: tensor {name!r} byte count does not match its shape {shape}")
    if off < 0 or off + nbytes > len(body):
        raise TensorFileError(f"{source}: tensor {name!r} lies past the end of the file (truncated?)")
    if checksums and hashlib.sha256(body[off : off + nbytes]).hexdigest() != e.get("sha256"):
        raise TensorFileError(f"{source}: checksum mismatch in tensor {name!r}: {CORRUPT}")
    arr = np.frombuffer(body[off : off + nbytes], dtype=ndt).reshape(shape).copy()
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if tdt == torch.bfloat16 else t


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating tensor holding NaN or Inf, or None."""
    return next((n for n, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse NaN/Inf: a diverged run's weights must stop the pipeline where they are read, naming the file."""
    name = first_nonfinite(tensors)
    if name is not None:
        raise TensorFileError(f"{source}: tensor {name!r} holds NaN/Inf")


def read_meta(path: str | Path) -> dict[str, Any]:
    """A tensor file's meta from its header alone, the header's own checksum checked and its tensors'
    sizes against the file's: what a reader of one number (the calibration seconds of a 200 MB
    Hessians file) needs, without reading and hashing every tensor."""
    size = file_size(path, TensorFileError)
    with open(path, "rb") as f:
        head = f.read(PREFIX_BYTES)
        if len(head) == PREFIX_BYTES:
            head += f.read(min(header_length(head), MAX_HEADER_BYTES))
    header, _ = unframe(head, MAGIC, VERSION, MAX_HEADER_BYTES, str(path), TensorFileError, "tensor file")
    entries, meta = header.get("tensors"), header.get("meta")
    if not isinstance(entries, dict) or not isinstance(meta, dict) or _head(entries, meta) != head:
        raise TensorFileError(f"{path}: checksum mismatch in the header: {CORRUPT}")
    sizes = [e.get("nbytes") if isinstance(e, dict) else None for e in entries.values()]
    if not all(isinstance(n, int) and n >= 0 for n in sizes):
        raise TensorFileError(f"{path}: header has no valid tensor table")
    body = sum(sizes)
    if size != len(head) + body:
        raise TensorFileError(f"{path}: {size:,} bytes where its header promises {len(head) + body:,}: {CORRUPT}")
    return meta


def save(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    write_bytes(path, dumps(tensors, meta))


def load(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return loads(read_file(path, TensorFileError), str(path))
