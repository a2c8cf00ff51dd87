import json

import pytest
import torch

from pgolf import tensorfile
from pgolf.quant import artifact
from pgolf.quant.compress import BudgetError, check_size, compress
from pgolf.quant.quantize import load_quantized, quantize
from pgolf.quant.rtn import dequantize_rows, quantize_rows

QUANT = {"method": "rtn", "bits": 8, "clip_quantile": 1.0, "min_numel": 64}
COMPRESS = {"codec": "zstd", "level": 3, "budget_bytes": 16_000_000}


def test_rtn_error_is_at_most_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    for bits in (8, 6, 4):
        codes, scale = quantize_rows(w, bits, 1.0)
        assert codes.abs().max() <= 2 ** (bits - 1) - 1
        err = (dequantize_rows(codes, scale) - w).abs()
        # the fp16 scale rounds a little, hence the small slack
        assert bool((err <= scale.float()[:, None] / 2 * 1.01 + 1e-6).all())


def test_clipping_bounds_outliers():
    w = torch.randn(4, 1000)
    w[0, 0] = 100.0
    codes, scale = quantize_rows(w, 8, 0.99)
    assert dequantize_rows(codes, scale)[0, 0] < 10  # the outlier is clipped to the row's quantile
    assert scale[0] < 100 / 127


def test_quantize_file_round_trip(tmp_path):
    state = {"big": torch.randn(8, 32), "small": torch.randn(4, 4), "gain": torch.ones(4)}
    tensorfile.save(tmp_path / "w.pgt", state, {"vocab_size": 5, "model": {}})
    quantize(tmp_path / "w.pgt", QUANT, tmp_path / "q.pgt")
    tensors, meta = tensorfile.load(tmp_path / "q.pgt")
    assert meta["quant"]["plan"] == {"big": "rtn", "small": "fp16", "gain": "fp32"}
    assert tensors["big.codes"].dtype == torch.int8 and tensors["small"].dtype == torch.float16
    back = load_quantized(tensors, meta)
    assert torch.equal(back["gain"], state["gain"])
    torch.testing.assert_close(back["big"], state["big"], atol=0.05, rtol=0)


def test_artifact_round_trip_is_bit_exact(tmp_path):
    raw = tensorfile.dumps({"x": torch.randn(100)}, {"a": 1})
    (tmp_path / "q.pgt").write_bytes(raw)
    compress(tmp_path / "q.pgt", COMPRESS, tmp_path / "a.pgz")
    assert artifact.read_artifact(tmp_path / "a.pgz") == raw


@pytest.fixture
def good_artifact(tmp_path):
    raw = tensorfile.dumps({"x": torch.arange(1000.0)})
    artifact.write_artifact(tmp_path / "a.pgz", raw, "zstd", 3)
    return tmp_path / "a.pgz", bytearray((tmp_path / "a.pgz").read_bytes())


def test_truncated_artifact_fails_cleanly(good_artifact):
    path, data = good_artifact
    path.write_bytes(bytes(data[:-20]))
    with pytest.raises(artifact.ArtifactError, match=r"a\.pgz: .*(corrupt|truncated)"):
        artifact.read_artifact(path)
    path.write_bytes(bytes(data[:10]))
    with pytest.raises(artifact.ArtifactError, match="truncated"):
        artifact.read_artifact(path)


def test_bit_flip_fails_cleanly(good_artifact):
    path, data = good_artifact
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(artifact.ArtifactError, match=r"a\.pgz: (checksum mismatch|compressed data is corrupt|decomp)"):
        artifact.read_artifact(path)


def test_lying_header_cannot_force_a_large_allocation(good_artifact):
    path, data = good_artifact
    hlen = int.from_bytes(data[12:20], "little")
    header = json.loads(data[20 : 20 + hlen])
    for promise in (artifact.MAX_RAW_BYTES + 1, 10):
        fake = json.dumps({**header, "raw_bytes": promise}).encode()
        path.write_bytes(bytes(data[:12]) + len(fake).to_bytes(8, "little") + fake + bytes(data[20 + hlen :]))
        with pytest.raises(artifact.ArtifactError, match=r"a\.pgz: (header promises|decompressed to)"):
            artifact.read_artifact(path)
    path.write_bytes(b"NOTOURS!" + bytes(data[8:]))
    with pytest.raises(artifact.ArtifactError, match="bad magic"):
        artifact.read_artifact(path)


def test_size_counts_code_and_fails_over_budget(good_artifact, tmp_path):
    path, _ = good_artifact
    report = check_size(path, COMPRESS, tmp_path / "size.json")
    assert report["model_bytes"] == path.stat().st_size
    assert report["code_bytes"] == sum(report["code_files"].values()) > 10_000
    assert report["total_bytes"] == report["model_bytes"] + report["code_bytes"] and report["fits"]
    tight = {**COMPRESS, "budget_bytes": report["total_bytes"] - 123}
    with pytest.raises(BudgetError, match="123 over the"):
        check_size(path, tight, tmp_path / "size2.json")
    assert not (tmp_path / "size2.json").exists()


def test_all_zero_rows_stay_zero_and_finite():
    w = torch.randn(3, 64)
    w[1] = 0.0
    codes, scale = quantize_rows(w, 8, 0.99)
    back = dequantize_rows(codes, scale)
    assert bool(torch.isfinite(back).all()) and not back[1].any()
