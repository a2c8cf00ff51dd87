"""The CUDA paths (bf16 autocast, torch.compile, SDPA or FlashAttention 3, NCCL-free single GPU).
Skipped where there is no GPU; run them on one with `python -m pytest tests/test_cuda.py`. The same
lines run on CPU in tests/test_runtime.py (bf16 autocast and inductor work there too)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_switches import randomize
from test_train import losses, train

from pgolf.config import validate
from pgolf.eval.evaluate import measure
from pgolf.model.gpt import GPT, token_losses
from pgolf.runtime.device import autocast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SWITCHES = {"num_layers": 4, "model_dim": 128, "num_heads": 4, "num_kv_heads": 2, "activation": "leaky_relu2",
            "rope_dims": 16, "ln_scale": True, "xsa_last_n": 2, "bigram_buckets": 64, "smear_gate": True,
            "ve_layers": [3], "skip": "gated", "recur_layers": [1, 2], "parallel_from": 2, "qat_bits": 6}
CUDA = torch.device("cuda")


def test_bf16_compiled_forward_matches_eager_and_late_qat_acts():
    """The model is moved off its init first: at init every residual-writing matrix is zero, so QAT of
    the others cannot change the output, compiled or not (what made this test fail before)."""
    torch.manual_seed(0)
    model = randomize(GPT(256, validate({"model": SWITCHES})["model"])).cuda()
    x = torch.randint(0, 256, (4, 128), device="cuda")
    fast = torch.compile(model)
    with autocast(CUDA, "bf16"):
        eager, compiled = token_losses(model, x, x), token_losses(fast, x, x)
        torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
        model.set_qat(True)
        eager_qat, compiled_qat = token_losses(model, x, x), token_losses(fast, x, x)
    torch.testing.assert_close(compiled_qat, eager_qat, atol=2e-2, rtol=2e-2)
    assert (compiled_qat - compiled).abs().max() > 1e-2


def test_bench_runs_a_compiled_step_on_the_gpu(tmp_path):
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "pgolf", "bench", "config.yaml", "configs/smoke.yaml", "--device", "cuda",
                    "--steps", "3", "--warmup", "2", "--json", str(out)], cwd=root, check=True)
    r = json.loads(out.read_text())
    assert r["compiled"] and r["ms_per_step"] > 0 and r["precision"] == "auto"


def cuda_train(ds, out: Path, **over) -> subprocess.CompletedProcess:
    return train(ds, out, device="cuda", compile=True, **over)


def test_primed_compiled_training_on_the_gpu(tiny_dataset, tmp_path):
    """Compile happens in priming, outside the clock; the run after it matches an unprimed one."""
    plain = cuda_train(tiny_dataset, tmp_path / "plain")
    primed = cuda_train(tiny_dataset, tmp_path / "primed", prime_steps=3)
    assert "primed 3 steps" in primed.stdout, plain.stdout
    torch.testing.assert_close(losses(tmp_path / "primed"), losses(tmp_path / "plain"), atol=2e-2, rtol=1e-2)
    a = json.loads((tmp_path / "plain" / "train.json").read_text())
    b = json.loads((tmp_path / "primed" / "train.json").read_text())
    assert b["prime_seconds"] > 0 and b["train_seconds"] < a["train_seconds"]


def test_compiled_evaluation_on_the_gpu_matches_eager(setup):
    cfg = validate({"eval": {"seq_len": 32, "stride": 16, "batch_seqs": 5, "max_tokens": 700,
                             "ttt": {"enabled": True, "chunk_tokens": 256, "epochs": 1, "batch_seqs": 4}}})["eval"]
    paths = (setup.data, setup.tokenizer, setup.ema, setup.artifact, 0, 1, CUDA)
    eager = measure({**cfg, "compile": False}, *paths)
    fast = measure({**cfg, "compile": True}, *paths)
    for part in ("pre_quant", "post_quant", "sliding", "ttt"):
        assert fast[part]["val_bpb"] == pytest.approx(eager[part]["val_bpb"], abs=2e-3), part
