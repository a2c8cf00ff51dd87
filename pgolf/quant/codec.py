"""The general-purpose codecs an artifact's streams may use, each with a bounded decompressor.

Every decompressor takes the most bytes it may return: a lying header can never make a reader
allocate more than it promised (one byte over that limit shows the lie).
"""

from __future__ import annotations

import lzma

import brotli
import zstandard


def _zstd_decompress(body: bytes, limit: int) -> bytes:
    return zstandard.ZstdDecompressor().stream_reader(body).read(limit)


# A stream cut short can still yield all the data (an xz file's last bytes are its index and
# footer), so brotli and lzma must also have reached their end marker, unless the limit stopped them.
def _brotli_decompress(body: bytes, limit: int) -> bytes:
    d = brotli.Decompressor()
    out = d.process(body, output_buffer_limit=limit)[:limit]
    if len(out) < limit and not d.is_finished():
        raise brotli.error("the stream ends early")
    return out


def _lzma_decompress(body: bytes, limit: int) -> bytes:
    d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    out = d.decompress(body, max_length=limit)
    if len(out) < limit and not d.eof:
        raise lzma.LZMAError("the stream ends early")
    return out


# codec -> (compress(raw, level), decompress(body, at most this many bytes), its error on a corrupt stream).
CODECS = {
    "zstd": (lambda raw, level: zstandard.ZstdCompressor(level=level).compress(raw), _zstd_decompress,
             zstandard.ZstdError),
    "brotli": (lambda raw, level: brotli.compress(raw, quality=level), _brotli_decompress, brotli.error),
    "lzma": (lambda raw, level: lzma.compress(raw, format=lzma.FORMAT_XZ, preset=level), _lzma_decompress,
             lzma.LZMAError),
}
STRONGEST = {"zstd": 22, "brotli": 11, "lzma": 9}
CODEC_ERRORS = tuple(error for _, _, error in CODECS.values())


def compress(raw: bytes, codec: str, level: int) -> bytes:
    return CODECS[codec][0](raw, level)


def decompress(body: bytes, codec: str, limit: int) -> bytes:
    """At most `limit` bytes; raises one of CODEC_ERRORS on a corrupt stream."""
    return CODECS[codec][1](body, limit)


def smallest(raw: bytes, codecs: tuple[str, ...] = tuple(CODECS)) -> tuple[str, bytes]:
    """(codec, body): the codec whose strongest level compresses `raw` to the fewest bytes; the first
    such on a tie, so the choice is deterministic."""
    bodies = {c: compress(raw, c, STRONGEST[c]) for c in codecs}
    best = min(bodies, key=lambda c: len(bodies[c]))
    return best, bodies[best]
