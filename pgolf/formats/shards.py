"""The challenge's token shard format: 256 little-endian int32 header, then uint16 tokens.

header[0] = 20240520 (magic), header[1] = 1 (version), header[2] = number of tokens.

The format carries no checksum of its own, so the dataset's manifest records each shard's sha256
(header and tokens) and a stage reads a shard only through `open_shard`, which checks it: a changed
token id, or two equal-length shards swapped, would otherwise train or score other data with exit 0.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from pgolf.data import caseops
from pgolf.errors import PgolfError
from pgolf.formats.container import file_size
from pgolf.formats.io import atomic_path

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4


class ShardError(PgolfError):
    """A shard file that is not in the challenge's format."""


def write_shard(path: str | Path, tokens: np.ndarray) -> str:
    """Write a shard; return the sha256 of its bytes (for the manifest), taken as they are written."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise PgolfError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    digest = hashlib.sha256()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for part in (header.tobytes(), tokens.astype("<u2").tobytes()):
            digest.update(part)
            f.write(part)
    return digest.hexdigest()


def read_header(path: str | Path) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    size = file_size(path, ShardError, "shard")
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


def load_shard(path: str | Path, mmap: bool = True, vocab_size: int | None = None) -> np.ndarray:
    """Tokens of a validated shard as uint16 (memory-mapped by default); with `vocab_size`, every id
    is checked to lie below it, so no id beyond the model's embedding ever reaches it."""
    n = read_header(path)
    if mmap:
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    else:
        tokens = np.fromfile(path, dtype="<u2", count=n, offset=HEADER_BYTES)
    if vocab_size is not None:
        check_ids(path, tokens, vocab_size)
    return tokens


# path -> (mtime_ns, size, largest id): loaders reopen a shard each time they wrap around to it,
# and one pass over its ids (~50 ms per 100M tokens) is enough per process unless the file changes.
_MAX_ID: dict[str, tuple[int, int, int]] = {}


# path -> (file identity, sha256) of the shards this process has hashed: a loader reopens a shard
# each time it wraps around to it, and hashes it again only if the file changed.
_VERIFIED: dict[str, tuple[tuple[int, ...], str]] = {}


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_shard(path: str | Path, sha256: str, vocab_size: int | None = None, mmap: bool = True) -> np.ndarray:
    """The tokens of a shard whose bytes have the sha256 its dataset's manifest records (`sha256`),
    checked before any token is returned: ShardError naming the shard and the manifest otherwise.
    The hash runs over the very bytes returned (the mapping, or the copy), at about 1.1 GB/s (0.17 s
    for a 200 MB FineWeb shard); a file this process already verified, unchanged since, is not hashed
    again. With `vocab_size`, every id is checked to lie below it, as load_shard does."""
    n = read_header(path)
    with open(path, "rb") as f:  # the identity of the file whose bytes are read, not of a later one
        ident = _identity(os.fstat(f.fileno()))
        data = np.memmap(f, dtype=np.uint8, mode="r") if mmap else np.fromfile(f, dtype=np.uint8)
    key = str(Path(path).resolve())
    if len(data) != HEADER_BYTES + 2 * n:
        raise ShardError(f"{path}: changed while it was being read")
    if _VERIFIED.get(key) != (ident, sha256):
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ShardError(f"{path}: sha256 is not the one {Path(path).parent / MANIFEST} records; the shard "
                             "is damaged, changed, or another dataset's (rebuild the dataset)")
        _VERIFIED[key] = (ident, sha256)
    tokens = data[HEADER_BYTES:].view("<u2")
    if vocab_size is not None:
        check_ids(path, tokens, vocab_size)
    return tokens


def check_ids(path: str | Path, tokens: np.ndarray, vocab_size: int) -> None:
    st = os.stat(path)
    key, stamp = str(Path(path).resolve()), (st.st_mtime_ns, st.st_size)
    cached = _MAX_ID.get(key)
    if cached is None or cached[:2] != stamp:
        cached = (*stamp, int(tokens.max()) if len(tokens) else -1)
        _MAX_ID[key] = cached
    if cached[2] >= vocab_size:
        raise ShardError(f"{path}: holds token id {cached[2]}, beyond the vocabulary of {vocab_size} "
                         "(a shard from another tokenizer, or damaged)")


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def sidecar_name(split: str, shard: str) -> str:
    """The byte sidecar beside a token shard, named as the CaseOps records name it."""
    return shard.replace(f"fineweb_{split}_", f"fineweb_{split}_bytes_", 1)


def _token_shards(dataset_dir: str | Path, split: str) -> list[Path]:
    # digits first: fineweb_val_bytes_000000.bin is a sidecar, not a token shard
    return sorted(Path(dataset_dir).glob(f"fineweb_{split}_[0-9]*.bin"))


