"""Atomic file output: a killed job never leaves a file a later stage would take for finished."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgolf.errors import PgolfError

if TYPE_CHECKING:
    import pyarrow as pa

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; outputs are ordinary files
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except json.JSONDecodeError as e:
        raise PgolfError(f"{path}: not valid JSON ({e})") from None


# pgolf's parquet files carry a CRC32 on every data page, and the sha256 of their shape (column
# names, types, row count) in the footer, which has no checksum of its own: both written and checked
# here only, so that a damaged metrics or documents file is refused where it is read instead of
# changing values or renaming a column silently.
_SHAPE_KEY = b"pgolf.shape_sha256"


def _shape_digest(table: pa.Table) -> bytes:
    schema = table.schema.remove_metadata().to_string(show_field_metadata=False)
    return hashlib.sha256(f"{schema}\n{table.num_rows}".encode()).hexdigest().encode()


def write_parquet(path: str | Path, table: pa.Table) -> None:
    import pyarrow.parquet as pq  # imported here: most stages never touch parquet

    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _SHAPE_KEY: _shape_digest(table)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)


def read_parquet(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet file that write_parquet wrote, every checksum checked; PgolfError naming it otherwise."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: file not found")
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise PgolfError(f"{path}: damaged or not a parquet file ({e})") from None
    stored = (table.schema.metadata or {}).get(_SHAPE_KEY)
    if stored is None:
        raise PgolfError(f"{path}: carries no pgolf checksum (written by an older pgolf, or not by pgolf); "
                         "delete it and rerun the stage that wrote it")
    if stored != _shape_digest(table):
        raise PgolfError(f"{path}: checksum mismatch in its schema (column names, types or row count); "
                         "the file is damaged (delete it and rerun the stage that wrote it)")
    return table if columns is None else table.select(columns)
