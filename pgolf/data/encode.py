"""Tokenize documents into the challenge's shards: BOS before every document, no EOS."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pgolf.data import tokenizer as sp_model
from pgolf.data.documents import read_documents
from pgolf.data.shards import shard_name, write_shard
from pgolf.io import atomic_dir, write_json

BOS_ID = 1
BATCH_DOCS = 64


def encode_docs(sp: spm.SentencePieceProcessor, docs: list[str]) -> list[np.ndarray]:
    out = []
    for i in range(0, len(docs), BATCH_DOCS):
        for ids in sp.encode(docs[i : i + BATCH_DOCS], out_type=int):
            out.append(np.array([BOS_ID, *ids], dtype=np.uint16))
        print(f"  encoded {min(i + BATCH_DOCS, len(docs))}/{len(docs)} documents", flush=True)
    return out


def write_split(out_dir: Path, split: str, encoded: list[np.ndarray], shard_tokens: int) -> list[str]:
    """Concatenate the documents and cut the stream into shards of shard_tokens tokens."""
    stream = np.concatenate(encoded) if encoded else np.zeros(0, np.uint16)
    names = []
    for i, start in enumerate(range(0, max(len(stream), 1), shard_tokens)):
        names.append(shard_name(split, i))
        write_shard(out_dir / names[-1], stream[start : start + shard_tokens])
    return names


def build(docs_path: str | Path, tokenizer: str | Path, cfg: dict, out: str | Path) -> dict:
    sp = sp_model.load(tokenizer)
    manifest = {"vocab_size": sp.get_piece_size(), "tokenizer": Path(tokenizer).name,
                "tokenizer_sha256": hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest(), "splits": {}}
    with atomic_dir(out) as staging:
        for split in ("val", "train"):
            docs = read_documents(docs_path, split)
            print(f"{split}: encoding {len(docs)} documents", flush=True)
            encoded = encode_docs(sp, docs)
            manifest["splits"][split] = {
                "documents": len(docs), "tokens": int(sum(len(e) for e in encoded)),
                "bytes": sum(len(d.encode()) for d in docs),
                "shards": write_split(staging, split, encoded, cfg["shard_tokens"]),
            }
        write_json(staging / "manifest.json", manifest)
    print(json.dumps({s: {k: v for k, v in m.items() if k != "shards"} for s, m in manifest["splits"].items()}))
    return manifest


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf shards", description=__doc__)
    ap.add_argument("--docs", type=Path, required=True)
    ap.add_argument("--tokenizer", type=Path, required=True)
    ap.add_argument("--cfg", required=True, help="the data config section as JSON")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    build(args.docs, args.tokenizer, json.loads(args.cfg), args.out)