def list_shards(dataset_dir: str | Path, split: str) -> list[Path]:
    files = _token_shards(dataset_dir, split)
    if not files:
        raise ShardError(f"{dataset_dir}: no fineweb_{split}_*.bin shards")
    return files


def load_split(dataset_dir: str | Path, split: str, vocab_size: int | None = None) -> np.ndarray:
    """All tokens of a split, concatenated in shard order, every shard checked against the sha256 its
    manifest records before any of it is used (ids checked against `vocab_size` if given)."""
    return np.concatenate([open_shard(p, sha, vocab_size, mmap=False) for p, sha in shard_files(dataset_dir, split)])


# The dataset's manifest.json is the contract between the data stages and every consumer: the
# shards stage and fetch-fineweb write it; train, calibrate, order and evaluate check against it.
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
# text_transform: what the tokenizer was given; absent = the text itself. A transformed dataset
# carries a byte sidecar per token shard (one uint16 per token in the shard format: the UTF-8
# bytes of the original text that token accounts for), and BPB is counted from it.
TRANSFORMS = ("identity", caseops.NAME)


def read_manifest(dataset_dir: str | Path) -> dict:
    """The manifest of a dataset folder, its keys and types checked; any problem names the file."""
    path = Path(dataset_dir) / MANIFEST
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: manifest not found; the dataset folder is incomplete") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    problem = _manifest_problem(m)
    if problem:
        raise ShardError(f"{path}: {problem}")
    return m


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _manifest_problem(m: object) -> str | None:
    if not isinstance(m, dict):
        return "the top level must be a JSON object"
    if not (_is_count(m.get("vocab_size")) and m["vocab_size"] > 0):
        return f"vocab_size must be a positive integer, got {m.get('vocab_size')!r}"
    sha = m.get("tokenizer_sha256")
    if not _is_sha256(sha):
        return f"tokenizer_sha256 must be 64 lowercase hex digits, got {sha!r}"
    splits = m.get("splits")
    for split in SPLITS:
        entry = splits.get(split) if isinstance(splits, dict) else None
        if not isinstance(entry, dict):
            return f"splits.{split} is missing"
        if not (isinstance(entry.get("shards"), list) and all(isinstance(s, str) for s in entry["shards"])):
            return f"splits.{split}.shards must be a list of file names"
        if not _is_count(entry.get("tokens")):
            return f"splits.{split}.tokens must be a non-negative integer, got {entry.get('tokens')!r}"
        problem = _digest_problem(split, entry) or _sidecar_problem(split, entry)
        if problem:
            return problem
    transform = m.get("text_transform", "identity")
    if transform not in TRANSFORMS:
        return f"text_transform must be one of {', '.join(TRANSFORMS)}, got {transform!r}"
    if transform != "identity" and "byte_sidecar" not in splits["val"]:
        return f"text_transform {transform} needs splits.val.byte_sidecar: BPB counts the original text's bytes"
    return None


def _is_sha256(x: object) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


def _digest_problem(split: str, entry: dict) -> str | None:
    if "sha256" not in entry:
        return (f"splits.{split}.sha256 is missing: a manifest from before token shards carried checksums; "
                "rebuild the dataset (delete its folder and rerun the shards or fetch-fineweb stage)")
    digests = entry["sha256"]
    if not (isinstance(digests, list) and len(digests) == len(entry["shards"]) and all(map(_is_sha256, digests))):
        return f"splits.{split}.sha256 must hold one sha256 (64 lowercase hex digits) per shard, in order"
    return None


def _sidecar_problem(split: str, entry: dict) -> str | None:
    side = entry.get("byte_sidecar")
    if side is None:
        return None
    where = f"splits.{split}.byte_sidecar"
    if not (isinstance(side, dict) and isinstance(side.get("shards"), list) and isinstance(side.get("sha256"), list)):
        return f"{where} must be an object with lists 'shards' and 'sha256'"
    expected = [sidecar_name(split, s) for s in entry["shards"]]
    if side["shards"] != expected:
        return f"{where}.shards must be {expected} (one per token shard, in order), got {side['shards']!r}"
    if len(side["sha256"]) != len(expected) or not all(_is_sha256(h) for h in side["sha256"]):
        return f"{where}.sha256 must hold one sha256 (64 lowercase hex digits) per sidecar"
    if not _is_count(entry.get("bytes")):
        return f"splits.{split}.bytes must be a non-negative integer with a byte sidecar, got {entry.get('bytes')!r}"
    return None


def check_vocab(dataset_dir: str | Path, vocab_size: int, source: str) -> dict:
    """The manifest, once `vocab_size` (`source` says where it came from) is known to be its own."""
    m = read_manifest(dataset_dir)
    if vocab_size != m["vocab_size"]:
        raise ShardError(f"{Path(dataset_dir) / MANIFEST}: the shards use a vocabulary of {m['vocab_size']} "
                         f"tokens, but {source} is {vocab_size}")
    return m


