"""Bytes outside any checksum: every byte a stage reads from another stage's output is covered by a
checksum its reader verifies, or is derived from the file it describes.

- token shards: the manifest records each shard's sha256, and a stage checks a shard against it
  before it uses any of its tokens (evaluate, audit, calibrate, shard-order, the training loader);
- the training checkpoint's fingerprint: the shards' and the tokenizer's sha256, not their sizes;
- a CaseOps tokenizer is never scored without its byte sidecar, whatever the manifest says, and
  no tokenizer counts bytes unless it is the one the manifest records;
- framed binaries (artifact, checkpoint, tensor file) and the token shard's header: every single-bit
  flip before the body is refused;
- the JSON results (eval.json, size.json, train.json, summary.json, shard_order.json): a checksum
  of the content that every reader checks; submission.json's bytes taken from the files, and the
  record's table rendered from the checked summary.json (never copied from summary.md).

Stages run as the rules run them where a user meets the refusal; the exhaustive bit loops call the
reader in-process (the same function the stage calls).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import place_artifact, run_files
from test_fineweb import hub, hub_cfg  # noqa: F401  (hub is a fixture)
from test_integrity_data import REPO, SMOKE, assert_refused, copy_dataset, final_outputs, pgolf, stage_command
from test_integrity_errors import aggregate_argv, copy_run, record_argv, run_dir  # noqa: F401  (run_dir: a fixture)
from test_integrity_files import ckpt_state, train_cmd

from pgolf.config import validate
from pgolf.data import documents, shards, tokenizer
from pgolf.data.fetch_fineweb import fetch
from pgolf.errors import PgolfError
from pgolf.formats import shards as shardfmt
from pgolf.formats import tensorfile
from pgolf.formats.results import read_result, write_result
from pgolf.model.gpt import GPT
from pgolf.quant import artifact
from pgolf.quant.compress import compress
from pgolf.quant.quantize import quantize
from pgolf.report import aggregate, plots, record
from pgolf.train import checkpoint
from pgolf.train.loader import ShuffledWindows, TokenStream
from pgolf.train.train import read_shard_order

FIXTURES = Path(__file__).parent / "fixtures"
VOCAB = 320


def flip_bit(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def header_end(data: bytes) -> int:
    """Where a framed file's body starts (pgolf.formats.container: 8-byte magic, u32, u64 length)."""
    return 20 + struct.unpack_from("<Q", data, 12)[0]


def change_token(shard: Path, pos: int = 5) -> None:
    """One token id changed to another inside the vocabulary, the manifest left as it was: the issue's
    damage, which moved sliding BPB 3.5005 -> 3.5045 with exit 0."""
    tokens = np.array(shardfmt.load_shard(shard, mmap=False))
    tokens[pos] = 7 if tokens[pos] != 7 else 8
    shard.unlink()  # the original may still be memory-mapped by this process
    shardfmt.write_shard(shard, tokens)


def swap(a: Path, b: Path) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.unlink()
    b.unlink()
    a.write_bytes(data_b)
    b.write_bytes(data_a)


def rehash(dataset: Path, shard: Path) -> None:
    """Record `shard`'s current sha256 in the manifest: a dataset rebuilt with this content."""
    m = json.loads((dataset / "manifest.json").read_text())
    for entry in m["splits"].values():
        entry["sha256"] = [hashlib.sha256(shard.read_bytes()).hexdigest() if name == shard.name else h
                           for name, h in zip(entry["shards"], entry["sha256"], strict=True)]
    (dataset / "manifest.json").write_text(json.dumps(m))


@pytest.fixture(scope="module")
def inputs(setup) -> SimpleNamespace:
    """What stage_command needs besides the dataset: the tokenizer, EMA weights and artifact."""
    return SimpleNamespace(tokenizer=setup.tokenizer, ema=setup.ema, artifact=setup.artifact)


def audit_command(ds: Path, tok: Path, art: Path, run: Path) -> list:
    place_artifact(run, 1, art)
    return ["audit", "--run", run, "--seed", 1, "--config", REPO / "config.yaml", "--data", ds, "--tokenizer", tok]


