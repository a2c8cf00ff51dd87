"""Tokenize documents into the challenge's shards: BOS before every document, no EOS. With CaseOps,
the tokenizer reads each document's CaseOps form, and a byte sidecar beside each shard gives every
token's bytes of the original text (BOS: 0); each document is checked to decode back to itself and
its sidecar to add up to its UTF-8 length before anything is written."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf.data import caseops
from pgolf.data import tokenizer as sp_model
from pgolf.data.documents import read_documents
from pgolf.formats.shards import shard_name, sidecar_name, write_shard
from pgolf.errors import PgolfError
from pgolf.formats.io import atomic_dir, write_json

BOS_ID = 1
BATCH_DOCS = 64


def encode_docs(sp: spm.SentencePieceProcessor, docs: list[str]) -> list[np.ndarray]:
    out = []
    for i in range(0, len(docs), BATCH_DOCS):
        for ids in sp.encode(docs[i : i + BATCH_DOCS], out_type=int):
            out.append(np.array([BOS_ID, *ids], dtype=np.uint16))
        print(f"  encoded {min(i + BATCH_DOCS, len(docs))}/{len(docs)} documents", flush=True)
    return out


def caseops_sidecar(sp: spm.SentencePieceProcessor, table: caseops.ByteTable, docs: list[str],
                    encoded: list[np.ndarray], where: str) -> list[np.ndarray]:
    """Each document's per-token original bytes, once its tokens are known to decode back to it."""
    out = []
    for i, (doc, ids) in enumerate(zip(docs, encoded, strict=True)):
        counts = caseops.original_bytes(ids, table)
        if caseops.decode(sp.decode(ids[1:].tolist())) != doc:
            raise PgolfError(f"{where}: document {i} does not decode back to itself through the tokenizer "
                             "and CaseOps; its bytes cannot be counted")
        if int(counts.sum()) != len(doc.encode()):
            raise PgolfError(f"{where}: document {i}'s tokens account for {int(counts.sum())} bytes, "
                             f"its text has {len(doc.encode())}")
        out.append(counts)
    return out


def write_split(out_dir: Path, split: str, encoded: list[np.ndarray], shard_tokens: int,
                name=shard_name) -> tuple[list[str], list[str]]:
    """Concatenate the documents and cut the stream into shards of shard_tokens tokens: their names
    and the sha256 of each, taken as it is written."""
    stream = np.concatenate(encoded) if encoded else np.zeros(0, np.uint16)
    names, digests = [], []
    for i, start in enumerate(range(0, max(len(stream), 1), shard_tokens)):
        names.append(name(split, i))
        digests.append(write_shard(out_dir / names[-1], stream[start : start + shard_tokens]))
    return names, digests


def build(docs_path: str | Path, tokenizer: str | Path, cfg: dict, out: str | Path, caseops_on: bool = False) -> dict:
    sp = sp_model.load(tokenizer)
    table = caseops.byte_table(sp, str(tokenizer)) if caseops_on else None
    manifest = {"vocab_size": sp.get_piece_size(), "tokenizer": Path(tokenizer).name,
                "tokenizer_sha256": hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest(), "splits": {}}
    if caseops_on:
        manifest["text_transform"] = caseops.NAME
    with atomic_dir(out) as staging:
        for split in ("val", "train"):
            docs = read_documents(docs_path, split)
            print(f"{split}: encoding {len(docs)} documents{' (CaseOps)' if caseops_on else ''}", flush=True)
            encoded = encode_docs(sp, [caseops.encode(d) for d in docs] if caseops_on else docs)
            names, digests = write_split(staging, split, encoded, cfg["shard_tokens"])
            entry = manifest["splits"][split] = {
                "documents": len(docs), "tokens": int(sum(len(e) for e in encoded)),
                "bytes": sum(len(d.encode()) for d in docs), "shards": names, "sha256": digests,
            }
            if table is not None:
                counts = caseops_sidecar(sp, table, docs, encoded, f"{docs_path} ({split})")
                names, digests = write_split(staging, split, counts, cfg["shard_tokens"],
                                             lambda s, i: sidecar_name(s, shard_name(s, i)))
                entry["byte_sidecar"] = {"shards": names, "sha256": digests}
        write_json(staging / "manifest.json", manifest)
    print(json.dumps({s: {k: v for k, v in m.items() if k not in ("shards", "sha256")}
                      for s, m in manifest["splits"].items()}))
    return manifest


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf shards", description=__doc__)
    ap.add_argument("--docs", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--cfg", required=True, help="the data config section as JSON")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--caseops", action="store_true", help="the tokenizer reads CaseOps text (tokenizer.caseops)")
    args = ap.parse_args(argv)
    build(args.docs, args.tokenizer, json.loads(args.cfg), args.out, args.caseops)
