"""CaseOps: the reversible case transform, its tokenizer, the per-token byte sidecar and BPB counted
against the original text's bytes."""

import hashlib
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch

from pgolf.config import ConfigError, validate
from pgolf.data import caseops, documents, shards, tokenizer
from pgolf.data.caseops import ALLCAPS, CAPNEXT, ESC, SP_SPACE, TITLE, CaseOpsError
from pgolf.data.documents import read_documents
from pgolf.eval.bpb import BPBMeter, ByteLUTs, ByteSidecar, build_byte_luts, byte_counts
from pgolf.eval.evaluate import measure, score, val_tokens, windows
from pgolf.eval.windows import Scores, score_windows
from pgolf.formats import tensorfile
from pgolf.formats.shards import ShardError, load_sidecar, load_split, open_dataset, read_manifest, write_shard
from pgolf.model.gpt import GPT
from pgolf.quant.compress import compress
from pgolf.quant.quantize import quantize

FIXTURES = Path(__file__).parent / "fixtures"
VOCAB = 400
HARD = [
    "The NASA Launch", "iPhone McDonald's a A I x", "HeLLo WoRlD ABCdef abcDEF", "ABC123DEF abc1Def O'Neil",
    "ß Straße STRASSE İstanbul ǅemal Ǆ ǆ ΣΑΣ Ａ ﬁ ①", "digits 0123456789 1e-5 3.14", "",
    f"literal operators {TITLE}{ALLCAPS}{CAPNEXT}{ESC} and {ESC}{ESC}{ESC}A",
    f"{SP_SPACE}x {SP_SPACE}{SP_SPACE} y{SP_SPACE}",
    "  leading spaces\n\n\ttabs\r\nand trailing  ", "\x00\x01 control \u2028 \u00a0 🙂 e\u0301 \ue000 \U000f0000",
]


@pytest.fixture(scope="module")
def caseops_dataset(tmp_path_factory):
    """Documents, a CaseOps tokenizer and shards with byte sidecars, built through the stages' CLIs."""
    root = tmp_path_factory.mktemp("caseops")
    cfg = validate({"data": {"source": "local", "paths": [str(FIXTURES / "corpus")], "val_fraction": 0.1,
                             "shard_tokens": 20000}, "tokenizer": {"vocab_size": VOCAB, "caseops": True}})
    docs, tok, ds = root / "docs.parquet", root / "tok.model", root / "dataset"
    documents.build(cfg["data"], None, docs)
    tokenizer.cli(["--docs", str(docs), "--cfg", json.dumps(cfg["tokenizer"]), "--out", str(tok)])
    shards.cli(["--docs", str(docs), "--tokenizer", str(tok), "--cfg", json.dumps({"shard_tokens": 20000}),
                "--out", str(ds), "--caseops"])
    return type("D", (), {"docs": docs, "tokenizer": tok, "dataset_dir": ds,
                          "sp": spm.SentencePieceProcessor(model_file=str(tok))})


def split_docs(tokens: np.ndarray, counts: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    starts = [*np.flatnonzero(tokens == shards.BOS_ID), len(tokens)]
    return [(tokens[a:b], counts[a:b]) for a, b in zip(starts[:-1], starts[1:], strict=True)]


# --- the transform ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text, encoded", [
    ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),
    ("iPhone A a", f"i{CAPNEXT}phone {TITLE}a a"),
    ("McDonald's", f"{TITLE}mc{CAPNEXT}donald's"),
    ("ÀB Straße", f"À{TITLE}b {TITLE}straße"),  # only ASCII letters change; a run of them is a word
    (f"x{TITLE}y", f"x{ESC}{TITLE}y"),
    (f"{SP_SPACE}", f"{ESC}{SP_SPACE}"),
])
def test_encode_follows_the_record(text, encoded):
    assert caseops.encode(text) == encoded


