"""Raw text to a parquet of documents (doc_id, text, split) with a deterministic document-level split."""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pgolf.data.fetch_corpus import verify_raw
from pgolf.errors import PgolfError
from pgolf.formats.io import read_parquet, write_parquet

if TYPE_CHECKING:
    import pyarrow as pa

SUFFIXES = (".txt", ".jsonl", ".parquet")


class DocumentError(PgolfError):
    """Input documents that cannot be read."""


def expand_paths(paths: list[str]) -> list[tuple[Path, Path]]:
    """(file, base) pairs for folders (searched recursively) and globs; base makes doc ids relative.
    An entry that yields no file is refused: a listed folder without one document in it is a typo
    or a wrong mount, not an empty corpus."""
    found = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = [(f, path) for f in sorted(path.rglob("*")) if f.suffix in SUFFIXES and f.is_file()]
            if not files:
                raise DocumentError(f"data.paths: folder {p!r} holds no {', '.join(SUFFIXES)} file")
            found += files
        elif path.is_file():
            found.append((path, path.parent))
        else:
            matches = sorted(Path(m) for m in glob.glob(p, recursive=True))
            files = [(m, m.parent) for m in matches if m.is_file()]
            if not files and matches:
                raise DocumentError(f"data.paths: {p!r} matches no regular file, only {len(matches)} folder(s) or "
                                    "special file(s) (list a folder itself to read its files)")
            if not files:
                raise DocumentError(f"data.paths: {p!r} matches no file or folder")
            found += files
    for f, _ in found:
        if f.suffix not in SUFFIXES:
            raise DocumentError(f"{f}: unknown extension {f.suffix!r} (expected {', '.join(SUFFIXES)})")
    return found


def corpus_files(paths: list[str]) -> list[str]:
    """The files documents reads for `data.paths`: the documents rule's inputs, so that an edited,
    added or removed corpus file reruns it and what follows."""
    return list(dict.fromkeys(str(f) for f, _ in expand_paths(paths)))  # a file listed twice is one input


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DocumentError(f"{path}: not UTF-8 text ({e})") from None


def checked_text(text: object, where: str) -> str:
    """A document's text as the corpus holds it, refused unless it is a string that UTF-8 can hold:
    a number, a null or a lone surrogate (JSON's "\\ud800") would fail later with a traceback."""
    if not isinstance(text, str):
        kind = "null" if text is None else type(text).__name__
        raise DocumentError(f"{where}: 'text' is {kind}, not a string")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DocumentError(f"{where}: 'text' holds {text[e.start]!r} at character {e.start}, a lone surrogate "
                            "that UTF-8 cannot encode") from None
    return text


def read_jsonl(path: Path, doc_id: str) -> Iterator[tuple[str, str]]:
    for i, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError, IndexError, RecursionError) as e:  # [[[...: too deep
            raise DocumentError(f"{path}:{i}: expected a JSON object with a 'text' field ({e})") from None
        yield f"{doc_id}:{i}", checked_text(text, f"{path}:{i}")


def text_column(path: Path) -> pa.ChunkedArray:
    """The 'text' column of a parquet file from anywhere (not necessarily written by pgolf): any
    damage the format can detect, a missing column or one not of strings is refused naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        if "text" not in schema.names:
            raise DocumentError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})")
        kind = schema.field("text").type
        if not _is_text(kind):
            raise DocumentError(f"{path}: 'text' column is {kind}, not a string column")
        return pq.read_table(path, columns=["text"], page_checksum_verification=True).column("text")
    except (pa.ArrowException, OSError) as e:  # arrow's errors; OSError is also how it reports a bad file
        if isinstance(e, FileNotFoundError | PermissionError):
            raise
        raise DocumentError(f"{path}: damaged or not a parquet file ({e})") from None


def _is_text(kind: pa.DataType) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(kind):  # pandas' categorical strings
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)


def read_parquet_docs(path: Path, doc_id: str) -> Iterator[tuple[str, str]]:
    column = text_column(path)
    try:
        texts = column.to_pylist()
    except UnicodeDecodeError:  # arrow keeps strings as bytes: find the row that is not UTF-8
        texts = []
        for i, value in enumerate(column):
            try:
                texts.append(value.as_py())
            except UnicodeDecodeError as e:
                raise DocumentError(f"{path}: row {i} (counting from 0): 'text' is not UTF-8 ({e})") from None
    for i, text in enumerate(texts):
        yield f"{doc_id}:{i}", checked_text(text, f"{path}: row {i} (counting from 0)")


def read_file(path: Path, doc_id: str) -> Iterator[tuple[str, str]]:
    if path.suffix == ".txt":
        yield doc_id, read_text(path)
    elif path.suffix == ".jsonl":
        yield from read_jsonl(path, doc_id)
    else:
        yield from read_parquet_docs(path, doc_id)


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


def fetched(raw: Path) -> None:
    """The fetched corpus as the fetch wrote it, checked before a byte of it is read: each file its
    manifest lists, whole and unchanged, and no document file it does not list."""
    listed = verify_raw(raw)
    for f, _ in expand_paths([str(raw)]):
        if f.relative_to(raw).as_posix() not in listed:
            raise DocumentError(f"{f}: not written by the fetch (not in {raw / 'manifest.json'}); remove it, "
                                "or put your own documents in data.paths with data.source: local")


def build(cfg: dict, raw: str | None, out: str | Path) -> dict:
    import pyarrow as pa  # imported here: the Snakefile imports this module to list the corpus

    paths = [raw] if cfg["source"] == "embedded" else cfg["paths"]
    if not all(paths):
        raise DocumentError("data.source embedded needs --raw (the fetched corpus folder)")
    if cfg["source"] == "embedded":
        fetched(Path(raw))
    docs, empty = collect(paths)
    ids = [d for d, _ in docs]
    splits = assign_splits(ids, cfg["split_seed"], cfg["val_fraction"])
    if len(ids) < 2:  # evaluation would find no val token, after a whole training
        raise DocumentError(f"{', '.join(map(str, paths))}: {len(ids)} non-empty document; train and val need "
                            "at least one each")
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
