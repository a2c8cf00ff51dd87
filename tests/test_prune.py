"""Pruning to the cap: the codes of least Hessian-weighted error go first, the search needs few
encodes, and evaluate and aggregate report how many codes went and what they cost in BPB."""


import pytest
import torch
from conftest import run_files

from pgolf.config import validate
from pgolf.eval.evaluate import measure
from pgolf.formats import tensorfile
from pgolf.formats.results import write_result
from pgolf.quant import artifact, compress
from pgolf.report.aggregate import aggregate

COMPRESS = {**validate({})["compress"], "codec": "zstd", "level": 3, "shuffle": 0}


def quantized(rows: int = 48, cols: int = 64, seed: int = 0) -> tuple[bytes, torch.Tensor]:
    """A quantized tensor file with one int6 matrix of mostly small codes, and a Hessian for it."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.clamp(torch.round(torch.randn(rows, cols, generator=g) * 1.5), -31, 31).to(torch.int8)
    tensors = {"m.weight.codes": codes, "m.weight.scale": (torch.rand(rows, generator=g) + 0.5).half()}
    meta = {"vocab_size": 7, "quant": {"method": "gptq", "plan": {"m.weight": "int"}, "bits": {"m.weight": 6}}}
    x = torch.randn(256, cols, generator=g) * torch.logspace(-1, 1, cols)  # columns of very different energy
    return tensorfile.dumps(tensors, meta), x.T @ x / 256


def test_hessian_weighted_pruning_zeroes_the_least_output_error_first():
    raw, h = quantized()
    full = len(artifact.encode(raw, COMPRESS))
    data, n = compress.prune_to_fit(raw, COMPRESS, full - 150, hessians={"m.weight": h})
    assert 0 < n and len(data) <= full - 150
    before = tensorfile.loads(raw, "q")[0]
    after = tensorfile.loads(artifact.decode(data), "a")[0]
    ones = before["m.weight.codes"].abs() == 1
    error = before["m.weight.scale"].float()[:, None].square() * h.diagonal()[None, :]
    pruned = (after["m.weight.codes"] == 0) & ones
    assert int(pruned.sum()) == n and error[pruned].max() <= error[ones & ~pruned].min()
    # without the Hessian the order is the row scale's alone, as the records prune: other codes go
    unweighted, m = compress.prune_to_fit(raw, COMPRESS, full - 150)
    assert not torch.equal(tensorfile.loads(artifact.decode(unweighted), "a")[0]["m.weight.codes"],
                           after["m.weight.codes"])


def test_search_lands_within_tolerance_in_few_encodes(monkeypatch):
    sizes = []

    def fake_size(n: int) -> int:  # about linear, with the wobble of a real codec
        sizes.append(n)
        return 1_000_000 - 3 * n + (n * 7919) % 23

    lo_size, hi_size = fake_size(0), fake_size(200_000)
    n = compress._search(fake_size, 0, 200_000, lo_size, hi_size, 700_000)
    size, tolerance = fake_size(n), int(compress.SEARCH_TOLERANCE * 700_000)
    assert 700_000 - tolerance <= size <= 700_000
    assert len(sizes) - 3 <= 6  # a bisection alone takes about 17


def test_compress_reads_hessians_and_keeps_the_code_reserve(tmp_path):
    raw, h = quantized()
    (tmp_path / "q.pgt").write_bytes(raw)
    tensorfile.save(tmp_path / "h.pgt", {"m.weight": h}, {})
    full = len(artifact.encode(raw, COMPRESS))
    cfg = {**COMPRESS, "prune": True, "budget_bytes": full + 100, "code_reserve": 250}
    n = compress.compress(tmp_path / "q.pgt", cfg, tmp_path / "a.pgz", tmp_path / "h.pgt")
    expect, pruned = compress.prune_to_fit(raw, cfg, full - 150, hessians={"m.weight": h})
    assert n == len(expect) <= full - 150 and (tmp_path / "a.pgz").read_bytes() == expect
    assert artifact.read_header(tmp_path / "a.pgz")["pruned_codes"] == pruned > 0


def test_evaluate_scores_before_and_after_pruning(setup, tmp_path):
    raw = (setup.artifact.parent / "q.pgt").read_bytes()
    full = len(artifact.encode(raw, COMPRESS))
    data, n = compress.prune_to_fit(raw, COMPRESS, full - 50)  # int8 codes: few are +-1
    (tmp_path / "pruned.pgz").write_bytes(data)
    cfg = validate({"eval": {"seq_len": 32, "stride": 16, "batch_seqs": 8, "max_tokens": 600}})["eval"]
    cpu = torch.device("cpu")
    pruned = measure(cfg, setup.data, setup.tokenizer, setup.ema, tmp_path / "pruned.pgz", 0, 1, cpu,
                     unpruned=setup.artifact.parent / "q.pgt")
    plain = measure(cfg, setup.data, setup.tokenizer, setup.ema, setup.artifact, 0, 1, cpu)
    assert pruned["pruned_codes"] == n > 0 and plain["pruned_codes"] == 0
    assert pruned["unpruned"]["val_bpb"] == plain["post_quant"]["val_bpb"]  # the same codes, scored the same
    assert pruned["prune_cost_bpb"] == pruned["post_quant"]["val_bpb"] - plain["post_quant"]["val_bpb"] != 0
    assert plain["unpruned"] == plain["post_quant"] and plain["prune_cost_bpb"] == 0


def test_summary_reports_pruned_codes_and_the_bpb_before_pruning(tmp_path):
    for seed, pruned in ((1, 0), (2, 5000)):
        d = tmp_path / f"seed{seed}"
        d.mkdir()
        part = {"val_bpb": 1.5 + pruned / 1e6, "val_loss": 1.0, "tokens": 100, "bytes": 300}
        ev = {"pre_quant": part, "post_quant": part, "sliding": part, "quant_gap_bpb": 0.0, "pruned_codes": pruned,
              "unpruned": {**part, "val_bpb": 1.5}, "prune_cost_bpb": pruned / 1e6}
        write_result(d / "eval.json", ev)
        write_result(d / "size.json", {"model_bytes": 10, "total_bytes": 20, "pruned_codes": pruned})
        write_result(d / "train.json", {"steps": 5, "train_seconds": 1.0, "tokens_per_s": 9.0})
    summary = aggregate("r", run_files(tmp_path, [1, 2]))
    assert [r["pruned_codes"] for r in summary["seeds"]] == [0, 5000]
    assert summary["mean"]["unpruned_bpb"] == 1.5 and summary["mean"]["prune_cost_bpb"] == pytest.approx(0.0025)