@pytest.mark.parametrize("text", HARD)
def test_decode_inverts_encode(text):
    assert caseops.decode(caseops.encode(text)) == text
    # what a SentencePiece decoder gives back: an escaped U+2581 as a space
    assert caseops.decode(caseops.encode(text).replace(ESC + SP_SPACE, ESC + " ")) == text


def test_decode_inverts_encode_on_random_strings():
    rng = random.Random(0)
    alphabet = "aAbBzZ 'ßİǅ1\n" + TITLE + ALLCAPS + CAPNEXT + ESC + SP_SPACE
    for _ in range(5000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 16)))
        assert caseops.decode(caseops.encode(s)) == s, repr(s)


@pytest.mark.parametrize("bad", [TITLE, "A", CAPNEXT + "a", f"a{TITLE}b", ESC + "a", ESC, f"{ALLCAPS}a{CAPNEXT}b",
                                 TITLE + " "])
def test_decode_refuses_what_encode_never_writes(bad):
    with pytest.raises(CaseOpsError, match="CaseOps text"):
        caseops.decode(bad)


def test_runs_of_esc_alternate():
    # ESC ESC ESC x: the 1st escapes the 2nd, the 3rd escapes x
    assert caseops.escaped(np.array([1, 1, 1, 0, 0, 1, 0], bool)).tolist() == [0, 1, 0, 1, 0, 0, 1]


# --- the tokenizer and the sidecar -----------------------------------------------------------------

def test_operators_are_pieces_of_their_own(caseops_dataset):
    sp = caseops_dataset.sp
    assert [sp.id_to_piece(i) for i in range(4, 8)] == [TITLE, ALLCAPS, CAPNEXT, ESC]
    assert sp.get_piece_size() == VOCAB
    m = read_manifest(caseops_dataset.dataset_dir)
    assert m["text_transform"] == caseops.NAME and all("byte_sidecar" in m["splits"][s] for s in ("train", "val"))


def test_a_plain_tokenizer_is_refused_for_caseops(tiny_dataset, tmp_path):
    with pytest.raises(CaseOpsError, match=f"{tiny_dataset.tokenizer}.*not trained with tokenizer.caseops"):
        shards.build(tiny_dataset.docs, tiny_dataset.tokenizer, {"shard_tokens": 20000}, tmp_path / "d", True)


@pytest.mark.parametrize("split", ["val", "train"])
def test_every_document_decodes_back_and_its_bytes_add_up(caseops_dataset, split):
    """Per document: the sidecar sums to the original UTF-8 length, and the tokens, decoded and
    inverted, are the original text."""
    ds, sp = caseops_dataset.dataset_dir, caseops_dataset.sp
    tokens, counts = load_split(ds, split), load_sidecar(ds, split)
    docs = read_documents(caseops_dataset.docs, split)
    per_doc = split_docs(tokens, counts)
    assert len(per_doc) == len(docs) > 0
    for text, (ids, nbytes) in zip(docs, per_doc, strict=True):
        assert nbytes[0] == 0  # BOS
        assert int(nbytes.sum()) == len(text.encode())
        assert caseops.decode(sp.decode(ids[1:].tolist())) == text
    assert int(counts.sum()) == sum(len(d.encode()) for d in docs) == read_manifest(ds)["splits"][split]["bytes"]


@pytest.mark.parametrize("text", HARD)
def test_hard_strings_through_the_tokenizer(caseops_dataset, text):
    sp = caseops_dataset.sp
    ids = np.array(sp.encode(caseops.encode(text)), dtype=np.int64)
    counts = caseops.original_bytes(ids, caseops.byte_table(sp))
    assert int(counts.sum()) == len(text.encode())
    assert caseops.decode(sp.decode(ids.tolist())) == text
    # each token's count, against the original text that the tokens up to it decode to, wherever that
    # prefix is whole (not inside a byte-fallback character or before an operator's letter)
    checked = 0
    for k in range(1, len(ids) + 1):
        prefix = sp.decode(ids[:k].tolist())
        try:
            original = caseops.decode(prefix)
        except CaseOpsError:
            continue
        if "\ufffd" not in prefix:
            assert int(counts[:k].sum()) == len(original.encode()), (k, prefix)
            checked += 1
    assert checked or not ids.size


