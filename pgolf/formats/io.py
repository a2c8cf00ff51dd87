"""Atomic file output: a killed job never leaves a file a later stage would take for finished."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pgolf.errors import PgolfError

if TYPE_CHECKING:
    import pyarrow as pa

_UMASK = os.umask(0)
os.umask(_UMASK)


# The errno values of a filesystem with no room left for a write: full, or over the user's quota.
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT})


class DiskFullError(PgolfError):
    """An output the filesystem had no room for: names the final path (never the temporary one),
    the space it needed (exactly, when its writer said; else at least what was written before the
    disk filled) and the space free once the partial output is gone."""

    path: Path
    needed: int
    exact: bool


def _disk_full(path: Path, needed: int, exact: bool, reason: str) -> DiskFullError:
    if exact:
        need = f"{needed:,} bytes"
    else:
        need = f"at least {needed:,} bytes (written before the disk filled)" if needed else "more room than it had"
    e = DiskFullError(f"{path}: could not be written ({reason}): it needs {need}, and {_free(path)} on its "
                      "filesystem; free some space and rerun")
    e.path, e.needed, e.exact = path, needed, exact
    return e


def _free(path: Path) -> str:
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            return f"{shutil.disk_usage(folder).free:,} bytes are free"
    return "the free space is unknown"


def _size(path: Path | None) -> int:
    """Bytes under `path` (a file, or a folder's files) now; 0 if there is none."""
    with contextlib.suppress(OSError):
        if path is not None and path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size if path is not None else 0
    return 0


def _no_room(e: Exception) -> bool:
    return isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in _NO_ROOM)


def _reason(e: Exception, tmp: Path | None) -> str:
    """What the OS said, and which file it said it of when that is not the output itself."""
    if isinstance(e, DiskFullError):
        culprit, said = e.path, os.strerror(errno.ENOSPC)
    else:  # os.strerror: arrow's OSError carries its own longer text
        culprit, said = e.filename, os.strerror(e.errno)
    if culprit is None or tmp is None or Path(culprit) == tmp:
        return said
    inside = tmp in Path(culprit).parents
    return f"{said}, writing {Path(culprit).relative_to(tmp) if inside else culprit}"


@contextlib.contextmanager
def atomic_path(path: str | Path, size: int | Callable[[], int] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds. `size`, the
    bytes the block writes (or a function that counts them, called only if the disk fills), is what
    a full disk's message says the file needs."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; outputs are ordinary files
        os.replace(tmp, path)
    except Exception as e:
        if not _no_room(e):
            raise
        written = _size(tmp)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        needed = size() if callable(size) else size
        raise _disk_full(path, written if needed is None else needed, needed is not None, _reason(e, tmp)) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; it replaces `path` only if the block succeeds."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except Exception as e:
        if not _no_room(e):
            raise
        # the files written so far, and what the file that failed needed (its partial copy is gone)
        written = _size(tmp) + (max(e.needed - _size(e.path), 0) if isinstance(e, DiskFullError) else 0)
        reason = _reason(e, tmp)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_full(path, written, False, reason) from None
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path, size=len(data)) as tmp:
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
    with atomic_path(path, size=lambda: _parquet_size(table)) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True)


def _parquet_size(table: pa.Table) -> int:
    """The bytes write_parquet writes for `table`, counted without storing them (for a full disk's
    message: pyarrow removes the partial file, so its size cannot say)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = pa.MockOutputStream()
    pq.write_table(table, sink, write_page_checksum=True)
    return sink.size()


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
