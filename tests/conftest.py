from pathlib import Path
from types import SimpleNamespace

import pytest

from pgolf.config import validate
from pgolf.data import documents, encode, tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> SimpleNamespace:
    """Documents, a 320-token tokenizer and shards built from the fixture corpus by the real stages."""
    root = tmp_path_factory.mktemp("tiny")
    cfg = validate({"data": {"source": "local", "paths": [str(FIXTURES / "corpus")], "val_fraction": 0.1,
                             "shard_tokens": 20000}, "tokenizer": {"vocab_size": 320}})
    docs, tok, ds = root / "docs.parquet", root / "tok.model", root / "dataset"
    documents.build(cfg["data"], None, docs)
    tokenizer.train(docs, cfg["tokenizer"], tok)
    encode.build(docs, tok, cfg["data"], ds)
    return SimpleNamespace(docs=docs, tokenizer=tok, dataset_dir=ds, vocab_size=320, config=cfg)
