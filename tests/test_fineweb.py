"""FineWeb from the Hub, for real: huggingface_hub against a local server that answers like the Hub."""

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from pgolf.config import validate
from pgolf.data.fetch_fineweb import fetch
from pgolf.formats.shards import load_shard, write_shard
from pgolf.train.loader import DistributedLoader

REPO, ROOT = "willdepueoai/parameter-golf", "datasets"
COMMIT = "a" * 40


class Hub(BaseHTTPRequestHandler):
    """GET/HEAD /datasets/<owner>/<name>/resolve/<revision>/<path>, with the Hub's headers and errors.
    The first GET of a file in `server.cut` sends half of it and drops the connection."""

    def _target(self) -> tuple[Path | None, str | None]:
        prefix = f"/datasets/{REPO}/resolve/"
        if not self.path.startswith("/datasets/"):
            return None, "RepoNotFound"
        if not self.path.startswith(prefix):
            return None, "RepoNotFound"
        revision, _, rel = self.path[len(prefix):].partition("/")
        if revision not in ("main", COMMIT):
            return None, "RevisionNotFound"
        f = self.server.root / rel
        return (f, None) if f.is_file() else (None, "EntryNotFound")

    def _headers(self, f: Path, start: int = 0) -> None:
        data = f.read_bytes()
        self.send_response(206 if start else 200)
        self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()

    def _missing(self, code: str) -> bool:
        self.send_response(401 if code == "RepoNotFound" else 404)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return True

    def do_HEAD(self) -> None:  # noqa: N802
        f, err = self._target()
        if err:
            self._missing(err)
            return
        self._headers(f)

    def do_GET(self) -> None:  # noqa: N802
        f, err = self._target()
        if err:
            self._missing(err)
            return
        self.server.log.append((f.name, self.headers.get("Range")))
        start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
        data = f.read_bytes()
        self._headers(f, start)
        if f.name in self.server.cut and not start:
            self.server.cut.discard(f.name)
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # an interrupted transfer
            return
        self.wfile.write(data[start:])

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def hub(tmp_path, tiny_dataset):
    """A Hub with the challenge's layout, made from the tiny dataset's shards and tokenizer."""
    shards = sorted(Path(tiny_dataset.dataset_dir).glob("fineweb_*.bin"))
    server = serve_hub(tmp_path / "hub", "sp320", shards, Path(tiny_dataset.tokenizer))
    yield server, len([f for f in shards if "_train_" in f.name])
    server.shutdown()


def serve_hub(root: Path, variant: str, shards: list[Path], tokenizer: Path) -> ThreadingHTTPServer:
    """Lay `shards` and `tokenizer` out as the Hub's dataset repository for `variant`, and serve it."""
    d = root / ROOT / "datasets" / f"fineweb10B_{variant}"
    d.mkdir(parents=True)
    for f in shards:
        shutil.copyfile(f, d / f.name)
    (root / ROOT / "tokenizers").mkdir()
    vocab, sep, name = variant[2:].partition("_")
    shutil.copyfile(tokenizer, root / ROOT / "tokenizers" / f"fineweb_{vocab}_bpe{sep}{name}.model")
    n_train = len([f for f in shards if "_train_0" in f.name])
    manifest = {"datasets": [{"name": f"fineweb10B_{variant}", "stats": {"files_train": n_train, "files_val": 1}}]}
    (root / ROOT / "manifest.json").write_text(json.dumps(manifest))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    server.root, server.log, server.cut = root / "", [], set()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def hub_cfg(server, **over) -> dict:
    cfg = {"repo_id": REPO, "variant": "sp320", "train_shards": 2, "endpoint": f"http://127.0.0.1:{server.server_port}"}
    full = validate({"data": {"source": "fineweb", "hub": {**cfg, **over}}, "tokenizer": {"vocab_size": 320}})
    return full["data"]["hub"]


