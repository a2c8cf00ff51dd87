"""Raw text to a parquet of documents (doc_id, text, split) with a deterministic document-level split."""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pgolf.errors import PgolfError
from pgolf.formats.io import read_parquet, write_parquet

SUFFIXES = (".txt", ".jsonl", ".parquet")


class DocumentError(PgolfError):
    """Input documents that cannot be read."""


def expand_paths(paths: list[str]) -> list[tuple[Path, Path]]:
    """(file, base) pairs for folders (searched recursively) and globs; base makes doc ids relative."""
    found = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found += [(f, path) for f in sorted(path.rglob("*")) if f.suffix in SUFFIXES and f.is_file()]
        elif path.is_file():
            found.append((path, path.parent))
        else:
            matches = sorted(Path(m) for m in glob.glob(p, recursive=True))
            if not matches:
                raise DocumentError(f"data.paths: {p!r} matches no file or folder")
            found += [(m, m.parent) for m in matches if m.is_file()]
    for f, _ in found:
        if f.suffix not in SUFFIXES:
            raise DocumentError(f"{f}: unknown extension {f.suffix!r} (expected {', '.join(SUFFIXES)})")
    return found


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path}: not UTF-8 text ({e})") from None


def read_file(path: Path, doc_id: str) -> Iterator[tuple[str, str]]:
    if path.suffix == ".txt":
        yield doc_id, read_text(path)
    elif path.suffix == ".jsonl":
        for i, line in enumerate(read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DocumentError(f"{path}:{i}: expected a JSON object with a 'text' field ({e})") from None
            yield f"{doc_id}:{i}", text
    else:
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise DocumentError(f"{path}: no 'text' column (columns: {', '.join(table.column_names)})")
        for i, text in enumerate(table.column("text").to_pylist()):
            yield f"{doc_id}:{i}", text or ""


def split_of(doc_id: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the document id and the split seed."""
    h = hashlib.sha256(f"{seed}:{doc_id}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64


def collect(paths: list[str]) -> tuple[list[tuple[str, str]], int]:
    docs, origin, empty = {}, {}, 0
    for f, base in expand_paths(paths):
        for doc_id, text in read_file(f, f.relative_to(base).as_posix()):
            # Two data.paths entries holding the same relative name would silently overwrite each other.
            if origin.setdefault(doc_id, f) != f:
                raise DocumentError(f"{f} and {origin[doc_id]} both give document id {doc_id!r}; "
                                    "list their common parent folder in data.paths instead")
            if not text.strip():
                empty += 1
                continue
            docs[doc_id] = text
    if not docs:
        raise DocumentError(f"no documents found in {', '.join(paths)}")
    return sorted(docs.items()), empty


def assign_splits(doc_ids: list[str], seed: int, val_fraction: float) -> list[str]:
    u = [split_of(d, seed) for d in doc_ids]
    splits = ["val" if x < val_fraction else "train" for x in u]
    if len(doc_ids) >= 2 and "val" not in splits:  # tiny corpora: the lowest draw goes to val
        splits[u.index(min(u))] = "val"
    if len(doc_ids) >= 2 and "train" not in splits:
        splits[u.index(max(u))] = "train"
    return splits


def build(cfg: dict, raw: str | None, out: str | Path) -> dict:
    paths = [raw] if cfg["source"] == "embedded" else cfg["paths"]
    if not all(paths):
        raise DocumentError("data.source embedded needs --raw (the fetched corpus folder)")
    docs, empty = collect(paths)
    ids = [d for d, _ in docs]
    splits = assign_splits(ids, cfg["split_seed"], cfg["val_fraction"])
    table = pa.table({"doc_id": ids, "text": [t for _, t in docs], "split": splits})
    write_parquet(out, table)
    stats = {"documents": len(ids), "val": splits.count("val"), "train": splits.count("train"), "empty_skipped": empty}
    print(f"{out}: {stats}", flush=True)
    return stats


def read_documents(path: str | Path, split: str | None = None) -> list[str]:
    table = read_parquet(path, ["text", "split"])
    rows = zip(table.column("text").to_pylist(), table.column("split").to_pylist(), strict=True)
    return [t for t, s in rows if split is None or s == split]


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf documents", description=__doc__)
    ap.add_argument("--cfg", required=True, help="the data config section as JSON")
    ap.add_argument("--raw", default="", help="fetched corpus folder (data.source embedded)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    build(json.loads(args.cfg), args.raw or None, args.out)
