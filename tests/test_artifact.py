"""The artifact: bit-exact round trip with every codec, clean refusal of damaged or lying files,
pruning to a target, and the size check."""

import json
import re

import pytest
import torch

from pgolf.cli import main
from pgolf.config import validate
from pgolf.formats import tensorfile
from pgolf.formats.results import read_result
from pgolf.pipeline import bundle
from pgolf.quant import artifact
from pgolf.quant.compress import BudgetError, compress, prune_to_fit
from pgolf.quant.size import check_size

COMPRESS = {**validate({})["compress"], "codec": "zstd", "level": 3, "pack": True, "shuffle": 2}


def quantized_file(rows: int = 40, cols: int = 50, bits: int = 5, seed: int = 0, std: float = 5.0) -> bytes:
    """A small quantized tensor file as pgolf quantize writes it, codes near-Gaussian like real ones."""
    g = torch.Generator().manual_seed(seed)
    qmax = 2 ** (bits - 1) - 1
    codes = torch.clamp(torch.round(torch.randn(rows, cols, generator=g) * std), -qmax, qmax).to(torch.int8)
    tensors = {"m.weight.codes": codes, "m.weight.scale": torch.rand(rows, generator=g).half() + 0.01,
               "emb.weight.codes": torch.randint(-127, 128, (7, 9), generator=g, dtype=torch.int8),
               "emb.weight.scale": torch.rand(7, generator=g).half(), "gain": torch.randn(5, generator=g)}
    meta = {"vocab_size": 7, "quant": {"method": "gptq", "plan": {"m.weight": "int", "emb.weight": "int",
                                                                  "gain": "fp32"},
                                       "bits": {"m.weight": bits, "emb.weight": 8}}}
    return tensorfile.dumps(tensors, meta)


