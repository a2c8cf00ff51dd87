"""Document attention through FlexAttention: the same outputs as the masked SDPA it replaces, at a few
shapes, with and without GQA, and through the whole model; one mask per batch and one kernel per shape;
the masked SDPA where Flex cannot run (its backward on CPU); a failed compile says so in one line."""

import json

import pytest
import torch
from test_switches import ROOT, build, randomize

import pgolf.model.layers as layers
from pgolf.model.gpt import layer_order
from pgolf.model.layers import BlockMask, attend, doc_mask, exclusive, flex_runs

BOS = 1


def rows(B: int, T: int) -> torch.Tensor:
    """Token rows with BOS (1) at position 0 and inside row 0, none in row 1 (one document), and
    documents of 1 to T tokens after."""
    g = torch.Generator().manual_seed(3)
    idx = torch.randint(2, 64, (B, T), generator=g)
    idx[0, [0, 1, 7, T // 2, T - 1]] = BOS  # a boundary at 0, a one-token document, one at the end
    for r in range(2, B):
        idx[r, torch.randint(0, T, (3,), generator=g)] = BOS
    return idx


@pytest.mark.parametrize("B,T,heads,kv_heads,head_dim", [(3, 200, 4, 2, 16), (3, 200, 4, 4, 16), (2, 64, 2, 1, 8)])
def test_flex_matches_masked_sdpa(B, T, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, T, heads, head_dim, generator=g)
    k, v = (torch.randn(B, T, kv_heads, head_dim, generator=g) for _ in range(2))
    docs = (rows(B, T) == BOS).cumsum(1)
    with torch.no_grad():
        flex_mask, dense = doc_mask(docs, "auto"), doc_mask(docs, "sdpa")
        assert isinstance(flex_mask, BlockMask) and not isinstance(dense, BlockMask)
        y, ref = attend(q, k, v, "auto", flex_mask), attend(q, k, v, "auto", dense)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exclusive(y, v), exclusive(ref, v), atol=1e-5, rtol=1e-5)  # XSA after it
    # row 1 is one document: plain causal attention
    torch.testing.assert_close(y[1], attend(q[1:2], k[1:2], v[1:2])[0], atol=1e-5, rtol=1e-5)


def test_new_documents_compile_nothing():
    """A scoring loop compiles once per shape: a batch with other documents and values reuses the
    kernels of the first (its mask and documents are inputs to them, not guards)."""

    def score(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(1, 4, (2, 64), generator=g)  # BOS (1) at random: other documents each batch
        q, k = torch.randn(2, 64, 2, 8, generator=g), torch.randn(2, 64, 1, 8, generator=g)
        with torch.inference_mode():
            return attend(q, k, k, "auto", doc_mask((idx == BOS).cumsum(1), "auto"))

    score(0)
    with torch.compiler.set_stance("fail_on_recompile"):
        score(1)
        score(2)


def test_failed_compile_says_what_to_do(monkeypatch):
    """A compile that fails (no C++ compiler or Triton, a killed worker) stops with one line: Inductor's
    reason and the switch that runs without Flex."""
    from torch._inductor.exc import InductorError

    def broken(fn):
        def call(*args, **kwargs):
            raise InductorError(RuntimeError("InvalidCxxCompiler: no working C++ compiler\n(details)"), None)

        return call

    monkeypatch.setattr(layers, "_compiled", broken)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"create_block_mask failed to compile "
                                        r"\(InvalidCxxCompiler: no working C\+\+ compiler\); model.attention: sdpa"):
        doc_mask(torch.zeros(1, 16, dtype=torch.long), "auto")


def test_model_logits_flex_vs_masked_sdpa(monkeypatch):
    """The whole model with doc_attention (GQA, XSA, mixed lanes, a looped block): Flex's logits are
    masked SDPA's, and Flex's block mask is built once per forward, not once per layer."""
    over = {"doc_attention": True, "xsa_last_n": 4, "parallel_from": 2, "parallel_mode": "mixed_lanes",
            "recur_layers": [1], "attn_gate_window": 4}
    flex = randomize(build(**over))
    sdpa = build(**over, attention="sdpa")
    sdpa.load_state_dict(flex.state_dict())
    calls, fused = [], layers._fused
    monkeypatch.setattr(layers, "_fused", lambda fn: calls.append(fn.__name__) or fused(fn))
    x = rows(3, 150)
    with torch.no_grad():
        got, want = flex(x), sdpa(x)
    assert calls == ["create_block_mask"] + ["flex_attention"] * len(layer_order(flex.cfg, flex.recur_active))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_pass_takes_the_kernel_the_probe_allows():
    """With gradients on, the mask is Flex's only where Flex has a backward on the device (not on CPU
    in torch 2.13); either way the pass trains."""
    model = randomize(build(doc_attention=True))
    x = rows(2, 40)
    assert isinstance(doc_mask((x == BOS).cumsum(1), "auto"), BlockMask) == flex_runs("cpu", True)
    model(x).square().mean().backward()
    assert all(p.grad is not None for p in model.blocks[0].attn.parameters() if p.requires_grad)


def test_bench_times_the_forward(tmp_path, capsys):
    from pgolf.train.bench import cli

    (tmp_path / "docs.yaml").write_text("model: {doc_attention: true}\n")
    figures = tmp_path / "bench.json"
    files = [str(ROOT / "config.yaml"), str(ROOT / "configs/smoke.yaml"), str(tmp_path / "docs.yaml")]
    cli([*files, "--forward", "2", "--steps", "1", "--warmup", "1", "--device", "cpu", "--json", str(figures)])
    assert "forward without gradients of 2 x" in capsys.readouterr().out
    r = json.loads(figures.read_text())
    assert r["ms_per_forward"] > 0 and r["doc_attention"] and r["attention"] == "auto"
