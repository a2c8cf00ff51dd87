"""The general-purpose codecs an artifact's streams may use, each with a decompressor held to a length.

Every decompressor takes the most bytes it may return: a lying header can never make a reader
allocate more than it promised (one byte over that limit shows the lie). ZPAQ is the exception: the
zpaq package (libzpaq, the context-mixing back-end of the record's `lrzip -z`) has no output limit,
so a zpaq stream is decoded whole and then cut to the limit; its codec is off unless chosen
(compress.codec zpaq, or compress.zpaq for pergroup's streams).
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


class ZpaqError(ValueError):
    """A zpaq stream libzpaq refuses (its own error class, raised as ours so that the package is
    imported only where ZPAQ is used: a submission whose artifact has no zpaq stream runs without it)."""


# One thread makes one ZPAQ block: the same bytes on any machine, and the best ratio (threads split
# the input into blocks that each start cold).
def _zpaq_compress(raw: bytes, level: int) -> bytes:
    import zpaq

    return zpaq.compress(raw, level=level, threads=1, hints=False)


def _zpaq_decompress(body: bytes, limit: int) -> bytes:
    import zpaq

    try:
        return zpaq.decompress(body, threads=1)[:limit]  # refuses a body without ZPAQ's block tag
    except zpaq.Error as e:
        raise ZpaqError(str(e)) from None


# codec -> (compress(raw, level), decompress(body, at most this many bytes)).
CODECS = {
    "zstd": (lambda raw, level: zstandard.ZstdCompressor(level=level).compress(raw), _zstd_decompress),
    "brotli": (lambda raw, level: brotli.compress(raw, quality=level), _brotli_decompress),
    "lzma": (lambda raw, level: lzma.compress(raw, format=lzma.FORMAT_XZ, preset=level), _lzma_decompress),
    "zpaq": (_zpaq_compress, _zpaq_decompress),
}
STRONGEST = {"zstd": 22, "brotli": 11, "lzma": 9, "zpaq": 5}
CODEC_ERRORS = (zstandard.ZstdError, brotli.error, lzma.LZMAError, ZpaqError)
FAST = ("zstd", "brotli", "lzma")  # pergroup's choice unless compress.zpaq adds ZPAQ (slow both ways)


def compress(raw: bytes, codec: str, level: int) -> bytes:
    return CODECS[codec][0](raw, level)


def decompress(body: bytes, codec: str, limit: int) -> bytes:
    """At most `limit` bytes; raises one of CODEC_ERRORS on a corrupt stream."""
    return CODECS[codec][1](body, limit)


def smallest(raw: bytes, codecs: tuple[str, ...] = FAST) -> tuple[str, bytes]:
    """(codec, body): the codec whose strongest level compresses `raw` to the fewest bytes; the first
    such on a tie, so the choice is deterministic."""
    bodies = {c: compress(raw, c, STRONGEST[c]) for c in codecs}
    best = min(bodies, key=lambda c: len(bodies[c]))
    return best, bodies[best]
