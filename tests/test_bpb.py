import math

import numpy as np
import sentencepiece as spm
import torch

from pgolf.data.documents import read_documents
from pgolf.eval.bpb import BPBMeter, build_byte_luts, target_bytes
from pgolf.formats.shards import load_split


def split_docs(tokens: list[int], bos: int = 1) -> list[list[int]]:
    docs = []
    for t in tokens:
        if t == bos:
            docs.append([])
        else:
            docs[-1].append(t)
    return docs


def test_val_bytes_equal_the_decoded_text(tiny_dataset):
    """Bytes counted over the val shard == UTF-8 length of the val text as the tokenizer decodes it."""
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dataset.tokenizer))
    tokens = torch.from_numpy(load_split(tiny_dataset.dataset_dir, "val").astype(np.int64))
    luts = build_byte_luts(tiny_dataset.tokenizer, tiny_dataset.vocab_size)
    counted = int(target_bytes(luts, tokens[:-1], tokens[1:]).sum())
    decoded = sum(len(sp.decode(doc).encode("utf-8")) for doc in split_docs(tokens.tolist()))
    assert counted == decoded
    # NFKC normalization may change a few characters, never many: the count tracks the raw text too.
    raw = sum(len(t.encode()) for t in read_documents(tiny_dataset.docs, "val"))
    assert abs(counted - raw) / raw < 0.01


def test_byte_fallback_and_specials(tiny_dataset):
    sp = spm.SentencePieceProcessor(model_file=str(tiny_dataset.tokenizer))
    luts = build_byte_luts(tiny_dataset.tokenizer, 400)
    assert luts.base_bytes.shape == (400,) and bool(luts.is_boundary[sp.get_piece_size():].all())
    for t in (0, 1, 2, 3):  # pad, bos, eos, unk count nothing and are boundaries
        assert luts.base_bytes[t] == 0 and luts.is_boundary[t]
    byte_ids = [t for t in range(sp.get_piece_size()) if sp.is_byte(t)]
    assert byte_ids and all(luts.base_bytes[t] == 1 for t in byte_ids)
    space = sp.piece_to_id("▁")
    assert luts.has_leading_space[space] and luts.base_bytes[space] == 0
    # after BOS the leading space is not a byte of the text; after a normal token it is
    assert target_bytes(luts, torch.tensor([1, 100]), torch.tensor([space, space])).tolist() == [0, 1]


def test_meter_matches_hand_computation(tiny_dataset):
    luts = build_byte_luts(tiny_dataset.tokenizer, tiny_dataset.vocab_size)
    prev, tgt = torch.tensor([[5, 40, 41]]), torch.tensor([[40, 41, 42]])
    losses = torch.tensor([[1.0, 2.0, 3.0]])
    meter = BPBMeter(luts)
    meter.update(losses, prev, tgt)
    meter.update(losses[:, :1], prev[:, :1], tgt[:, :1])
    nbytes = int(target_bytes(luts, prev, tgt).sum() + target_bytes(luts, prev[:, :1], tgt[:, :1]).sum())
    r = meter.result()
    assert r["tokens"] == 4 and r["bytes"] == nbytes
    assert math.isclose(r["val_loss"], 7.0 / 4)
    assert math.isclose(r["val_bpb"], 7.0 / math.log(2) / nbytes)
