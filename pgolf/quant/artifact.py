"""The artifact: a plain header, then the compressed quantized tensor file. Never pickle.

Layout (pgolf.container): b"PGOLFART" | u32 version | u64 header length | JSON header | compressed bytes.
The header names the codec and level, the raw length and the raw bytes' sha256. Reading checks the
magic, refuses a raw length above MAX_RAW_BYTES, decompresses at most the promised length, and
checks length and checksum, so a corrupt or hostile file fails with its name and the problem.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import zstandard

from pgolf.container import frame, read_file, unframe
from pgolf.io import write_bytes

MAGIC = b"PGOLFART"
VERSION = 1
MAX_HEADER_BYTES = 1 << 16
MAX_RAW_BYTES = 1 << 30  # far above any 16 MB artifact's decompressed size


class ArtifactError(ValueError):
    """An artifact that is corrupt, truncated or not ours."""


def _zstd_compress(raw: bytes, level: int) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(raw)


def _zstd_decompress(body: bytes, limit: int) -> bytes:
    # A streaming read bounded by `limit`: a lying header can never make us allocate more.
    try:
        return zstandard.ZstdDecompressor().stream_reader(body).read(limit)
    except zstandard.ZstdError as e:
        raise ArtifactError(f"compressed data is corrupt ({e})") from None


# codec -> (compress(raw, level), decompress(body, at most this many bytes)); later codecs go here.
CODECS = {"zstd": (_zstd_compress, _zstd_decompress)}


def pack(raw: bytes, codec: str, level: int) -> bytes:
    if codec not in CODECS:
        raise ArtifactError(f"compress.codec: unknown codec {codec!r}; known: {', '.join(CODECS)}")
    body = CODECS[codec][0](raw, level)
    sha = hashlib.sha256(raw).hexdigest()
    header = {"codec": codec, "level": level, "raw_bytes": len(raw), "sha256": sha}
    return frame(MAGIC, VERSION, header) + body


def unpack(data: bytes, source: str = "<bytes>") -> bytes:
    """The raw bytes; raise ArtifactError naming `source` unless they are exactly what the header promises."""
    header, body = unframe(data, MAGIC, VERSION, MAX_HEADER_BYTES, source, ArtifactError, "artifact")
    n = header.get("raw_bytes")
    if not isinstance(n, int) or not 0 <= n <= MAX_RAW_BYTES:
        raise ArtifactError(f"{source}: header promises {n!r} raw bytes (limit {MAX_RAW_BYTES})")
    if header.get("codec") not in CODECS:
        raise ArtifactError(f"{source}: unknown codec {header.get('codec')!r}")
    try:
        raw = CODECS[header["codec"]][1](bytes(body), n + 1)  # one byte more shows a lying length
    except ArtifactError as e:
        raise ArtifactError(f"{source}: {e}") from None
    if len(raw) != n:
        raise ArtifactError(f"{source}: decompressed to {len(raw)} bytes, header promises {n} "
                            "(truncated or corrupt)")
    if hashlib.sha256(raw).hexdigest() != header.get("sha256"):
        raise ArtifactError(f"{source}: checksum mismatch; the artifact is corrupt")
    return raw


def write_artifact(path: str | Path, raw: bytes, codec: str, level: int) -> int:
    data = pack(raw, codec, level)
    write_bytes(path, data)
    return len(data)


def read_artifact(path: str | Path) -> bytes:
    return unpack(read_file(path, ArtifactError), str(path))
