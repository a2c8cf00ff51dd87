"""The framing shared by pgolf's binary files: magic, version, JSON header length, JSON header, body.

Parsing checks every length against the real data before reading, so a corrupt or hostile file
fails with its name and the problem instead of a huge allocation or a confusing traceback.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_PREFIX = struct.Struct("<8sIQ")


PREFIX_BYTES = _PREFIX.size


def header_length(prefix: bytes) -> int:
    """The JSON header's length that a file's first PREFIX_BYTES promise (checked by unframe)."""
    return _PREFIX.unpack_from(prefix)[2]


def frame(magic: bytes, version: int, header: dict) -> bytes:
    """Everything before the body."""
    blob = json.dumps(header, sort_keys=True).encode()
    return _PREFIX.pack(magic, version, len(blob)) + blob


def unframe(data: bytes, magic: bytes, version: int, max_header: int, source: str,
            error: type[ValueError], what: str, canonical: bool = False) -> tuple[dict, memoryview]:
    """(header, body) of `data`; raise `error` naming `source` and the problem. With `canonical`, the
    header must be byte for byte what `frame` writes for its contents: no flipped space, reordered
    key or length that still parses, so that a checksum over the header's contents covers every
    byte before the body."""
    if len(data) < _PREFIX.size:
        raise error(f"{source}: truncated ({len(data)} bytes)")
    got_magic, got_version, hlen = _PREFIX.unpack_from(data)
    if got_magic != magic:
        raise error(f"{source}: bad magic {got_magic!r}; not a pgolf {what}")
    if got_version != version:
        # Older versions lack checks (tensor file 1 has no checksums): refused, never read half-trusted.
        raise error(f"{source}: unsupported {what} version {got_version}; this pgolf reads version {version} "
                    "(delete it and rerun the stage that wrote it)")
    if hlen > max_header or _PREFIX.size + hlen > len(data):
        raise error(f"{source}: header length {hlen} exceeds the file (truncated?)")
    try:
        header = json.loads(bytes(data[_PREFIX.size : _PREFIX.size + hlen]))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{source}: unreadable header ({e})") from None
    if not isinstance(header, dict):
        raise error(f"{source}: header is not a JSON object")
    if canonical and frame(magic, version, header) != bytes(data[: _PREFIX.size + hlen]):
        raise error(f"{source}: the header is not as pgolf writes it (damaged)")
    return header, memoryview(data)[_PREFIX.size + hlen :]


def file_size(path: str | Path, error: type[Exception], what: str = "file") -> int:
    """The size of `path`; `error` naming it when it is missing (one message for every reader)."""
    try:
        return Path(path).stat().st_size
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None


def read_file(path: str | Path, error: type[ValueError], max_bytes: int | None = None, what: str = "file") -> bytes:
    """The bytes of `path`; with `max_bytes`, a larger file is refused before it is read (a wrong path
    to a multi-GB file must not be loaded into memory to learn that it is not ours)."""
    size = file_size(path, error)
    if max_bytes is not None and size > max_bytes:
        raise error(f"{path}: {size:,} bytes is over the {max_bytes:,}-byte limit; not {what}")
    return Path(path).read_bytes()
