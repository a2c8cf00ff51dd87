"""The artifact: a plain header, then the compressed quantized tensor file. Never pickle.

Layout (pgolf.formats.container): b"PGOLFART" | u32 version | u64 header length | JSON header | body.
The body is the codec's compression of the payload: the quantized tensor file with sub-byte codes
packed densely (pgolf.quant.pack), then optionally byte-shuffled; or, with codec pergroup, several
streams (pgolf.quant.pergroup), each listed in the header with its own codec. The header names the codec and level, the
shuffle stride, the packed tensors (bits, shape), the body, payload and raw lengths, the parameter
and pruned-code counts, and one sha256 over the rest of the header and the raw tensor file, so that
no byte of the file lies outside it: a header value (params, pruned_codes) that size.json and
eval.json quote is as covered as a weight. The quantize stage's tensor file is verified (its own checksums)
before it is packed, and stored without its per-tensor digests (about 65 bytes a tensor, which the
artifact's one sha256 makes redundant): the artifact's sha256 is taken over exactly those tensors,
and reading rebuilds the quantize stage's file byte for byte.

Reading refuses a file over MAX_FILE_BYTES before reading it, a header not byte for byte as `frame`
writes it, checks the body length against the header (a truncated or padded file fails),
decompresses at most the promised payload length, unpacks only tensors whose byte counts match
their shapes, and checks the rebuilt tensor file's length and the checksum: a corrupt or hostile
file fails with its name and the problem; every single-bit flip of the header is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import NamedTuple

from pgolf.errors import PgolfError
from pgolf.formats import tensorfile
from pgolf.formats.container import frame, read_file, unframe
from pgolf.formats.io import write_bytes
from pgolf.quant import pergroup
from pgolf.quant.codec import CODEC_ERRORS, CODECS, FAST
from pgolf.quant.pack import PackError, pack_codes, shuffle, unpack_codes, unshuffle

MAGIC = b"PGOLFART"
# 6: the sha256 covers the header too; 5: the payload may carry LQER factors (a reader that ignored
# them would score other weights) and the body may be per-group streams; 4: the payload is a tensor
# file without per-tensor digests
VERSION = 6
MAX_HEADER_BYTES = 1 << 20
MAX_RAW_BYTES = 1 << 30  # far above any 16 MB artifact's decompressed size
MAX_FILE_BYTES = 1 << 28  # sixteen times the challenge's cap: anything larger is not an artifact


class ArtifactError(PgolfError):
    """An artifact that is corrupt, truncated or not ours."""


def param_count(tensors: dict, meta: dict) -> int:
    """Model parameters in a (quantized) tensor file: codes count, their scales do not."""
    plan = meta.get("quant", {}).get("plan")
    if plan is None:
        return sum(t.numel() for t in tensors.values())
    return sum(tensors[f"{n}.codes" if how == "int" else n].numel() for n, how in plan.items())


def pack_payload(raw: bytes, tensors: dict, meta: dict, pack: bool) -> tuple[bytes, dict[str, list]]:
    """Tensor file `raw` (loaded: tensors, meta) with its sub-byte codes packed, and what was packed:
    {tensor: [bits, shape]}."""
    tensors = dict(tensors)
    bits = meta.get("quant", {}).get("bits", {}) if pack else {}
    info = {}
    for name, b in bits.items():
        if b < 8:
            key = f"{name}.codes"
            info[key] = [b, list(tensors[key].shape)]
            tensors[key] = pack_codes(tensors[key], b)
    return (tensorfile.dumps(tensors, meta, checksums=False) if info else raw), info


def encode(raw: bytes, cfg: dict, pruned_codes: int = 0, source: str = "pruned tensors",
           orders: dict | None = None) -> bytes:
    """The artifact for tensor file `raw` (read from `source`) under compress config cfg (codec, level,
    pack, shuffle, sort_rows, zpaq). `raw` must pass every check of the tensor file reader first. `orders`
    caches pergroup's row orders between encodes of one model."""
    if cfg["codec"] not in (*CODECS, "pergroup"):
        raise ArtifactError(f"compress.codec: unknown codec {cfg['codec']!r}; known: {', '.join(CODECS)}, pergroup")
    tensors, meta = tensorfile.loads(raw, source)
    slim = tensorfile.dumps(tensors, meta, checksums=False)  # the artifact's own sha256 covers it
    stride = cfg["shuffle"]
    if cfg["codec"] == "pergroup":
        if cfg["pack"]:
            raise ArtifactError("compress.pack: codec pergroup stores one int8 per code; set pack false")
        codecs = (*FAST, "zpaq") if cfg["zpaq"] else FAST
        body, streams = pergroup.encode(tensors, meta, stride, cfg["sort_rows"], orders, codecs)
        lengths = {"body_bytes": len(body), "streams": streams}
        info = {}
    else:
        payload, info = pack_payload(slim, tensors, meta, cfg["pack"])
        body = CODECS[cfg["codec"]][0](shuffle(payload, stride), cfg["level"])
        lengths = {"body_bytes": len(body), "payload_bytes": len(payload)}
    header = {"codec": cfg["codec"], "level": cfg["level"], "shuffle": stride, "packed": info, **lengths,
              "raw_bytes": len(slim), "params": param_count(tensors, meta), "pruned_codes": pruned_codes}
    return frame(MAGIC, VERSION, {**header, "sha256": digest(header, slim)}) + body


