"""SentencePiece BPE on the train documents, with the challenge's export settings."""

from __future__ import annotations

import argparse
import io
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import sentencepiece as spm

from pgolf.data import caseops
from pgolf.data.documents import read_documents
from pgolf.errors import PgolfError
from pgolf.formats.io import write_bytes

# data/download_hf_docs_and_tokenize.py in openai/parameter-golf.
CHALLENGE_SETTINGS = dict(
    model_type="bpe", character_coverage=0.999, byte_fallback=True, split_digits=True,
    normalization_rule_name="nmt_nfkc", add_dummy_prefix=False,
    pad_id=0, bos_id=1, eos_id=2, unk_id=3, hard_vocab_limit=False,
)
# CaseOps (tokenizer.caseops): the operators are pieces of their own (ids 4-7, as in the record's
# tokenizer), and the text reaches the model as it is, without NFKC or whitespace folding, so its
# tokens decode to the original exactly and every byte BPB counts is one the model predicts.
CASEOPS_SETTINGS = {**CHALLENGE_SETTINGS, "normalization_rule_name": "identity", "remove_extra_whitespaces": False,
                    "user_defined_symbols": list(caseops.OPERATORS)}


def settings(cfg: dict) -> dict:
    return CASEOPS_SETTINGS if cfg["caseops"] else CHALLENGE_SETTINGS


class TokenizerError(PgolfError):
    """A tokenizer that is unusable for BPB scoring."""


# pad, bos, eos, unk, then byte_fallback's 256 <0xNN> pieces: in every vocabulary before any character.
META_PIECES = 4 + 256


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


def vocab_needed(sentences: list[str], spec: dict = CHALLENGE_SETTINGS) -> int:
    """The smallest vocab_size SentencePiece accepts for these sentences: the meta, user-defined and
    byte pieces plus every character it must keep, the most frequent ones until character_coverage
    is reached, counted after its own normalization (trainer_interface.cc, LoadSentences)."""
    norm = spm.SentencePieceNormalizer(rule_name=spec["normalization_rule_name"],
                                       add_dummy_prefix=spec["add_dummy_prefix"], escape_whitespaces=True,
                                       remove_extra_whitespaces=spec.get("remove_extra_whitespaces", True))
    counts = Counter()
    for s in sentences:
        counts.update(norm.normalize(s))
    for symbol in spec.get("user_defined_symbols", []):
        counts.pop(symbol, None)  # pieces already
    total, covered, chars = sum(counts.values()), 0, 0
    for n in sorted(counts.values(), reverse=True):
        if covered >= spec["character_coverage"] * total:
            break
        covered, chars = covered + n, chars + 1
    return META_PIECES + len(spec.get("user_defined_symbols", [])) + chars


def sentences_of(docs: list[str], cfg: dict) -> list[str]:
    """Training sentences: each line cut into pieces; with CaseOps, the transformed document cut
    whole, so that newlines, which such a tokenizer keeps, are learned too."""
    if cfg["caseops"]:
        return [p for d in docs for p in pieces(caseops.encode(d), cfg["max_sentence_bytes"])]
    return [p for d in docs for line in d.splitlines() for p in pieces(line, cfg["max_sentence_bytes"])]


def train(docs_path: str | Path, cfg: dict, out: str | Path) -> int:
    docs = read_documents(docs_path, "train")
    if cfg["train_docs"]:
        docs = docs[: cfg["train_docs"]]
    sentences, spec = sentences_of(docs, cfg), settings(cfg)
    print(f"tokenizer: {len(docs)} train documents cut into {len(sentences)} pieces"
          f"{' (CaseOps)' if cfg['caseops'] else ''}", flush=True)
    needed, fixed = vocab_needed(sentences, spec), META_PIECES + len(spec.get("user_defined_symbols", []))
    if cfg["vocab_size"] < needed:  # SentencePiece would refuse it too, but only deep in its own error text
        raise TokenizerError(f"tokenizer.vocab_size: {cfg['vocab_size']} is too small for this corpus, which needs "
                             f"at least {needed} ({fixed} meta, operator and byte pieces + {needed - fixed} "
                             "characters); raise tokenizer.vocab_size")
    model = io.BytesIO()
    # One thread, no shuffling and no model_prefix (its temp path would be stored in the model) keep
    # the model byte-identical for the same documents.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=cfg["vocab_size"],
        max_sentence_length=cfg["max_sentence_bytes"], num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, minloglevel=2, **spec,
    )
    sp = check(model.getvalue(), out)
    if cfg["caseops"]:
        caseops.byte_table(sp, str(out))  # the operators must have come out as pieces of their own
    if sp.get_piece_size() != cfg["vocab_size"]:
        # hard_vocab_limit=False lets SentencePiece stop short on a small corpus; every later stage
        # takes the model's vocabulary to be the tokenizer's (the dataset manifest checks it)
        raise TokenizerError(f"tokenizer.vocab_size: this corpus yields only {sp.get_piece_size()} pieces, "
                             f"{cfg['vocab_size']} asked; lower tokenizer.vocab_size to {sp.get_piece_size()} "
                             "or give the tokenizer more text")
    vocab = "".join(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size()))
    write_bytes(Path(out).with_suffix(".vocab"), vocab.encode())
    write_bytes(out, model.getvalue())
    return len(sentences)


def load(path: str | Path) -> spm.SentencePieceProcessor:
    """A SentencePiece model file; SentencePiece's own RuntimeError would not name the stage's problem."""
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: not a readable SentencePiece model ({e})") from None


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
    train(args.docs, json.loads(args.cfg), args.out)