def test_fetch_checks_and_places_the_shards_and_tokenizer(hub, tmp_path, tiny_dataset):
    server, _ = hub
    summary = fetch(hub_cfg(server), tmp_path / "cache", tmp_path / "ds", tmp_path / "tok.model")
    assert summary["splits"]["train"]["shards"] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    for name in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        assert np.array_equal(load_shard(tmp_path / "ds" / name), load_shard(Path(tiny_dataset.dataset_dir) / name))
    assert (tmp_path / "tok.model").read_bytes() == Path(tiny_dataset.tokenizer).read_bytes()
    loader = DistributedLoader(tmp_path / "ds", 0, 1, __import__("torch").device("cpu"), validate({})["loader"], 16, 0)
    x, _ = loader.next_batch(2, 16)
    assert x.shape == (2, 16)


def test_an_interrupted_download_resumes(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    server, _ = hub
    # small chunks, so the bytes received before the drop reach the partial file (10 MB by default)
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1024)
    server.cut.add("fineweb_train_000001.bin")
    fetch(hub_cfg(server), tmp_path / "cache", tmp_path / "ds", tmp_path / "tok.model")
    gets = [r for name, r in server.log if name == "fineweb_train_000001.bin"]
    assert gets[0] is None and gets[-1] and gets[-1].startswith("bytes=") and gets[-1] != "bytes=0-"
    assert load_shard(tmp_path / "ds" / "fineweb_train_000001.bin").shape[0] > 0


def test_missing_repo_variant_or_shards_fail_clearly(hub, tmp_path):
    server, n_train = hub
    with pytest.raises(ValueError, match="data.hub.repo_id: dataset repository 'nobody/nothing' not found"):
        fetch(hub_cfg(server, repo_id="nobody/nothing"), tmp_path / "c1", tmp_path / "ds", tmp_path / "t")
    with pytest.raises(ValueError, match="has no 'datasets/tokenizers/fineweb_999_bpe.model'|sp999"):
        fetch(hub_cfg(server, variant="sp999"), tmp_path / "c2", tmp_path / "ds", tmp_path / "t")
    with pytest.raises(ValueError, match=f"has {n_train} train shards, 99 asked"):
        fetch(hub_cfg(server, train_shards=99), tmp_path / "c3", tmp_path / "ds", tmp_path / "t")
    assert not (tmp_path / "ds").exists()


def test_a_corrupt_shard_is_refused(hub, tmp_path):
    server, _ = hub
    bad = server.root / ROOT / "datasets" / "fineweb10B_sp320" / "fineweb_train_000000.bin"
    write_shard(bad, np.arange(10, dtype=np.uint16))
    bad.write_bytes(bad.read_bytes()[:-4])
    with pytest.raises(ValueError, match="failed its check: .*header promises 10 tokens"):
        fetch(hub_cfg(server), tmp_path / "cache", tmp_path / "ds", tmp_path / "tok.model")
    assert not (tmp_path / "ds").exists()


CASEOPS_VARIANT = "sp400_lossless_caps_caseops_v1_reserved"


@pytest.fixture()
def caseops_hub(tmp_path):
    """A Hub with a CaseOps export's layout (val byte sidecar, the operators' tokenizer), made through
    pgolf's own CaseOps tokenizer and shards stages on the fixture corpus."""
    import sentencepiece  # noqa: F401  (the stages need it)

    from pgolf.data import documents, shards, tokenizer

    cfg = validate({"data": {"source": "local", "paths": [str(Path(__file__).parent / "fixtures" / "corpus")],
                             "val_fraction": 0.1, "shard_tokens": 20000},
                    "tokenizer": {"vocab_size": 400, "caseops": True}})
    built = tmp_path / "built"
    built.mkdir()
    documents.build(cfg["data"], None, built / "docs.parquet")
    tokenizer.cli(["--docs", str(built / "docs.parquet"), "--cfg", json.dumps(cfg["tokenizer"]),
                   "--out", str(built / "tok.model")])
    shards.cli(["--docs", str(built / "docs.parquet"), "--tokenizer", str(built / "tok.model"),
                "--cfg", json.dumps({"shard_tokens": 20000}), "--out", str(built / "ds"), "--caseops"])
    shards = [f for f in sorted((built / "ds").glob("fineweb_*.bin")) if "train_bytes" not in f.name]
    server = serve_hub(tmp_path / "hub", CASEOPS_VARIANT, shards, built / "tok.model")  # val sidecar only
    yield server, built
    server.shutdown()


