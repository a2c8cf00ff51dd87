"""SentencePiece BPE on the train documents, with the challenge's export settings."""

from __future__ import annotations

import argparse
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from pgolf.data.documents import read_documents
from pgolf.io import write_bytes

# data/download_hf_docs_and_tokenize.py in openai/parameter-golf.
CHALLENGE_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
    pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
)


class TokenizerError(ValueError):
    """A tokenizer that is unusable for BPB scoring."""


def pieces(text: str, max_bytes: int) -> Iterator[str]:
    """Cut text at whitespace into pieces of at most max_bytes UTF-8 bytes.

    SentencePiece silently skips any input line longer than max_sentence_length, and a State of the
    Union address is one 40 KB line: without this cut most of the corpus would never be seen.
    """
    buf, size = [], 0
    for word in re.findall(r"\S+\s*", text):
        n = len(word.encode())
        if n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        while n > max_bytes:  # a single huge "word": hard-cut it on character boundaries
            head = word.encode()[:max_bytes].decode(errors="ignore")
            yield head
            word = word[len(head):]
            n = len(word.encode())
        if size + n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(word)
        size += n
    if buf:
        yield "".join(buf)


def train(docs_path: str | Path, cfg: dict, out: str | Path) -> int:
    docs = read_documents(docs_path, "train")
    if cfg["train_docs"]:
        docs = docs[: cfg["train_docs"]]
    sentences = [p for d in docs for line in d.splitlines() for p in pieces(line, cfg["max_sentence_bytes"])]
    print(f"tokenizer: {len(docs)} train documents cut into {len(sentences)} pieces", flush=True)
    model = io.BytesIO()
    # One thread, no shuffling and no model_prefix (its temp path would be stored in the model) keep
    # the model byte-identical for the same documents.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=cfg["vocab_size"],
        max_sentence_length=cfg["max_sentence_bytes"], num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2, **CHALLENGE_SETTINGS,
    )
    sp = check(model.getvalue(), out)
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    write_bytes(Path(out).with_suffix(".vocab"), vocab.encode())
    write_bytes(out, model.getvalue())
    return len(sentences)


def check(model: bytes, name: str | Path) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor(model_proto=model)
    # Without "▁" as its own piece BPB is underestimated by about 20% (parameter-golf issue #897).
    if sp.piece_to_id("▁") == sp.unk_id():
        raise TokenizerError(f"{name}: '▁' is not a token of its own; BPB would be miscounted")
    print(f"tokenizer: {sp.get_piece_size()} pieces", flush=True)
    return sp


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf tokenizer", description=__doc__)
    ap.add_argument("--docs", type=Path, required=True)
    ap.add_argument("--cfg", required=True, help="the tokenizer config section as JSON")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        train(args.docs, json.loads(args.cfg), args.out)
    except (TokenizerError, FileNotFoundError) as e:
        raise SystemExit(f"pgolf tokenizer: {e}") from None
