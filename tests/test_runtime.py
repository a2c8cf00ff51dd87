"""One code path for CPU and GPU: bf16 autocast, torch.compile (inductor, as on CUDA), compile
priming outside the clock, and the checks that stop a run before it produces a wrong number."""

import json

import pytest
import torch
from test_switches import BASE, randomize, tokens
from test_train import baseline, losses, train  # noqa: F401  (baseline is a fixture)

from pgolf.config import validate
from pgolf.eval.evaluate import measure
from pgolf.eval.windows import window_batch
from pgolf.formats import tensorfile
from pgolf.model.gpt import GPT
from pgolf.optim.muon import newton_schulz
from pgolf.runtime.device import autocast, bf16
from pgolf.runtime.distributed import setup_distributed

# Every phase switch at once: recurrence from step 5, late QAT and SWA once the LR falls, shuffled loader.
PHASED = {"model": {"qat_bits": 6, "recur_layers": [1], "recur_start_step": 5},
          "train": {"qat_below": 0.6, "swa": True, "swa_every": 1, "swa_below": 0.6}}


def test_precision_is_data_not_a_device_branch():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not bf16(cpu, "auto") and bf16(cuda, "auto") and bf16(cpu, "bf16") and not bf16(cuda, "fp32")
    with autocast(cpu, "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with autocast(cpu, "auto"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision 'fp16'"):
        bf16(cpu, "fp16")


def test_newton_schulz_runs_in_the_precisions_dtype():
    """Muon's iteration dtype is data too (bf16 under bf16 precision, on any device), not a CUDA branch."""
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    fp32, half = newton_schulz(g, 5), newton_schulz(g, 5, dtype=torch.bfloat16)
    assert half.dtype == fp32.dtype == torch.float32 and not torch.equal(half, fp32)
    assert (half - fp32).abs().max() < 0.05


def test_bf16_autocast_trains_on_cpu(baseline, tiny_dataset, tmp_path):  # noqa: F811
    """The trainer's autocast line, on: the CPU runs what a GPU runs, and the run still learns."""
    train(tiny_dataset, tmp_path, precision="bf16")
    got, ref = losses(tmp_path), losses(baseline)
    assert got != ref and all(abs(a - b) < 0.1 for a, b in zip(got, ref, strict=True))
    assert got[-1] < got[0] - 0.5
    assert json.loads((tmp_path / "train.json").read_text())["precision"] == "bf16"


def test_a_primed_run_equals_an_unprimed_one_step_for_step(tiny_dataset, tmp_path):
    """Priming runs real steps (both recurrence phases), then restores weights, optimizers, EMA, SWA,
    the shuffled loader and the RNG: the run after it is bit for bit the run without it."""
    loader = json.dumps({"mode": "shuffled"})
    train(tiny_dataset, tmp_path / "plain", model=PHASED["model"], loader=loader, **PHASED["train"])
    proc = train(tiny_dataset, tmp_path / "primed", model=PHASED["model"], loader=loader, prime_steps=5,
                 **PHASED["train"])
    assert "primed 10 steps" in proc.stdout and "outside the training clock" in proc.stdout
    assert losses(tmp_path / "primed") == losses(tmp_path / "plain")
    for name in ("ema.pgt", "raw.pgt"):
        a, _ = tensorfile.load(tmp_path / "primed" / name)
        b, _ = tensorfile.load(tmp_path / "plain" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    summary = json.loads((tmp_path / "primed" / "train.json").read_text())
    assert summary["prime_seconds"] > 0 and summary["train_seconds"] > 0


def test_a_diverged_run_stops_at_its_first_non_finite_loss(tiny_dataset, tmp_path):
    proc = train(tiny_dataset, tmp_path, stop_after=99, matrix_lr=1e6, scalar_lr=1e6, embed_lr=1e6)
    assert proc.returncode == 1
    assert "loss became non-finite" in proc.stdout + proc.stderr
    assert not any((tmp_path / name).exists() for name in ("ema.pgt", "raw.pgt", "train.json", "metrics.parquet"))


def test_late_qat_acts_under_inductor():
    """torch.compile's default backend (inductor, what CUDA runs) keeps the QAT switch live: the
    compiled model follows set_qat without a recompile and matches eager both ways."""
    model = randomize(GPT(64, validate({"model": {**BASE, "qat_bits": 6}})["model"]))
    x = tokens()
    compiled = torch.compile(model)
    plain = compiled(x)
    torch.testing.assert_close(plain, model(x), atol=1e-4, rtol=1e-4)
    model.set_qat(True)
    fake = compiled(x)
    torch.testing.assert_close(fake, model(x), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(fake, plain, atol=1e-3)


def test_compiled_evaluation_matches_eager(setup, tmp_path):
    """eval.compile true on CPU (inductor) gives eager's numbers: pre/post-quant, sliding and TTT scoring."""
    cfg = validate({"eval": {"seq_len": 32, "stride": 16, "batch_seqs": 5, "max_tokens": 700,
                             "ttt": {"enabled": True, "chunk_tokens": 256, "epochs": 1, "batch_seqs": 4}}})["eval"]
    paths = (setup.data, setup.tokenizer, setup.ema, setup.artifact, 0, 1, torch.device("cpu"))
    eager = measure({**cfg, "compile": False}, *paths)
    fast = measure({**cfg, "compile": True}, *paths)
    for part in ("pre_quant", "post_quant", "sliding", "ttt"):
        assert fast[part]["tokens"] == eager[part]["tokens"] and fast[part]["bytes"] == eager[part]["bytes"]
        assert fast[part]["val_bpb"] == pytest.approx(eager[part]["val_bpb"], abs=1e-4), part


def test_the_last_window_batch_is_padded_to_the_full_shape():
    toks = torch.arange(100)
    b = window_batch(toks, [(0, 0), (10, 3)], 8, 4)
    assert b.shape == (4, 9) and torch.equal(b[2], b[0]) and torch.equal(b[1], toks[10:19])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_fails_at_once():
    with pytest.raises(ValueError, match="device: cuda, but this torch .* sees no CUDA GPU"):
        setup_distributed("cuda")