# ---------------------------------------------------------------- token shards


def test_the_shards_stage_records_each_shards_sha256_in_order(tiny_dataset):
    m = shardfmt.read_manifest(tiny_dataset.dataset_dir)
    for split in ("train", "val"):
        entry = m["splits"][split]
        files = [tiny_dataset.dataset_dir / name for name in entry["shards"]]
        assert entry["sha256"] == [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def test_fetch_fineweb_records_the_sha256_of_what_it_writes(hub, tmp_path):  # noqa: F811
    server, _ = hub
    summary = fetch(hub_cfg(server), tmp_path / "cache", tmp_path / "ds", tmp_path / "tok.model")
    for entry in summary["splits"].values():
        assert len(entry["sha256"]) == len(entry["shards"]) > 0
        assert entry["sha256"] == [hashlib.sha256((tmp_path / "ds" / n).read_bytes()).hexdigest()
                                   for n in entry["shards"]]
    assert shardfmt.read_manifest(tmp_path / "ds")["splits"] == summary["splits"]


@pytest.mark.parametrize("stage", ["evaluate", "audit"])
def test_a_changed_val_token_is_refused_before_scoring(stage, tiny_dataset, inputs, tmp_path):
    ds = copy_dataset(tiny_dataset.dataset_dir, tmp_path / "ds")
    shard = ds / "fineweb_val_000000.bin"
    change_token(shard)
    out = tmp_path / "eval.json"
    if stage == "evaluate":
        proc = pgolf(*stage_command("evaluate", inputs, ds, out))
    else:
        proc = pgolf(*audit_command(ds, inputs.tokenizer, inputs.artifact, tmp_path / "run"))
    assert_refused(proc, stage, f"{shard}: sha256", str(ds / "manifest.json"), "rebuild the dataset", outputs=(out,))


@pytest.mark.parametrize("stage", ["train", "calibrate", "shard-order"])
def test_two_swapped_equal_length_train_shards_are_refused(stage, tiny_dataset, inputs, tmp_path):
    """The issue's second case: swapped shards of one length trained another model with exit 0."""
    ds = copy_dataset(tiny_dataset.dataset_dir, tmp_path / "ds")
    a, b = ds / "fineweb_train_000000.bin", ds / "fineweb_train_000001.bin"
    assert a.stat().st_size == b.stat().st_size and a.read_bytes() != b.read_bytes()
    swap(a, b)
    out = tmp_path / ("seed1" if stage == "train" else "out")
    proc = pgolf(*stage_command(stage, inputs, ds, out))
    assert_refused(proc, stage, f"{a}: sha256", str(ds / "manifest.json"), outputs=final_outputs(stage, out))


def train_shards(ds: Path) -> list[Path]:
    return [p for p, _ in shardfmt.shard_files(ds, "train")]


def test_the_loader_verifies_a_train_shard_when_it_first_opens_it(tiny_dataset, tmp_path):
    """Training's start hashes the first shard (the next one on a thread); a damaged later shard
    stops the stream when it reaches it, before any of its tokens is returned."""
    ds = copy_dataset(tiny_dataset.dataset_dir, tmp_path / "ds")
    files = train_shards(ds)
    change_token(files[2])
    shardfmt._VERIFIED.clear()
    stream = TokenStream(ds, vocab_size=VOCAB)
    assert str(files[0].resolve()) in shardfmt._VERIFIED and str(files[2].resolve()) not in shardfmt._VERIFIED
    before = sum(shardfmt.read_header(f) for f in files[:2])
    assert len(stream.take(before)) == before  # the first two shards, to their last token
    assert len(shardfmt._VERIFIED) == 2
    with pytest.raises(shardfmt.ShardError, match=f"^{re.escape(str(files[2]))}: sha256"):
        stream.take(1)
    shardfmt._VERIFIED.clear()
    windows = ShuffledWindows(ds, 17, seed=0, vocab_size=VOCAB)
    assert not shardfmt._VERIFIED  # nothing hashed before a window is drawn from a shard
    with pytest.raises(shardfmt.ShardError, match=f"^{re.escape(str(files[2]))}: sha256"):
        windows.windows(len(windows.perm), 17)


def test_the_loader_checks_the_next_shard_ahead_so_the_switch_hashes_nothing(tiny_dataset, tmp_path, monkeypatch):
    ds = copy_dataset(tiny_dataset.dataset_dir, tmp_path / "ds")
    files = train_shards(ds)
    shardfmt._VERIFIED.clear()
    stream = TokenStream(ds, vocab_size=VOCAB)
    stream._ahead[1].result()  # the thread's check of shard 1, done while shard 0 is read
    assert str(files[1].resolve()) in shardfmt._VERIFIED
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(shardfmt.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    first = shardfmt.read_header(files[0])
    assert np.array_equal(stream.take(first + 5)[first:], shardfmt.load_shard(files[1])[:5])
    stream._ahead[1].result()
    assert len(calls) == 1 and str(files[2].resolve()) in shardfmt._VERIFIED  # shard 2's, on the thread


def test_a_verified_shard_is_not_hashed_again_unless_it_changes(tiny_dataset, tmp_path, monkeypatch):
    ds = copy_dataset(tiny_dataset.dataset_dir, tmp_path / "ds")
    path, sha = shardfmt.shard_files(ds, "train")[0]
    shardfmt.open_shard(path, sha)
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(shardfmt.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    shardfmt.open_shard(path, sha)  # a loader wrapping around to it
    assert calls == []
    change_token(path)  # a new file under the same name
    calls.clear()
    with pytest.raises(shardfmt.ShardError, match="sha256 is not the one"):
        shardfmt.open_shard(path, sha)
    assert calls == [1]


def test_a_manifest_without_shard_checksums_is_refused_saying_to_rebuild(tiny_dataset, inputs, tmp_path):
    ds = copy_dataset(tiny_dataset.dataset_dir, tmp_path / "ds")
    m = json.loads((ds / "manifest.json").read_text())
    for entry in m["splits"].values():
        del entry["sha256"]
    (ds / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "seed1"
    proc = pgolf(*stage_command("train", inputs, ds, out))
    assert_refused(proc, "train", str(ds / "manifest.json"), "splits.train.sha256 is missing", "rebuild the dataset",
                   outputs=final_outputs("train", out))


def test_a_checksum_list_of_the_wrong_length_is_refused(tiny_dataset, tmp_path):
    ds = copy_dataset(tiny_dataset.dataset_dir, tmp_path / "ds")
    m = json.loads((ds / "manifest.json").read_text())
    m["splits"]["train"]["sha256"].pop()
    (ds / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(shardfmt.ShardError, match=r"manifest.json: splits.train.sha256 must hold one sha256"):
        shardfmt.read_manifest(ds)


def test_every_single_bit_flip_of_a_token_shard_header_is_refused(tmp_path):
    path = tmp_path / "fineweb_train_000000.bin"
    sha = shardfmt.write_shard(path, np.arange(300) % VOCAB)
    data = path.read_bytes()
    assert shardfmt.open_shard(path, sha).tolist() == (np.arange(300) % VOCAB).tolist()
    passed = []
    for bit in range(shardfmt.HEADER_BYTES * 8):
        path.unlink()
        path.write_bytes(flip_bit(data, bit))
        try:
            shardfmt.open_shard(path, sha)
        except shardfmt.ShardError:
            continue
        passed.append(bit)
    assert passed == []


# ---------------------------------------------------------------- the checkpoint's fingerprint


def test_the_fingerprint_covers_the_shards_and_tokenizer_by_content(tiny_dataset, tmp_path):
    ds = copy_dataset(tiny_dataset.dataset_dir, tmp_path / "ds")
    fp = lambda: checkpoint.fingerprint({"m": 1}, {"t": 2}, 1, VOCAB, ds)  # noqa: E731
    before = fp()
    m = json.loads((ds / "manifest.json").read_text())
    (ds / "manifest.json").write_text(json.dumps({**m, "tokenizer_sha256": "0" * 64}))
    assert fp() != before
    (ds / "manifest.json").write_text(json.dumps(m))
    assert fp() == before
    change_token(ds / "fineweb_train_000001.bin")  # same size
    rehash(ds, ds / "fineweb_train_000001.bin")
    assert fp() != before


def test_training_does_not_resume_a_checkpoint_of_other_data_of_the_same_sizes(tiny_dataset, tmp_path):
    """The issue's case: after a data change that kept every shard's size, training resumed the old
    checkpoint at step 20 and wrote the old run's ema.pgt."""
    ds = SimpleNamespace(dataset_dir=copy_dataset(tiny_dataset.dataset_dir, tmp_path / "ds"), vocab_size=VOCAB)
    killed = tmp_path / "killed"
    assert pgolf(*train_cmd(ds, killed, stop_after=9)).returncode == 3
    same = tmp_path / "same"
    shutil.copytree(killed, same)
    proc = pgolf(*train_cmd(ds, same))  # the control: the same data resumes
    assert proc.returncode == 0 and "at step 8" in proc.stdout, proc.stdout[-2000:]
    shard = ds.dataset_dir / "fineweb_train_000000.bin"
    sizes = {p.name: p.stat().st_size for p in ds.dataset_dir.glob("*.bin")}
    change_token(shard)
    rehash(ds.dataset_dir, shard)  # a rebuilt dataset: consistent, every shard the size it was
    assert {p.name: p.stat().st_size for p in ds.dataset_dir.glob("*.bin")} == sizes
    proc = pgolf(*train_cmd(ds, killed))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "belongs to another config or dataset; starting fresh" in proc.stdout
    assert "resumed" not in proc.stdout
    assert (killed / "ema.pgt").read_bytes() != (same / "ema.pgt").read_bytes()


# ---------------------------------------------------------------- CaseOps without its sidecar


@pytest.fixture(scope="module")
def caseops_run(tmp_path_factory) -> SimpleNamespace:
    """A CaseOps dataset whose manifest and folder lost every trace of the byte sidecar (entries,
    text_transform, files), with a model and artifact of its vocabulary."""
    root = tmp_path_factory.mktemp("caseops_nosidecar")
    cfg = validate({"data": {"source": "local", "paths": [str(FIXTURES / "corpus")], "val_fraction": 0.1,
                             "shard_tokens": 20000}, "tokenizer": {"vocab_size": 400, "caseops": True}})
    docs, tok, ds = root / "docs.parquet", root / "tok.model", root / "dataset"
    documents.build(cfg["data"], None, docs)
    tokenizer.train(docs, cfg["tokenizer"], tok)
    shards.build(docs, tok, cfg["data"], ds, caseops_on=True)
    m = json.loads((ds / "manifest.json").read_text())
    del m["text_transform"]
    for entry in m["splits"].values():
        entry.pop("byte_sidecar", None)
    (ds / "manifest.json").write_text(json.dumps(m))
    for side in ds.glob("fineweb_*_bytes_*.bin"):
        side.unlink()
    torch.manual_seed(0)
    model_cfg = validate({"model": {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1}})["model"]
    model = GPT(400, model_cfg)
    tensorfile.save(root / "ema.pgt", model.state_dict(), {**model.meta(), "step": 0, "seed": 0})
    quant = validate({"quant": {"method": "rtn", "min_numel": 256}})["quant"]
    quantize(root / "ema.pgt", quant, root / "q.pgt")
    compress(root / "q.pgt", {**validate({})["compress"], "codec": "zstd", "level": 3}, root / "a.pgz")
    return SimpleNamespace(dataset=ds, tokenizer=tok, ema=root / "ema.pgt", artifact=root / "a.pgz", root=root)


@pytest.mark.parametrize("stage", ["evaluate", "audit"])
def test_a_caseops_tokenizer_is_never_scored_without_its_sidecar(stage, caseops_run, tmp_path):
    """The issue's case: scored from the tokenizer's tables, bytes 7,685 -> 8,126 and BPB 3.5005 ->
    3.3106, exit 0. The manifest no longer says CaseOps; the tokenizer's own pieces do."""
    r = caseops_run
    out = tmp_path / "eval.json"
    if stage == "evaluate":
        proc = pgolf(*stage_command("evaluate", r, r.dataset, out, vocab=400))
    else:
        proc = pgolf(*audit_command(r.dataset, r.tokenizer, r.artifact, tmp_path / "run"))
    assert_refused(proc, stage, str(r.dataset / "manifest.json"), "no byte_sidecar", str(r.tokenizer),
                   "CaseOps tokenizer", outputs=(out,))


def test_audit_refuses_a_tokenizer_the_shards_were_not_made_with(tiny_dataset, inputs, caseops_run, tmp_path):
    """Whoever counts bytes with a tokenizer checks it against the manifest's sha256 (evaluate did;
    audit counted with whatever --tokenizer named)."""
    proc = pgolf(*audit_command(tiny_dataset.dataset_dir, caseops_run.tokenizer, inputs.artifact, tmp_path / "run"))
    assert_refused(proc, "audit", str(caseops_run.tokenizer), str(tiny_dataset.dataset_dir / "manifest.json"),
                   "not the tokenizer the shards were made with")


# ---------------------------------------------------------------- framed binaries: every header bit


@pytest.fixture(scope="module")
def artifacts(setup) -> dict[str, bytes]:
    """The small model's artifact under each codec whose header the loop flips."""
    raw = (setup.artifact.parent / "q.pgt").read_bytes()
    base = validate({})["compress"]
    return {codec: artifact.encode(raw, {**base, "codec": codec, "level": 5, "pack": False})
            for codec in ("pergroup", "brotli")}


@pytest.mark.parametrize("codec", ["pergroup", "brotli"])
def test_every_single_bit_flip_of_the_artifact_header_is_refused(artifacts, codec):
    """Before, 62 of 3,584 (pergroup) and 100 of 2,072 (brotli) header flips passed `pgolf size` with
    another size.json (params 56,205 -> 46,205, or pruned_codes 0 -> 1). `pgolf size` and `pgolf
    evaluate` both read through artifact.read_checked, whose decode_checked this calls."""
    data = artifacts[codec]
    raw, header = artifact.decode_checked(data, "a.pgz")
    assert header["codec"] == codec and tensorfile.loads(raw, "a.pgz")
    passed = []
    for bit in range(header_end(data) * 8):
        try:
            artifact.decode_checked(flip_bit(data, bit), "a.pgz")
        except artifact.ArtifactError as e:
            assert str(e).startswith("a.pgz: ") and "\n" not in str(e)
            continue
        passed.append(bit)
    assert passed == []


def digit_flipped(data: bytes, key: bytes) -> bytes:
    """The header's `"<key>": N` with the low bit of N's first digit flipped (0 -> 1, 5 -> 4, ...)."""
    i = data.index(b'"' + key + b'": ') + len(key) + 4
    assert i < header_end(data)
    return flip_bit(data, i * 8)


def test_size_and_evaluate_refuse_a_flipped_header_value(setup, inputs, tmp_path):
    art = tmp_path / "artifact.pgz"
    art.write_bytes(digit_flipped(setup.artifact.read_bytes(), b"params"))
    out = tmp_path / "size.json"
    proc = pgolf("size", "--artifact", art, "--cfg", json.dumps(validate({})["compress"]), "--out", out)
    assert_refused(proc, "size", f"{art}: checksum mismatch", outputs=(out,))
    art.write_bytes(digit_flipped(setup.artifact.read_bytes(), b"pruned_codes"))
    out = tmp_path / "eval.json"
    proc = pgolf(*stage_command("evaluate", SimpleNamespace(**{**vars(inputs), "artifact": art}),
                                setup.data, out))
    assert_refused(proc, "evaluate", f"{art}: checksum mismatch", outputs=(out,))


def test_an_artifact_of_the_version_before_is_refused(setup):
    data = setup.artifact.read_bytes()
    old = data[:8] + struct.pack("<I", artifact.VERSION - 1) + data[12:]
    with pytest.raises(artifact.ArtifactError, match=f"unsupported artifact version {artifact.VERSION - 1}"):
        artifact.decode(old, "a.pgz")


def test_every_single_bit_flip_of_a_checkpoint_header_is_refused(tmp_path):
    checkpoint.save(tmp_path, ckpt_state(3))
    path = tmp_path / checkpoint.LATEST
    data = path.read_bytes()
    assert checkpoint.read(path)["step"] == 3
    passed = []
    for bit in range(header_end(data) * 8):
        path.write_bytes(flip_bit(data, bit))
        try:
            checkpoint.read(path)
        except checkpoint.CheckpointError:
            continue
        passed.append(bit)
    assert passed == []


def test_every_single_bit_flip_of_a_tensor_file_header_is_refused():
    data = tensorfile.dumps({"w": torch.randn(4, 3), "c": torch.arange(5).to(torch.int8)}, {"step": 3})
    assert tensorfile.loads(data, "t.pgt")[1] == {"step": 3}
    passed = []
    for bit in range(header_end(data) * 8):
        try:
            tensorfile.loads(flip_bit(data, bit), "t.pgt")
        except tensorfile.TensorFileError:
            continue
        passed.append(bit)
    assert passed == []


# ---------------------------------------------------------------- JSON results


def edit_digit(path: Path, key: str) -> None:
    """One digit of the first number at `"key": ` (or first in its list) changed, in the text, as a
    person edits a file."""
    text = path.read_text()
    m = re.search(rf'"{key}": [\[\s]*-?(\d)', text)
    assert m, f"{key} not in {path}"
    d = str((int(m[1]) + 1) % 10)
    path.write_text(text[: m.start(1)] + d + text[m.end(1) :])


def test_a_result_round_trips_and_an_edited_one_is_refused_naming_it(tmp_path):
    path = tmp_path / "eval.json"
    write_result(path, {"sliding": {"val_bpb": 3.3266, "tokens": 7685}, "seconds": {1: 0.5}, "t": (1, 2)})
    assert read_result(path) == {"sliding": {"val_bpb": 3.3266, "tokens": 7685}, "seconds": {"1": 0.5}, "t": [1, 2]}
    edit_digit(path, "val_bpb")
    with pytest.raises(PgolfError, match=f"^{re.escape(str(path))}: its content does not match its content_sha256"):
        read_result(path)
    path.write_text(json.dumps({"sliding": {"val_bpb": 3.3266}}))
    with pytest.raises(PgolfError, match=f"^{re.escape(str(path))}: carries no content_sha256"):
        read_result(path)


EDITS = [  # (stage, file in the run folder, key whose first digit is changed)
    ("aggregate", "seed2/eval.json", "val_bpb"),  # the issue's: the mean 3.3266 -> 3.3316
    ("aggregate", "seed1/size.json", "model_bytes"),
    ("aggregate", "seed2/train.json", "steps"),
    ("record", "seed1/eval.json", "val_loss"),
    ("record", "seed2/size.json", "model_bytes"),  # the issue's: 32,613 bytes for a 22,613-byte file
    ("record", "seed1/train.json", "train_seconds"),
    ("record", "summary.json", "sliding_bpb"),
]


@pytest.mark.parametrize("stage, file, key", EDITS, ids=[f"{s}-{f}" for s, f, _ in EDITS])
def test_every_reader_refuses_an_edited_result_naming_it(run_dir, tmp_path, stage, file, key):  # noqa: F811
    d = copy_run(run_dir, tmp_path / "run")
    edit_digit(d / file, key)
    proc = pgolf(*(aggregate_argv(d, tmp_path) if stage == "aggregate" else record_argv(d, tmp_path)))
    assert_refused(proc, stage, f"{d / file}: its content does not match its content_sha256")
    assert not list(tmp_path.glob("s.*")) and not (tmp_path / "record").exists()


def test_plots_refuse_an_edited_result(run_dir, tmp_path):  # noqa: F811
    d = copy_run(run_dir, tmp_path / "run")
    edit_digit(d / "seed1" / "eval.json", "val_bpb")
    files = run_files(d, [1, 2], ("eval", "size"))
    with pytest.raises(PgolfError, match=re.escape(f"{d / 'seed1' / 'eval.json'}: its content does not match")):
        plots.bpb_figure(files, tmp_path / "bpb.png")
    edit_digit(d / "seed2" / "size.json", "model_bytes")
    with pytest.raises(PgolfError, match=re.escape(f"{d / 'seed2' / 'size.json'}: its content does not match")):
        plots.bytes_figure(files, tmp_path / "bytes.png")
    assert not list(tmp_path.glob("*.png"))


def test_aggregate_refuses_an_edited_baseline_summary(run_dir, tmp_path):  # noqa: F811
    d = copy_run(run_dir, tmp_path / "run")
    baseline = d / "summary.json"
    edit_digit(baseline, "sliding_bpb")
    cfg = {"metric": "sliding_bpb", "baseline_run": "base", "baseline_mean": None, "baseline_std": None,
           "baseline_n": 3, "min_gain_nats": 0.005, "alpha": 0.01}
    with pytest.raises(PgolfError, match=re.escape(f"{baseline}: its content does not match")):
        aggregate.aggregate("new", run_files(d, [1, 2]), cfg, baseline)


def test_record_takes_the_artifact_bytes_from_the_artifact(run_dir, tmp_path):  # noqa: F811
    d = copy_run(run_dir, tmp_path / "run")
    files = run_files(d, [1, 2], ("eval", "size", "train", "artifact"))
    results = record.seed_results(files, "sliding_bpb", code_bytes=37_000)
    for s in (1, 2):
        n = (d / f"seed{s}" / "artifact.pgz").stat().st_size
        assert results[str(s)]["artifact_bytes"] == n and results[str(s)]["bytes_total"] == n + 37_000
    # a size.json with its checksum intact that measured another artifact: refused, naming both
    size = d / "seed2" / "size.json"
    write_result(size, {**read_result(size), "model_bytes": 22_613})
    proc = pgolf(*record_argv(d, tmp_path))
    assert_refused(proc, "record", f"{size}: model_bytes is 22,613", str(d / "seed2" / "artifact.pgz"),
                   "rerun pgolf size", outputs=(tmp_path / "record",))


def test_record_renders_its_table_from_the_checked_summary(run_dir, tmp_path):  # noqa: F811
    """summary.md is derived from summary.json: aggregate renders one from the other, and record
    renders the README's table from the summary.json it checks, so an edited summary.md cannot reach it."""
    d = copy_run(run_dir, tmp_path / "run")
    proc = pgolf(*aggregate_argv(d, tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "s.md").read_text() == aggregate.summary_table(read_result(tmp_path / "s.json"))
    (d / "summary.md").write_text("| seed | sliding_bpb |\n| mean | EDITED |\n")
    proc = pgolf(*record_argv(d, tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    readme = (tmp_path / "record" / "README.md").read_text()
    assert aggregate.summary_table(read_result(d / "summary.json")) in readme and "EDITED" not in readme


def test_training_refuses_an_edited_shard_order(tiny_dataset, inputs, tmp_path):
    """shard_order.json as `pgolf shard-order` writes it, then one index edited: another data order,
    another model, with exit 0 before."""
    order = tmp_path / "shard_order.json"
    cfg = json.dumps({"sample_tokens": 512, "seq_len": 16})
    proc = pgolf("shard-order", "--data", tiny_dataset.dataset_dir, "--probe", inputs.ema, "--cfg", cfg,
                 "--vocab-size", VOCAB, "--out", order)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loader = {**SMOKE["loader"], "mode": "ordered", "order": "hardest"}
    assert read_shard_order(order, loader) == read_result(order)["hardest_first"]
    edit_digit(order, "hardest_first")
    out = tmp_path / "seed1"
    cmd = [str(a) for a in stage_command("train", inputs, tiny_dataset.dataset_dir, out)]
    cmd[cmd.index("--loader-cfg") + 1] = json.dumps(loader)
    cmd[cmd.index("--shard-order=")] = f"--shard-order={order}"
    proc = pgolf(*cmd)
    assert_refused(proc, "train", f"{order}: its content does not match", outputs=final_outputs("train", out))