def digest(header: dict, raw: bytes) -> str:
    """The artifact's sha256: over its header's other keys (as `frame` writes them) and the raw tensor
    file the body decodes to. One digest for both costs no byte more than one for the tensors alone."""
    rest = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode() + raw).hexdigest()


def _length(header: dict, key: str, source: str) -> int:
    n = header.get(key)
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_RAW_BYTES:
        raise ArtifactError(f"{source}: header promises {n!r} {key.replace('_', ' ')} (limit {MAX_RAW_BYTES})")
    return n


def _decompress(header: dict, body: memoryview, source: str) -> bytes:
    if header.get("codec") not in CODECS:
        raise ArtifactError(f"{source}: unknown codec {header.get('codec')!r}")
    if _length(header, "body_bytes", source) != len(body):
        raise ArtifactError(f"{source}: the body is {len(body)} bytes, the header says {header['body_bytes']} "
                            "(truncated, or bytes appended)")
    n = _length(header, "payload_bytes", source)
    try:
        payload = CODECS[header["codec"]][1](bytes(body), n + 1)  # one byte more shows a lying length
    except CODEC_ERRORS as e:
        raise ArtifactError(f"{source}: compressed data is corrupt ({e})") from None
    if len(payload) != n:
        raise ArtifactError(f"{source}: decompressed to {len(payload)} bytes, header promises {n} "
                            "(truncated or corrupt)")
    stride = header.get("shuffle")
    if not isinstance(stride, int) or not 0 <= stride <= 16:
        raise ArtifactError(f"{source}: bad shuffle stride {stride!r}")
    return unshuffle(payload, stride)


def _unpack_payload(payload: bytes, packed: object, source: str) -> bytes:
    if not packed:
        return payload
    if not isinstance(packed, dict):
        raise ArtifactError(f"{source}: bad 'packed' entry in the header")
    tensors, meta = tensorfile.loads(payload, source, checksums=False)
    for key, spec in packed.items():
        try:
            bits, shape = spec
            tensors[key] = unpack_codes(tensors[key], int(bits), [int(s) for s in shape])
        except (KeyError, TypeError, ValueError, PackError) as e:
            raise ArtifactError(f"{source}: packed tensor {key!r} is damaged ({e})") from None
    return tensorfile.dumps(tensors, meta, checksums=False)


def decode(data: bytes, source: str = "<bytes>") -> bytes:
    """The raw tensor file; raise ArtifactError naming `source` unless it is exactly what the header promises."""
    return decode_checked(data, source)[0]


def decode_checked(data: bytes, source: str) -> tuple[bytes, dict]:
    """(raw tensor file, header), both covered by the checksum; ArtifactError naming `source` otherwise."""
    header, body = unframe(data, MAGIC, VERSION, MAX_HEADER_BYTES, source, ArtifactError, "artifact", canonical=True)
    n = _length(header, "raw_bytes", source)
    try:
        if header.get("codec") == "pergroup":
            if _length(header, "body_bytes", source) != len(body):
                raise ArtifactError(f"{source}: the body is {len(body)} bytes, the header says "
                                    f"{header['body_bytes']} (truncated, or bytes appended)")
            raw = pergroup.decode(header, body, source)
        else:
            raw = _unpack_payload(_decompress(header, body, source), header.get("packed"), source)
    except pergroup.PergroupError as e:
        raise ArtifactError(str(e)) from None
    except tensorfile.TensorFileError as e:
        raise ArtifactError(f"{source}: payload is corrupt ({e})") from None
    if len(raw) != n:
        raise ArtifactError(f"{source}: rebuilt {len(raw)} bytes, header promises {n} (corrupt)")
    if digest(header, raw) != header.get("sha256"):
        raise ArtifactError(f"{source}: checksum mismatch; the artifact is corrupt")
    try:  # the quantize stage's tensor file again, digests and all, byte for byte
        return tensorfile.dumps(*tensorfile.loads(raw, source, checksums=False)), header
    except tensorfile.TensorFileError as e:
        raise ArtifactError(f"{source}: payload is corrupt ({e})") from None


def _read(path: str | Path) -> bytes:
    return read_file(path, ArtifactError, MAX_FILE_BYTES, "an artifact")


def write_artifact(path: str | Path, raw: bytes, cfg: dict) -> int:
    data = encode(raw, cfg)
    write_bytes(path, data)
    return len(data)


def read_artifact(path: str | Path) -> bytes:
    return decode(_read(path), str(path))


class Checked(NamedTuple):
    raw: bytes  # the quantize stage's tensor file
    header: dict
    file_bytes: int  # the artifact's size: the bytes read and checked


def read_checked(path: str | Path) -> Checked:
    """The artifact's tensor file, header and size from one read, every check passed."""
    data = _read(path)
    return Checked(*decode_checked(data, str(path)), len(data))


def read_tensors(path: str | Path) -> tuple[dict, dict]:
    """The artifact's quantized tensors and meta, every check of both readers passed."""
    return tensorfile.loads(read_artifact(path), str(path))


def read_header(path: str | Path) -> dict:
    """The artifact's header, once the whole file has passed every check: its values reach size.json
    and eval.json, and a header is only as good as the checksum over it."""
    return read_checked(path).header
