"""Per-group compression (PR #1855's COMPRESSOR=pergroup): the artifact body as several streams.

The integer codes of the quantized matrices are bucketed by role (the tensor name without
`blocks.N.`: attn.c_q.weight, mlp.fc.weight, tok_emb.weight, ...), so that codes of one
distribution sit together. Each matrix is written transposed (column by column): a column runs
over the rows, which after the optional sort are neighbours. For roles that compress.sort_rows
names, the rows are first reordered by a greedy L1 nearest-neighbour walk (`l1_order`), and the
order is stored. Everything else (scales, control tensors, LQER factors, small groups, the orders
and the meta) stays in a remainder tensor file, byte-shuffled, in which each bucketed matrix is an
empty placeholder that keeps its place, and whose meta carries the buckets' manifest
({role: [[codes tensor, rows, cols], ...]}).

Each stream (the remainder first, then the buckets) goes through whichever of brotli, lzma and zstd
makes it smallest, at its strongest level (pgolf.quant.codec); with compress.zpaq, ZPAQ level 5 (the
zpaq package's libzpaq, the context-mixing back-end the record reaches through the lrzip binary)
is a candidate too. Streams are encoded and decoded side by side on the stage's threads (ZPAQ runs
at about 0.25 MB a second a core both ways: a full model's largest stream, mlp.fc's 11.5 MB, takes
tens of seconds). Figures: docs/compression.md.

Decoding undoes each step and checks every length, order and placeholder, so a damaged file fails
with its name; the artifact's sha256 then covers the rebuilt tensor file.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from pgolf.errors import PgolfError
from pgolf.formats import tensorfile
from pgolf.quant.codec import CODEC_ERRORS, CODECS, FAST, decompress, smallest
from pgolf.quant.pack import shuffle, unshuffle

MANIFEST = "pergroup"  # the remainder meta's key for the buckets
# A bucket smaller than this stays in the remainder: a stream of its own would cost the codec's
# framing and a cold start for less than it could gain (the attention gates' 96-code matrices).
MIN_GROUP_BYTES = 16384
MAX_SORT_ROWS = 32768  # the sort holds an n x n table of distances (4 GiB at this size)
MAX_STREAM_BYTES = 1 << 30


class PergroupError(PgolfError):
    """A per-group body that does not decode to what its header and manifest promise."""


def role_of(codes_key: str) -> str:
    """blocks.3.attn.c_q.weight.codes -> attn.c_q.weight; tok_emb.weight.codes -> tok_emb.weight."""
    return re.sub(r"^blocks\.\d+\.", "", codes_key.removesuffix(".codes"))


def l1_order(codes: Tensor) -> Tensor:
    """A row order in which each row is the unvisited row nearest (L1) to the one before, from row 0;
    the lowest index on a tie. Integer codes make every distance exact, so the walk is reproducible."""
    n = codes.size(0)
    if n > MAX_SORT_ROWS:
        raise PgolfError(f"compress.sort_rows: a matrix of {n} rows is over the {MAX_SORT_ROWS}-row limit "
                         "of the L1 sort")
    x = codes.float()
    dist = torch.cat([torch.cdist(x[i : i + 1024], x, p=1) for i in range(0, n, 1024)])
    order, cur = [0], 0
    dist[:, 0] = float("inf")
    for _ in range(n - 1):
        cur = int(torch.argmin(dist[cur]))
        order.append(cur)
        dist[:, cur] = float("inf")
    return torch.tensor(order, dtype=torch.int64)


def _buckets(tensors: dict[str, Tensor], meta: dict) -> dict[str, list[str]]:
    """role -> the codes tensors of that role, in file order; only buckets of MIN_GROUP_BYTES or more."""
    plan = meta.get("quant", {}).get("plan", {})
    keys = [f"{n}.codes" for n, how in plan.items() if how == "int"]
    buckets: dict[str, list[str]] = {}
    for key in (k for k in keys if tensors[k].ndim == 2):
        buckets.setdefault(role_of(key), []).append(key)
    return {r: ks for r, ks in buckets.items() if sum(tensors[k].numel() for k in ks) >= MIN_GROUP_BYTES}


def _pool() -> ThreadPoolExecutor:
    """As many threads as the stage was given (Snakemake sets OMP_NUM_THREADS, which torch reads: one for
    compress and size, the rule's threads for evaluate); libzpaq, lzma and zstd release the GIL as they work."""
    return ThreadPoolExecutor(max_workers=torch.get_num_threads())


def _order_dtype(rows: int) -> torch.dtype:
    return torch.int16 if rows <= 1 << 15 else torch.int32


def split(tensors: dict[str, Tensor], meta: dict, sort_rows: list[str],
          orders: dict[str, Tensor] | None = None) -> tuple[bytes, list[bytes]]:
    """(remainder tensor file, one bucket blob per manifest entry). `orders` caches row orders by
    tensor (pruning encodes again and again: the order of the unpruned codes serves them all)."""
    if MANIFEST in meta:
        raise PgolfError(f"the tensor file's meta already holds a {MANIFEST!r} entry")
    orders = {} if orders is None else orders
    rest, manifest, blobs = dict(tensors), {}, []
    for role, keys in _buckets(tensors, meta).items():
        sort, parts = any(p in role for p in sort_rows), []
        for key in keys:
            codes = tensors[key]
            if sort:
                if key not in orders:
                    orders[key] = l1_order(codes)
                rest[f"{key}.order"] = orders[key].to(_order_dtype(codes.size(0)))
                codes = codes[orders[key]]
            parts.append(codes.t().contiguous().numpy().tobytes())
            rest[key] = torch.zeros(0, dtype=torch.int8)  # keeps the tensor's place in the file
        manifest[role] = [[k, *tensors[k].shape] for k in keys]
        blobs.append(b"".join(parts))
    return tensorfile.dumps(rest, {**meta, MANIFEST: manifest}, checksums=False), blobs


def encode(tensors: dict[str, Tensor], meta: dict, stride: int, sort_rows: list[str],
           orders: dict[str, Tensor] | None = None, codecs: tuple[str, ...] = FAST) -> tuple[bytes, list[dict]]:
    """(body, the header's stream list: codec, body and payload bytes of each stream); each stream by
    the smallest of `codecs`."""
    remainder, blobs = split(tensors, meta, sort_rows, orders)
    payloads = [shuffle(remainder, stride), *blobs]
    with _pool() as pool:
        chosen = list(pool.map(lambda p: smallest(p, codecs), payloads))
    streams = [{"codec": c, "body_bytes": len(b), "payload_bytes": len(p)}
               for (c, b), p in zip(chosen, payloads, strict=True)]
    return b"".join(b for _, b in chosen), streams


def _count(value: object, what: str, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_STREAM_BYTES:
        raise PergroupError(f"{source}: bad {what} {value!r}")
    return value


def _payloads(streams: object, body: memoryview, source: str) -> list[bytes]:
    if not isinstance(streams, list) or not streams or not all(isinstance(s, dict) for s in streams):
        raise PergroupError(f"{source}: bad 'streams' entry in the header")
    sizes = [_count(s.get("body_bytes"), "stream length", source) for s in streams]
    if sum(sizes) != len(body):
        raise PergroupError(f"{source}: the body is {len(body)} bytes, its streams say {sum(sizes)} "
                            "(truncated, or bytes appended)")
    jobs, at = [], 0
    for s, size in zip(streams, sizes, strict=True):
        n = _count(s.get("payload_bytes"), "stream payload length", source)
        if s.get("codec") not in CODECS:
            raise PergroupError(f"{source}: unknown stream codec {s.get('codec')!r}")
        jobs.append((bytes(body[at : at + size]), s["codec"], n))
        at += size
    with _pool() as pool:
        return list(pool.map(lambda job: _payload(*job, source), jobs))


def _payload(body: bytes, codec: str, n: int, source: str) -> bytes:
    try:
        payload = decompress(body, codec, n + 1)
    except CODEC_ERRORS as e:
        raise PergroupError(f"{source}: compressed stream is corrupt ({e})") from None
    if len(payload) != n:
        raise PergroupError(f"{source}: a stream decompressed to {len(payload)} bytes, its header says {n}")
    return payload


def _restore(tensors: dict[str, Tensor], key: str, rows: int, cols: int, data: bytes, source: str) -> None:
    """Put bucketed matrix `key` back in its placeholder, its rows in their first order."""
    if tensors.get(key) is None or tensors[key].numel() != 0:
        raise PergroupError(f"{source}: the manifest names {key!r}, which has no placeholder")
    codes = torch.from_numpy(np.frombuffer(data, dtype=np.int8).copy()).reshape(cols, rows).t()
    order = tensors.pop(f"{key}.order", None)
    if order is not None:
        order = order.long()
        if order.shape != (rows,) or not torch.equal(order.sort().values, torch.arange(rows)):
            raise PergroupError(f"{source}: the stored row order of {key!r} is not a permutation of its rows")
        codes = codes[torch.argsort(order)]
    tensors[key] = codes.contiguous()


def _entries(manifest: object, n_blobs: int, source: str) -> list[list[tuple[str, int, int]]]:
    ok = isinstance(manifest, dict) and len(manifest) == n_blobs and all(
        isinstance(es, list) and all(isinstance(e, list) and len(e) == 3 and isinstance(e[0], str)
                                     and all(isinstance(d, int) and 0 <= d <= MAX_STREAM_BYTES for d in e[1:])
                                     for e in es) for es in manifest.values())
    if not ok:
        raise PergroupError(f"{source}: the bucket manifest does not match the {n_blobs} bucket streams")
    return [[tuple(e) for e in es] for es in manifest.values()]


def decode(header: dict, body: memoryview, source: str) -> bytes:
    """The tensor file (without digests) that `encode` split."""
    payloads = _payloads(header.get("streams"), body, source)
    stride = header.get("shuffle")
    if not isinstance(stride, int) or not 0 <= stride <= 16:
        raise PergroupError(f"{source}: bad shuffle stride {stride!r}")
    tensors, meta = tensorfile.loads(unshuffle(payloads[0], stride), source, checksums=False)
    for entries, blob in zip(_entries(meta.pop(MANIFEST, None), len(payloads) - 1, source), payloads[1:],
                             strict=True):
        if sum(r * c for _, r, c in entries) != len(blob):
            raise PergroupError(f"{source}: a bucket stream of {len(blob)} bytes does not hold its matrices")
        at = 0
        for key, rows, cols in entries:
            _restore(tensors, key, rows, cols, blob[at : at + rows * cols], source)
            at += rows * cols
    if any(k.endswith(".codes.order") for k in tensors):
        raise PergroupError(f"{source}: a stored row order names no bucketed matrix")
    return tensorfile.dumps(tensors, meta, checksums=False)