def test_escaped_literals_count_their_own_bytes(caseops_dataset):
    sp = caseops_dataset.sp
    table = caseops.byte_table(sp)
    ids = np.array(sp.encode(caseops.encode(f"{TITLE}{SP_SPACE}A")), dtype=np.int64)
    counts = caseops.original_bytes(ids, table)
    assert sp.id_to_piece(int(ids[0])) == ESC and counts[0] == 0 and counts[1] == 3  # ESC, the literal TITLE
    assert counts.tolist()[-2:] == [0, 1]  # TITLE before 'a', 'a'
    assert int(counts.sum()) == 3 + 3 + 1


# --- BPB ---------------------------------------------------------------------------------------------

def caseops_model(vocab: int) -> GPT:
    torch.manual_seed(0)
    cfg = validate({"model": {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1}})["model"]
    model = GPT(vocab, cfg)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


def test_bpb_counts_the_original_bytes_of_the_val_text(caseops_dataset):
    """Every val target scored once: BPB == total nats / (ln 2 * UTF-8 bytes of the original val text)."""
    ds, seq = caseops_dataset.dataset_dir, 64
    tokens = val_tokens(ds, 0, seq, VOCAB)
    counts = byte_counts(ds, caseops_dataset.tokenizer, VOCAB, len(tokens))
    assert isinstance(counts, ByteSidecar)
    scores = Scores()
    model = caseops_model(VOCAB)
    result = score(model, tokens, windows(len(tokens), seq, seq), seq, 8, BPBMeter(counts))
    score_windows(model, tokens, windows(len(tokens), seq, seq), seq, 8, BPBMeter(counts), torch.device("cpu"),
                  scores=scores)
    nats = sum(scores.by_target().values())
    original = sum(len(d.encode()) for d in read_documents(caseops_dataset.docs, "val"))
    assert len(scores.by_target()) == len(tokens) - 1 == result["tokens"]
    assert result["bytes"] == original
    assert math.isclose(result["val_bpb"], nats / (math.log(2) * original), rel_tol=1e-9)
    # the tokenizer's tables would count each operator as 3 bytes and the letters' case for nothing
    luts = build_byte_luts(caseops_dataset.tokenizer, VOCAB)
    lut_result = score(model, tokens, windows(len(tokens), seq, seq), seq, 8, BPBMeter(luts))
    assert lut_result["bytes"] > original


def test_evaluate_counts_the_sidecar(caseops_dataset, tmp_path):
    """`pgolf evaluate` on a CaseOps dataset: the sliding window scores every val target against the
    original bytes; a cut to max_tokens takes the sidecar's first bytes with the first tokens."""
    model = caseops_model(VOCAB)
    tensorfile.save(tmp_path / "ema.pgt", model.state_dict(), {**model.meta(), "step": 0, "seed": 0})
    int8 = {g: 8 for g in ("embed", "attn", "mlp", "other")}
    quant = {"method": "rtn", "clip": "quantile", "bits": int8, "clip_quantile": 1.0, "min_numel": 256}
    quantize(tmp_path / "ema.pgt", validate({"quant": quant})["quant"], tmp_path / "q.pgt")
    compress(tmp_path / "q.pgt", {**validate({})["compress"], "codec": "zstd", "level": 3}, tmp_path / "a.pgz")
    paths = (caseops_dataset.dataset_dir, caseops_dataset.tokenizer, tmp_path / "ema.pgt", tmp_path / "a.pgz", 0, 1,
             torch.device("cpu"))
    sidecar = load_sidecar(caseops_dataset.dataset_dir, "val")
    for max_tokens, expected in ((0, int(sidecar.sum())), (700, int(sidecar[1:701].sum()))):
        cfg = validate({"eval": {"seq_len": 32, "stride": 16, "batch_seqs": 8, "max_tokens": max_tokens}})["eval"]
        r = measure(cfg, *paths)
        assert r["sliding"]["bytes"] == expected
    assert expected < sum(len(d.encode()) for d in read_documents(caseops_dataset.docs, "val")) == sidecar.sum()