def caseops_cfg(server, **over) -> dict:
    cfg = {"repo_id": REPO, "variant": CASEOPS_VARIANT, "train_shards": 1,
           "endpoint": f"http://127.0.0.1:{server.server_port}"}
    full = validate({"data": {"source": "fineweb", "hub": {**cfg, **over}},
                     "tokenizer": {"vocab_size": 400, "caseops": True}})
    return full["data"]["hub"]


def test_a_caseops_export_brings_its_byte_sidecar_and_bpb_counts_original_bytes(caseops_hub, tmp_path):
    from pgolf.formats.shards import load_sidecar, open_dataset, read_manifest

    server, built = caseops_hub
    fetch(caseops_cfg(server), tmp_path / "cache", tmp_path / "ds", tmp_path / "tok.model")
    m = read_manifest(tmp_path / "ds")
    assert m["text_transform"] == "caseops_v1" and m["splits"]["val"]["byte_sidecar"]["shards"] == [
        "fineweb_val_bytes_000000.bin"]
    open_dataset(tmp_path / "ds", 400, "tokenizer.vocab_size")
    # the same bytes as the val split's original UTF-8 text, which the stages that built it checked
    assert np.array_equal(load_sidecar(tmp_path / "ds", "val"), load_sidecar(built / "ds", "val"))
    assert m["splits"]["val"]["bytes"] == read_manifest(built / "ds")["splits"]["val"]["bytes"]


def test_a_caseops_export_with_a_short_sidecar_or_a_plain_tokenizer_is_refused(caseops_hub, tmp_path):
    server, built = caseops_hub
    d = server.root / ROOT / "datasets" / f"fineweb10B_{CASEOPS_VARIANT}"
    side = d / "fineweb_val_bytes_000000.bin"
    good = side.read_bytes()
    write_shard(side, np.ones(5, dtype=np.uint16))
    with pytest.raises(ValueError, match="byte sidecar fineweb_val_bytes_000000.bin has 5 entries for the"):
        fetch(caseops_cfg(server), tmp_path / "c1", tmp_path / "ds", tmp_path / "tok.model")
    side.write_bytes(good)
    tok = server.root / ROOT / "tokenizers" / f"fineweb_400_bpe{CASEOPS_VARIANT[5:]}.model"
    plain = __import__("sentencepiece")
    plain.SentencePieceTrainer.train(sentence_iterator=iter(["plain text only"] * 50), model_prefix=str(tmp_path / "p"),
                                     vocab_size=40, model_type="char")
    shutil.copyfile(tmp_path / "p.model", tok)
    with pytest.raises(ValueError, match="operators U\\+E001..U\\+E004 are not pieces of their own"):
        fetch(caseops_cfg(server), tmp_path / "c2", tmp_path / "ds", tmp_path / "tok.model")
    assert not (tmp_path / "ds").exists()


def test_caseops_must_match_the_variant():
    with pytest.raises(ValueError, match="tokenizer.caseops \\(False\\) must say whether data.hub.variant"):
        validate({"data": {"source": "fineweb", "hub": {"variant": CASEOPS_VARIANT}},
                  "tokenizer": {"vocab_size": 400}})
    with pytest.raises(ValueError, match="tokenizer.caseops \\(True\\) must say"):
        validate({"data": {"source": "fineweb", "hub": {"variant": "sp400"}},
                  "tokenizer": {"vocab_size": 400, "caseops": True}})