@pytest.mark.parametrize("codec,level", [("zstd", 3), ("brotli", 5), ("lzma", 1), ("zpaq", 3)])
@pytest.mark.parametrize("pack,shuffle", [(False, 0), (True, 2), (True, 3)])
def test_artifact_round_trip_is_bit_exact(tmp_path, codec, level, pack, shuffle):
    raw = quantized_file()
    (tmp_path / "q.pgt").write_bytes(raw)
    cfg = {**COMPRESS, "codec": codec, "level": level, "pack": pack, "shuffle": shuffle}
    n = compress(tmp_path / "q.pgt", cfg, tmp_path / "a.pgz")
    assert n == (tmp_path / "a.pgz").stat().st_size
    assert artifact.read_artifact(tmp_path / "a.pgz") == raw
    header = artifact.read_header(tmp_path / "a.pgz")
    assert header["codec"] == codec and header["shuffle"] == shuffle and header["params"] == 40 * 50 + 63 + 5
    assert header["packed"] == ({"m.weight.codes": [5, [40, 50]]} if pack else {})
    # The payload is the tensor file without its per-tensor digests (the artifact's sha256 covers it).
    slim = len(tensorfile.dumps(*tensorfile.loads(raw, "q.pgt"), checksums=False))
    assert header["raw_bytes"] == slim < len(raw) - 3 * 64
    if pack:  # 5-bit codes take 5/8 of a byte before the codec sees them (the JSON header moves a little)
        assert abs(header["payload_bytes"] - (slim - 40 * 50 + 40 * 50 * 5 // 8)) < 16


@pytest.fixture
def good_artifact(tmp_path):
    artifact.write_artifact(tmp_path / "a.pgz", quantized_file(), COMPRESS)
    return tmp_path / "a.pgz", bytearray((tmp_path / "a.pgz").read_bytes())


def _with_header(data: bytearray, **changes) -> bytes:
    hlen = int.from_bytes(data[12:20], "little")
    header = {**json.loads(data[20 : 20 + hlen]), **changes}
    fake = json.dumps(header).encode()
    return bytes(data[:12]) + len(fake).to_bytes(8, "little") + fake + bytes(data[20 + hlen :])


def test_truncated_artifact_fails_cleanly(good_artifact):
    path, data = good_artifact
    for cut, why in ((len(data) - 1, "truncated"), (len(data) - 20, "truncated"), (30, "truncated"),
                     (10, "truncated")):
        path.write_bytes(bytes(data[:cut]))
        with pytest.raises(artifact.ArtifactError, match=rf"a\.pgz: .*{why}"):
            artifact.read_artifact(path)


@pytest.mark.parametrize("codec", ["zstd", "brotli", "lzma"])
def test_a_cut_stream_fails_even_when_the_header_agrees(tmp_path, codec):
    data = bytearray(artifact.encode(quantized_file(), {**COMPRESS, "codec": codec, "level": 1}))
    body = json.loads(data[20 : 20 + int.from_bytes(data[12:20], "little")])["body_bytes"]
    for cut in (1, 10, body // 2):
        with pytest.raises(artifact.ArtifactError, match="corrupt|truncated"):
            artifact.decode(_with_header(bytearray(data[:-cut]), body_bytes=body - cut))


def test_bit_flips_fail_cleanly(good_artifact):
    path, data = good_artifact
    hlen = int.from_bytes(data[12:20], "little")
    for pos in range(20 + hlen, len(data), 7):  # every seventh byte of the compressed body
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        path.write_bytes(bytes(flipped))
        with pytest.raises(artifact.ArtifactError, match=r"a\.pgz: (checksum|compressed data|decompressed to|"
                                                         r"payload is corrupt|packed tensor|rebuilt)"):
            artifact.read_artifact(path)
    path.write_bytes(_with_header(data, sha256="0" * 64))
    with pytest.raises(artifact.ArtifactError, match=r"a\.pgz: checksum mismatch"):
        artifact.read_artifact(path)


def test_oversized_files_fail_before_any_large_allocation(good_artifact, monkeypatch):
    path, data = good_artifact
    path.write_bytes(bytes(data) + b"\0" * 100)
    with pytest.raises(artifact.ArtifactError, match=r"a\.pgz: the body is .* \(truncated, or bytes appended\)"):
        artifact.read_artifact(path)
    path.write_bytes(bytes(data))
    monkeypatch.setattr(artifact, "MAX_FILE_BYTES", len(data) - 1)
    with pytest.raises(artifact.ArtifactError, match=r"a\.pgz: .* bytes is over the .*-byte limit"):
        artifact.read_artifact(path)


def test_lying_header_cannot_force_a_large_allocation(good_artifact):
    path, data = good_artifact
    payload = artifact.read_header(path)["payload_bytes"]
    cases = [({"payload_bytes": artifact.MAX_RAW_BYTES + 1}, "header promises"),
             ({"raw_bytes": -1}, "header promises"), ({"payload_bytes": "9"}, "header promises"),
             ({"payload_bytes": 10}, "decompressed to 11 bytes, header promises 10"),
             ({"payload_bytes": payload + 1}, f"decompressed to {payload} bytes"),
             ({"raw_bytes": 5}, "rebuilt .* header promises 5"),
             ({"packed": {"m.weight.codes": [5, [4000, 5000]]}}, "packed tensor 'm.weight.codes' is damaged"),
             ({"packed": {"nope": [5, [2]]}}, "packed tensor 'nope' is damaged"),
             ({"shuffle": -1}, "bad shuffle stride"), ({"codec": "gzip"}, "unknown codec 'gzip'")]
    for change, msg in cases:
        path.write_bytes(_with_header(data, **change))
        with pytest.raises(artifact.ArtifactError, match=rf"a\.pgz: {msg}"):
            artifact.read_artifact(path)
    path.write_bytes(b"NOTOURS!" + bytes(data[8:]))
    with pytest.raises(artifact.ArtifactError, match="bad magic"):
        artifact.read_artifact(path)
    with pytest.raises(artifact.ArtifactError, match="missing.pgz: file not found"):
        artifact.read_artifact(path.parent / "missing.pgz")


def test_pruning_fits_the_target_with_the_fewest_smallest_codes(tmp_path):
    raw = quantized_file(rows=64, cols=64, bits=6, std=1.5)
    cfg = {**COMPRESS, "pack": False}
    full = len(artifact.encode(raw, cfg))
    data, n = prune_to_fit(raw, cfg, full - 300)
    assert len(data) <= full - 300 and n > 0
    back, _ = tensorfile.loads(artifact.decode(data), "a.pgz")
    before, _ = tensorfile.loads(raw, "q.pgt")
    pruned, kept = [], []  # impacts (row scale^2) of the +-1 codes zeroed and of those left
    for name in ("m.weight", "emb.weight"):
        old_codes, new_codes = before[f"{name}.codes"], back[f"{name}.codes"]
        changed = old_codes != new_codes
        assert bool((old_codes[changed].abs() == 1).all()) and not new_codes[changed].any()
        impact = before[f"{name}.scale"].float().square()[:, None].expand_as(old_codes)
        pruned.append(impact[changed])
        kept.append(impact[(old_codes.abs() == 1) & ~changed])
    pruned, kept = torch.cat(pruned), torch.cat(kept)
    assert len(pruned) == n and pruned.max() <= kept.min()
    assert artifact.decode(prune_to_fit(raw, cfg, full)[0]) == raw  # fits already: nothing pruned
    with pytest.raises(BudgetError, match="pruning all .* still leaves"):
        prune_to_fit(raw, cfg, 100)


def test_size_counts_code_and_model_bytes(good_artifact, tmp_path):
    path, _ = good_artifact
    report = check_size(path, COMPRESS, tmp_path / "size.json")
    assert read_result(tmp_path / "size.json") == report
    assert report["model_bytes"] == path.stat().st_size
    assert report["code_bytes"] == len(bundle.build()) and report["code_file"] == "train_gpt.py"
    assert "pgolf/model/gpt.py" in report["code_sources"] and "pgolf/config.py" not in report["code_sources"]
    assert report["total_bytes"] == report["model_bytes"] + report["code_bytes"]
    assert report["fits"] and report["headroom_bytes"] == 16_000_000 - report["total_bytes"]
    assert report["codec"] == "zstd" and report["budget_bytes"] == 16_000_000 and report["pruned_codes"] == 0
    assert report["bytes_per_param"] == report["model_bytes"] / report["params"]


def test_over_budget_fails_with_the_amount(good_artifact, tmp_path, capsys):
    path, _ = good_artifact
    total = check_size(path, COMPRESS, tmp_path / "size.json")["total_bytes"]
    tight = {**COMPRESS, "budget_bytes": total - 1234}
    with pytest.raises(BudgetError, match="1,234 over the .* compress.prune"):
        check_size(path, tight, tmp_path / "size2.json")
    with pytest.raises(SystemExit, match="^1$"):
        main(["size", "--artifact", str(path), "--cfg", json.dumps(tight), "--out", str(tmp_path / "size2.json")])
    assert re.fullmatch(r"pgolf size: .*1,234 over the .*-byte budget.*\n", capsys.readouterr().err)
    assert not (tmp_path / "size2.json").exists()


def test_compress_prunes_to_budget_minus_code_reserve(tmp_path):
    (tmp_path / "q.pgt").write_bytes(quantized_file(rows=64, cols=64, bits=6, std=1.5))
    full = compress(tmp_path / "q.pgt", COMPRESS, tmp_path / "a.pgz")
    cfg = {**COMPRESS, "prune": True, "budget_bytes": full + 1000, "code_reserve": 1200}
    n = compress(tmp_path / "q.pgt", cfg, tmp_path / "b.pgz")
    assert n <= full - 200 and artifact.read_header(tmp_path / "b.pgz")["pruned_codes"] > 0
    report = check_size(tmp_path / "b.pgz", {**cfg, "budget_bytes": 16_000_000}, tmp_path / "size.json")
    assert report["pruned_codes"] == artifact.read_header(tmp_path / "b.pgz")["pruned_codes"]