def open_dataset(dataset_dir: str | Path, vocab_size: int, source: str) -> dict:
    """Check a dataset against its manifest before a stage reads it: `vocab_size` (the vocabulary
    the stage was given; `source` says where it came from) must be the manifest's, and each split's
    shards on disk must be the ones the manifest lists, with its token counts. Returns the manifest."""
    m, path = check_vocab(dataset_dir, vocab_size, source), Path(dataset_dir) / MANIFEST
    for split in SPLITS:
        listed = m["splits"][split]["shards"]
        found = [p.name for p in _token_shards(dataset_dir, split)]
        if sorted(listed) != found:
            raise ShardError(f"{path}: lists {split} shards {listed}, but the folder holds {found}")
        counts = [read_header(Path(dataset_dir) / name) for name in listed]
        if sum(counts) != m["splits"][split]["tokens"]:
            raise ShardError(f"{path}: promises {m['splits'][split]['tokens']} {split} tokens, "
                             f"the shards hold {sum(counts)}")
        check_sidecar_files(dataset_dir, m, split, counts)
    return m


def shard_files(dataset_dir: str | Path, split: str) -> list[tuple[Path, str]]:
    """The split's token shards in name order (the order shard indices count in), each with the
    sha256 the manifest records for it; the folder must hold exactly the shards the manifest lists."""
    m, path = read_manifest(dataset_dir), Path(dataset_dir) / MANIFEST
    entry = m["splits"][split]
    listed = sorted(zip(entry["shards"], entry["sha256"], strict=True))
    found = [p.name for p in _token_shards(dataset_dir, split)]
    if [name for name, _ in listed] != found:
        raise ShardError(f"{path}: lists {split} shards {entry['shards']}, but the folder holds {found}")
    if not found:
        raise ShardError(f"{dataset_dir}: no fineweb_{split}_*.bin shards")
    return [(Path(dataset_dir) / name, sha) for name, sha in listed]


def check_sidecar_files(dataset_dir: str | Path, m: dict, split: str, counts: list[int]) -> None:
    """The split's byte sidecars on disk are the manifest's, each as long as its token shard."""
    path, entry = Path(dataset_dir) / MANIFEST, m["splits"][split]
    listed = entry.get("byte_sidecar", {}).get("shards", [])
    found = [p.name for p in sorted(Path(dataset_dir).glob(f"fineweb_{split}_bytes_*.bin"))]
    if sorted(listed) != found:
        raise ShardError(f"{path}: lists {split} byte sidecars {listed}, but the folder holds {found}")
    for name, shard, n in zip(listed, entry["shards"], counts, strict=False):  # listed is [] without a sidecar
        side = read_header(Path(dataset_dir) / name)
        if side != n:
            raise ShardError(f"{Path(dataset_dir) / name}: a byte sidecar of {side} tokens beside {shard} of {n}")


def load_sidecar(dataset_dir: str | Path, split: str) -> np.ndarray | None:
    """The split's per-token original bytes (int64), or None for a dataset without a sidecar. Each
    file must have the sha256 the manifest records, and they must add up to the split's bytes."""
    m = read_manifest(dataset_dir)
    entry = m["splits"][split]
    if "byte_sidecar" not in entry:
        return None
    check_sidecar_files(dataset_dir, m, split, [read_header(Path(dataset_dir) / s) for s in entry["shards"]])
    parts = []
    for name, sha in zip(entry["byte_sidecar"]["shards"], entry["byte_sidecar"]["sha256"], strict=True):
        file = Path(dataset_dir) / name
        data = file.read_bytes()
        if hashlib.sha256(data).hexdigest() != sha:
            raise ShardError(f"{file}: sha256 is not the one {Path(dataset_dir) / MANIFEST} records; "
                             "the byte sidecar is damaged or from another dataset")
        parts.append(np.frombuffer(data, dtype="<u2", offset=HEADER_BYTES).astype(np.int64))
    counts = np.concatenate(parts)
    if int(counts.sum()) != entry["bytes"]:
        raise ShardError(f"{Path(dataset_dir) / MANIFEST}: the {split} byte sidecars add up to {int(counts.sum())} "
                         f"bytes, the split has {entry['bytes']}")
    return counts


def check_tokenizer(dataset_dir: str | Path, tokenizer: str | Path) -> None:
    """The tokenizer must be the one the shards were made with: its bytes count BPB."""
    m, path = read_manifest(dataset_dir), Path(dataset_dir) / MANIFEST
    try:
        sha = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    except FileNotFoundError:
        raise ShardError(f"{tokenizer}: tokenizer not found") from None
    if sha != m["tokenizer_sha256"]:
        raise ShardError(f"{tokenizer}: sha256 {sha[:16]}... is not the tokenizer the shards were made with "
                         f"({path}: tokenizer_sha256 {m['tokenizer_sha256'][:16]}...)")
