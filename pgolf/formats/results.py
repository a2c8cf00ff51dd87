"""The JSON results stages hand each other (train.json, size.json, eval.json, summary.json).

Each number is checked where it is read: present, a number (JSON true is not 1), and finite. A NaN
score would otherwise reach the mean, the Welch test and submission.json as if it were a result.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pgolf.errors import PgolfError
from pgolf.formats.io import read_json


def read_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold an object."""
    obj = read_json(path)
    if not isinstance(obj, dict):
        raise PgolfError(f"{path}: expected a JSON object, found {type(obj).__name__}")
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