def test_a_plain_dataset_keeps_the_tables(tiny_dataset):
    tokens = val_tokens(tiny_dataset.dataset_dir, 0, 32)
    counts = byte_counts(tiny_dataset.dataset_dir, tiny_dataset.tokenizer, tiny_dataset.vocab_size, len(tokens))
    assert isinstance(counts, ByteLUTs) and load_sidecar(tiny_dataset.dataset_dir, "val") is None


def test_a_sidecar_needs_positions():
    with pytest.raises(Exception, match="by stream position"):
        BPBMeter(ByteSidecar(torch.ones(4, dtype=torch.int64))).update(torch.ones(2), torch.ones(2), torch.ones(2))


# --- the manifest's contract -------------------------------------------------------------------------

@pytest.fixture
def copy_of(caseops_dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(caseops_dataset.dataset_dir, ds)
    return ds


def test_a_damaged_sidecar_is_refused(copy_of):
    side = copy_of / "fineweb_val_bytes_000000.bin"
    data = bytearray(side.read_bytes())
    data[-1] ^= 1
    side.write_bytes(bytes(data))
    open_dataset(copy_of, VOCAB, "test")  # same length: only its sha256 tells
    with pytest.raises(ShardError, match=f"{side}: sha256 .*damaged"):
        load_sidecar(copy_of, "val")


def test_a_sidecar_of_another_length_is_refused(copy_of):
    side = copy_of / "fineweb_val_bytes_000000.bin"
    values = np.fromfile(side, dtype="<u2", offset=1024)
    write_shard(side, values[:-1])
    with pytest.raises(ShardError, match=f"{side}: a byte sidecar of {len(values) - 1} tokens"):
        open_dataset(copy_of, VOCAB, "test")


def test_a_missing_sidecar_is_refused(copy_of):
    (copy_of / "fineweb_val_bytes_000000.bin").unlink()
    with pytest.raises(ShardError, match="lists val byte sidecars"):
        open_dataset(copy_of, VOCAB, "test")


def test_a_rehashed_sidecar_must_still_add_up(copy_of):
    side = copy_of / "fineweb_val_bytes_000000.bin"
    values = np.fromfile(side, dtype="<u2", offset=1024).copy()
    values[-1] += 1
    write_shard(side, values)
    m = json.loads((copy_of / "manifest.json").read_text())
    m["splits"]["val"]["byte_sidecar"]["sha256"][0] = hashlib.sha256(side.read_bytes()).hexdigest()
    (copy_of / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match="val byte sidecars add up to"):
        load_sidecar(copy_of, "val")


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["splits"]["val"].pop("byte_sidecar"), "text_transform caseops_v1 needs splits.val.byte_sidecar"),
    (lambda m: m.update(text_transform="upper"), "text_transform must be one of"),
    (lambda m: m["splits"]["val"]["byte_sidecar"]["sha256"].__setitem__(0, "x"),
     r"splits\.val\.byte_sidecar\.sha256 must"),
    (lambda m: m["splits"]["val"]["byte_sidecar"].update(shards=["a.bin"]),
     r"splits\.val\.byte_sidecar\.shards must be"),
])
def test_a_manifest_with_a_bad_sidecar_entry_is_refused(copy_of, edit, message):
    m = json.loads((copy_of / "manifest.json").read_text())
    edit(m)
    (copy_of / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ShardError, match=f"manifest.json: {message}"):
        read_manifest(copy_of)


def test_caseops_is_off_by_default_and_refused_with_a_plain_fineweb_variant():
    assert validate({})["tokenizer"]["caseops"] is False
    with pytest.raises(ConfigError, match="tokenizer.caseops"):
        validate({"data": {"source": "fineweb", "hub": {"variant": "sp1024"}}, "tokenizer": {"caseops": True}})
