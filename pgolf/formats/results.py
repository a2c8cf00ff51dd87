"""The JSON results stages hand each other (train.json, size.json, eval.json, summary.json,
shard_order.json).

The writer stores the sha256 of the content in the file (key `content_sha256`, over the canonical
JSON of everything else) and every reader checks it: one edited digit of an eval.json would move a
mean, and of a size.json a submission's byte count, with exit 0. Each number is then checked where
it is read: present, a number (JSON true is not 1), and finite. A NaN score would otherwise reach
the mean, the Welch test and submission.json as if it were a result.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from pgolf.errors import PgolfError
from pgolf.formats.io import read_json, write_json

CHECKSUM = "content_sha256"


def _digest(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_result(path: str | Path, obj: dict[str, Any]) -> None:
    """Write a result with the checksum of its content (taken over what a reader will load: JSON
    turns tuples into lists and keys into strings)."""
    content = json.loads(json.dumps(obj))
    write_json(path, {**content, CHECKSUM: _digest(content)})


def read_result(path: str | Path) -> dict[str, Any]:
    """A result a stage wrote with write_result, its checksum checked; PgolfError naming the file otherwise."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise PgolfError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    if CHECKSUM not in obj:
        raise PgolfError(f"{path}: carries no {CHECKSUM} (written by an older pgolf, or by hand); "
                         "rerun the stage that writes it")
    stored = obj.pop(CHECKSUM)
    if stored != _digest(obj):
        raise PgolfError(f"{path}: its content does not match its {CHECKSUM}: the file was edited or damaged "
                         "(rerun the stage that wrote it)")
    return obj


def has(obj: dict, keys: tuple[str, ...]) -> bool:
    for k in keys:
        if not isinstance(obj, dict) or k not in obj:
            return False
        obj = obj[k]
    return True


def number(obj: dict, keys: tuple[str, ...], source: str | Path) -> float:
    """obj[k1][k2]...: a finite number, or a PgolfError naming the file and the key."""
    dotted = ".".join(keys)
    if not has(obj, keys):
        raise PgolfError(f"{source}: missing {dotted}")
    for k in keys:
        obj = obj[k]
    if isinstance(obj, bool) or not isinstance(obj, int | float):
        raise PgolfError(f"{source}: {dotted} is {obj!r}, not a number")
    if not math.isfinite(obj):
        raise PgolfError(f"{source}: {dotted} is {obj}, not a finite number")
    return obj


def integer(obj: dict, keys: tuple[str, ...], source: str | Path) -> int:
    value = number(obj, keys, source)
    if value != int(value):
        raise PgolfError(f"{source}: {'.'.join(keys)} is {value}, not a whole number")
    return int(value)


def first_nonfinite(obj: Any, prefix: str = "") -> tuple[str, float] | None:
    """The dotted key and value of the first NaN or infinite number anywhere in obj."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return prefix, obj
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        found = first_nonfinite(v, f"{prefix}.{k}" if prefix else str(k))
        if found is not None:
            return found
    return None
