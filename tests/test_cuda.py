"""The CUDA paths (bf16 autocast, torch.compile, SDPA or FlashAttention 3, NCCL-free single GPU).
Skipped where there is no GPU; run them on one with `python -m pytest tests/test_cuda.py`."""

import pytest
import torch

from pgolf.config import validate
from pgolf.model import GPT, token_losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SWITCHES = {"num_layers": 4, "model_dim": 128, "num_heads": 4, "num_kv_heads": 2, "activation": "leaky_relu2",
            "rope_dims": 16, "ln_scale": True, "xsa_last_n": 2, "bigram_buckets": 64, "smear_gate": True,
            "ve_layers": [3], "skip": "gated", "recur_layers": [1, 2], "parallel_from": 2, "qat_bits": 6}


def test_bf16_compiled_forward_matches_eager():
    torch.manual_seed(0)
    model = GPT(256, validate({"model": SWITCHES})["model"]).cuda()
    x = torch.randint(0, 256, (4, 128), device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        eager = token_losses(model, x, x)
        compiled = token_losses(torch.compile(model), x, x)
    torch.testing.assert_close(compiled, eager, atol=2e-2, rtol=2e-2)
    model.set_qat(True)
    with torch.autocast("cuda", torch.bfloat16):
        assert not torch.allclose(token_losses(torch.compile(model), x, x), compiled)


def test_bench_runs_a_compiled_step_on_the_gpu(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "-m", "pgolf", "bench", "config.yaml", "configs/smoke.yaml", "--device", "cuda",
                    "--steps", "3", "--warmup", "2", "--json", str(out)], cwd=root, check=True)
    r = json.loads(out.read_text())
    assert r["compiled"] and r["ms_per_step"] > 0
