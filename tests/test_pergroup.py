"""Per-group compression (codec pergroup): exact round trip, smaller than brotli on a structured model,
the record's L1 row sort, pruning through it, ZPAQ streams (compress.zpaq), and damaged files refused."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from pgolf.config import ConfigError, validate
from pgolf.formats import tensorfile
from pgolf.formats.container import frame, unframe
from pgolf.quant import artifact, pergroup
from pgolf.quant.compress import prune_to_fit

BROTLI = {**validate({})["compress"], "level": 11}
PERGROUP = {**validate({"compress": {"codec": "pergroup"}})["compress"]}
ZPAQ = {**validate({"compress": {"codec": "pergroup", "zpaq": True}})["compress"]}


def structured_file(layers: int = 4, seed: int = 0) -> bytes:
    """An int6 quantized model whose matrices, as trained ones, have rows that come in families (a few
    prototypes plus noise) and per-row scales: what bucketing, transposing and sorting exploit."""
    g = torch.Generator().manual_seed(seed)

    def codes(rows: int, cols: int) -> torch.Tensor:
        protos = torch.randn(8, cols, generator=g) * 6
        pick = torch.randint(0, 8, (rows,), generator=g)
        return torch.clamp(torch.round(protos[pick] + torch.randn(rows, cols, generator=g)), -31, 31).to(torch.int8)

    shapes = {"attn.c_q.weight": (64, 64), "attn.c_k.weight": (32, 64), "mlp.fc.weight": (128, 64),
              "mlp.proj.weight": (64, 128), "attn.attn_gate.weight": (2, 12)}
    tensors, plan, bits = {}, {}, {}
    names = ["tok_emb.weight"] + [f"blocks.{i}.{k}" for i in range(layers) for k in shapes]
    for name in names:
        rows, cols = (256, 64) if name == "tok_emb.weight" else shapes[name.split(".", 2)[2]]
        tensors[f"{name}.codes"], tensors[f"{name}.scale"] = codes(rows, cols), torch.rand(rows, generator=g).half()
        plan[name], bits[name] = "int", 6
        tensors[f"{name.rsplit('.', 1)[0]}.gain"] = torch.randn(cols, generator=g)
        plan[f"{name.rsplit('.', 1)[0]}.gain"] = "fp32"
    return tensorfile.dumps(tensors, {"vocab_size": 256, "quant": {"plan": plan, "bits": bits}})


def test_round_trip_is_exact_and_smaller_than_brotli():
    raw = structured_file()
    data = artifact.encode(raw, PERGROUP)
    assert artifact.decode(data, "a.pgz") == raw
    header = unframe(data, artifact.MAGIC, artifact.VERSION, 1 << 20, "a", ValueError, "a")[0]
    tensors, meta = tensorfile.loads(raw, "q")
    _, blobs = pergroup.split(tensors, meta, PERGROUP["sort_rows"])
    # c_q, fc, proj and the embedding have buckets; c_k's 8 KB and the gates stay in the remainder
    assert header["codec"] == "pergroup" and len(header["streams"]) == 1 + len(blobs) == 5
    plain, unsorted = len(artifact.encode(raw, BROTLI)), len(artifact.encode(raw, {**PERGROUP, "sort_rows": []}))
    assert len(data) < 0.95 * min(unsorted, plain)  # the sort is what pays on rows in families
    print(f"brotli {plain}, pergroup unsorted {unsorted}, sorted {len(data)}")


def test_l1_order_is_the_records_greedy_walk():
    g = np.random.default_rng(0)
    m = g.integers(-3, 4, size=(40, 16)).astype(np.int8)
    n, used, order = len(m), np.zeros(40, bool), [0]  # PR #1855's _similarity_sort_l1, written out
    used[0] = True
    for _ in range(n - 1):
        d = np.abs(m.astype(np.float32) - m[order[-1]].astype(np.float32)).sum(1)
        d[used] = np.inf
        order.append(int(np.argmin(d)))
        used[order[-1]] = True
    assert pergroup.l1_order(torch.from_numpy(m)).tolist() == order


def test_pruning_fits_through_pergroup():
    raw = structured_file(layers=1, seed=1)
    full = len(artifact.encode(raw, PERGROUP))
    data, n = prune_to_fit(raw, PERGROUP, full - 200)
    assert len(data) <= full - 200 and n > 0
    tensorfile.loads(artifact.decode(data), "a")


def _damaged(data: bytes, **streams_change) -> bytes:
    header, body = unframe(data, artifact.MAGIC, artifact.VERSION, 1 << 20, "a", ValueError, "a")
    streams = [dict(s) for s in header["streams"]]
    for key, value in streams_change.items():
        streams[-1][key] = value
    return frame(artifact.MAGIC, artifact.VERSION, {**header, "streams": streams}) + bytes(body)


def test_damaged_files_fail_naming_the_file(tmp_path):
    raw = structured_file()
    data = artifact.encode(raw, PERGROUP)
    flipped = data[:-40] + bytes([data[-40] ^ 1]) + data[-39:]
    for bad in (data[:-5], _damaged(data, payload_bytes=7), _damaged(data, codec="gzip"), flipped):
        (tmp_path / "a.pgz").write_bytes(bad)
        with pytest.raises(artifact.ArtifactError, match="a.pgz"):
            artifact.read_artifact(tmp_path / "a.pgz")


def test_a_stored_order_that_is_no_permutation_is_refused():
    tensors, meta = tensorfile.loads(structured_file(), "q")
    orders = {k: torch.zeros(tensors[k].size(0), dtype=torch.int64) for k in tensors if k.startswith("tok_emb")
              and k.endswith(".codes")}  # every row maps to row 0
    body, streams = pergroup.encode(tensors, meta, 2, ["tok_emb"], orders)
    with pytest.raises(pergroup.PergroupError, match="not a permutation"):
        pergroup.decode({"streams": streams, "shuffle": 2}, memoryview(body), "a.pgz")


def test_config_refuses_a_level_or_packing_with_pergroup():
    for extra in ({"level": 5}, {"pack": True}):
        with pytest.raises(ConfigError, match="codec pergroup takes no level"):
            validate({"compress": {"codec": "pergroup", **extra}})


def _streams(data: bytes) -> list[dict]:
    return unframe(data, artifact.MAGIC, artifact.VERSION, 1 << 20, "a", ValueError, "a")[0]["streams"]


def test_zpaq_streams_round_trip_and_are_chosen_only_where_smaller():
    raw = structured_file()
    plain, data = artifact.encode(raw, PERGROUP), artifact.encode(raw, ZPAQ)
    assert artifact.decode(data, "a.pgz") == raw
    assert {s["codec"] for s in _streams(plain)} <= {"brotli", "lzma", "zstd"}  # off: never ZPAQ
    zpaq_sizes = [s["body_bytes"] for s in _streams(data)]
    # each stream is the smaller of the fast codecs' best and ZPAQ's: never larger than without it
    assert all(z <= p for z, p in zip(zpaq_sizes, (s["body_bytes"] for s in _streams(plain)), strict=True))
    tensors, meta = tensorfile.loads(raw, "q")
    body, streams = pergroup.encode(tensors, meta, 2, ZPAQ["sort_rows"], codecs=("zpaq",))
    assert {s["codec"] for s in streams} == {"zpaq"}
    header = {"streams": streams, "shuffle": 2}
    assert pergroup.decode(header, memoryview(body), "a.pgz") == tensorfile.dumps(tensors, meta, checksums=False)


def test_a_damaged_or_lying_zpaq_stream_is_refused():
    tensors, meta = tensorfile.loads(structured_file(), "q")
    body, streams = pergroup.encode(tensors, meta, 2, ZPAQ["sort_rows"], codecs=("zpaq",))
    first = streams[0]["body_bytes"]
    cut = [dict(s) for s in streams]
    cut[0]["payload_bytes"] -= 1  # ZPAQ decodes the whole stream; the promise still holds it to its length
    for bad_body, bad_streams, msg in [(bytes([body[0] ^ 1]) + body[1:], streams, "compressed stream is corrupt"),
                                      (body[:first - 3] + bytes(3) + body[first:], streams, "a.pgz"),
                                      (body, cut, "decompressed to .* its header says")]:
        with pytest.raises(pergroup.PergroupError, match=msg):
            pergroup.decode({"streams": bad_streams, "shuffle": 2}, memoryview(bad_body), "a.pgz")


def test_config_refuses_zpaq_streams_without_pergroup():
    with pytest.raises(ConfigError, match="compress.zpaq: .* needs codec pergroup"):
        validate({"compress": {"codec": "brotli", "zpaq": True}})
    assert validate({"compress": {"codec": "zpaq"}})["compress"]["level"] == 5


def test_the_artifact_reader_imports_zpaq_only_for_a_zpaq_stream():
    """The packed train_gpt.py imports the codecs: an artifact without a zpaq stream must decode
    where the zpaq package is not installed."""
    code = "import sys, pgolf.quant.artifact, pgolf.quant.pergroup; sys.exit('zpaq' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
