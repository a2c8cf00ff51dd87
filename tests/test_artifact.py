"""The artifact: bit-exact round trip, clean refusal of damaged or lying files, and the size check."""

import json

import pytest
import torch

from pgolf import tensorfile
from pgolf.provenance import PACKAGE
from pgolf.quant import artifact
from pgolf.quant.compress import BudgetError, check_size, compress, size_cli

COMPRESS = {"codec": "zstd", "level": 3, "budget_bytes": 16_000_000}


def test_artifact_round_trip_is_bit_exact(tmp_path):
    codes = torch.randint(-127, 127, (50, 50), dtype=torch.int8)
    raw = tensorfile.dumps({"x": torch.randn(1000), "c": codes}, {"a": 1})
    (tmp_path / "q.pgt").write_bytes(raw)
    n = compress(tmp_path / "q.pgt", COMPRESS, tmp_path / "a.pgz")
    assert n == (tmp_path / "a.pgz").stat().st_size
    assert artifact.read_artifact(tmp_path / "a.pgz") == raw


@pytest.fixture
def good_artifact(tmp_path):
    raw = tensorfile.dumps({"x": torch.arange(1000.0)})
    artifact.write_artifact(tmp_path / "a.pgz", raw, "zstd", 3)
    return tmp_path / "a.pgz", bytearray((tmp_path / "a.pgz").read_bytes())


def _with_header(data: bytearray, **changes) -> bytes:
    hlen = int.from_bytes(data[12:20], "little")
    header = {**json.loads(data[20 : 20 + hlen]), **changes}
    fake = json.dumps(header).encode()
    return bytes(data[:12]) + len(fake).to_bytes(8, "little") + fake + bytes(data[20 + hlen :])


def test_truncated_artifact_fails_cleanly(good_artifact):
    path, data = good_artifact
    for cut, why in ((len(data) - 20, "corrupt|truncated"), (30, "truncated"), (10, "truncated")):
        path.write_bytes(bytes(data[:cut]))
        with pytest.raises(artifact.ArtifactError, match=rf"a\.pgz: .*({why})"):
            artifact.read_artifact(path)


def test_bit_flip_fails_cleanly(good_artifact):
    path, data = good_artifact
    for pos in (-5, len(data) // 2 + 40):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        path.write_bytes(bytes(flipped))
        with pytest.raises(artifact.ArtifactError, match=r"a\.pgz: (checksum mismatch|compressed data)"):
            artifact.read_artifact(path)
    path.write_bytes(_with_header(data, sha256="0" * 64))
    with pytest.raises(artifact.ArtifactError, match=r"a\.pgz: checksum mismatch"):
        artifact.read_artifact(path)


def test_lying_header_cannot_force_a_large_allocation(good_artifact):
    path, data = good_artifact
    real = len(artifact.read_artifact(path))
    cases = [(artifact.MAX_RAW_BYTES + 1, "header promises"), (-1, "header promises"),
             ("9", "header promises"), (10, "decompressed to 11 bytes, header promises 10"),
             (real + 1, f"decompressed to {real} bytes")]
    for promise, msg in cases:
        path.write_bytes(_with_header(data, raw_bytes=promise))
        with pytest.raises(artifact.ArtifactError, match=rf"a\.pgz: {msg}"):
            artifact.read_artifact(path)
    path.write_bytes(_with_header(data, codec="lzma"))
    with pytest.raises(artifact.ArtifactError, match="unknown codec 'lzma'"):
        artifact.read_artifact(path)
    path.write_bytes(b"NOTOURS!" + bytes(data[8:]))
    with pytest.raises(artifact.ArtifactError, match="bad magic"):
        artifact.read_artifact(path)
    with pytest.raises(artifact.ArtifactError, match="missing.pgz: file not found"):
        artifact.read_artifact(path.parent / "missing.pgz")


def test_size_counts_code_and_model_bytes(good_artifact, tmp_path):
    path, _ = good_artifact
    report = check_size(path, COMPRESS, tmp_path / "size.json")
    assert json.loads((tmp_path / "size.json").read_text()) == report
    assert report["model_bytes"] == path.stat().st_size
    sources = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)
    assert report["code_files"] == {f"pgolf/{p.relative_to(PACKAGE)}": len(p.read_bytes()) for p in sources}
    assert report["code_bytes"] == sum(len(p.read_bytes()) for p in sources)
    assert report["total_bytes"] == report["model_bytes"] + report["code_bytes"]
    assert report["fits"] and report["headroom_bytes"] == 16_000_000 - report["total_bytes"]
    assert report["codec"] == "zstd" and report["budget_bytes"] == 16_000_000


def test_over_budget_fails_with_the_amount(good_artifact, tmp_path):
    path, _ = good_artifact
    total = check_size(path, COMPRESS, tmp_path / "size.json")["total_bytes"]
    tight = {**COMPRESS, "budget_bytes": total - 1234}
    with pytest.raises(BudgetError, match="1,234 over the"):
        check_size(path, tight, tmp_path / "size2.json")
    with pytest.raises(SystemExit, match=r"pgolf size: .*1,234 over the .*-byte budget"):
        size_cli(["--artifact", str(path), "--cfg", json.dumps(tight), "--out", str(tmp_path / "size2.json")])
    assert not (tmp_path / "size2.json").exists()
