"""Quantization: round-to-nearest error bounds, the clips, the storage rule, groups and the file round trip."""

import pytest
import torch

from pgolf.config import validate
from pgolf.formats import tensorfile
from pgolf.model.gpt import GPT
from pgolf.quant.clip import row_quantile, row_scales, search_scale
from pgolf.quant.quantize import dequantize, group_of, quantize
from pgolf.quant.rtn import dequantize_rows, quantize_rows, storage_for

INT8 = {g: 8 for g in ("embed", "attn", "mlp", "other")}
QUANT = validate({"quant": {"method": "rtn", "clip": "quantile", "bits": INT8, "clip_quantile": 1.0,
                            "min_numel": 64}})["quant"]


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_rtn_error_is_at_most_half_a_step(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 256) * torch.logspace(-3, 1, 16)[:, None]
    codes, scale = quantize_rows(w, bits, 1.0)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and scale.dtype == torch.float16 and scale.shape == (16,)
    assert codes.abs().max() == qmax  # unclipped: each row's largest |w| lands near the top code
    err = (dequantize_rows(codes, scale) - w).abs()
    # the fp16 scale may round below max|w|/qmax, so the row maximum can overshoot by qmax rounding steps
    bound = scale.float()[:, None] / 2 + (w.abs().amax(1) - qmax * scale.float())[:, None].clamp_min(0)
    assert bool((err <= bound + 1e-7).all())


def test_int8_is_close_to_the_original():
    torch.manual_seed(0)
    w = torch.randn(64, 512) * 0.02
    back = dequantize_rows(*quantize_rows(w, 8, 0.9999984))
    assert (back - w).norm() / w.norm() < 0.01


def test_row_quantile_matches_torch():
    torch.manual_seed(0)
    a = torch.rand(5, 333)
    for q in (0.5, 0.99, 0.9999984, 1.0):
        torch.testing.assert_close(row_quantile(a, q), torch.quantile(a, q, dim=1))


def test_clipping_bounds_outliers():
    torch.manual_seed(0)
    w = torch.randn(4, 1000)
    w[0, 0] = 100.0
    codes, scale = quantize_rows(w, 8, 0.99)
    back = dequantize_rows(codes, scale)
    assert back[0, 0] < 10 and scale[0] < 100 / 127  # the outlier is clipped to the row's quantile
    inside = w[0].abs() <= scale[0].float() * 127
    assert bool(((back[0] - w[0]).abs()[inside] <= scale[0].float() / 2 + 1e-6).all())


def test_sdclip_spans_k_standard_deviations_per_group():
    torch.manual_seed(0)
    w = torch.randn(8, 4096) * torch.linspace(0.1, 2, 8)[:, None]
    cfg = {**QUANT, "clip": "sdclip", "clip_k": {"embed": 20.0, "attn": 12.85, "mlp": 9.5, "other": 1.0}}
    for group, k in cfg["clip_k"].items():
        scale = row_scales(w, 6, cfg, group)
        torch.testing.assert_close(scale.float() * 31, k * w.std(dim=1), rtol=2e-3, atol=0)


def test_search_never_does_worse_than_any_candidate():
    torch.manual_seed(0)
    w = torch.randn(32, 200) ** 3  # heavy tails, where the best clip differs per row
    weight = torch.rand(200)
    best = search_scale(w, 5, [0.9, 0.99, 1.0], weight)

    def err(scale):
        q = torch.clamp(torch.round(w / scale.float()[:, None]), -15, 15)
        return ((w - q * scale.float()[:, None]).square() * weight).sum(1)

    for q in (0.9, 0.99, 1.0):
        cand = row_scales(w, 5, {**QUANT, "clip": "quantile", "clip_quantile": q}, "other")
        assert bool((err(best) <= err(cand) + 1e-6).all())


def test_all_zero_rows_stay_zero_and_finite():
    w = torch.randn(3, 64)
    w[1] = 0.0
    for clip in ("quantile", "sdclip", "search"):
        scale = row_scales(w, 8, {**QUANT, "clip": clip, "clip_quantile": 0.99}, "attn")
        codes = torch.clamp(torch.round(w / scale.float()[:, None]), -127, 127)
        back = codes * scale.float()[:, None]
        assert bool(torch.isfinite(back).all()) and not back[1].any(), clip


def test_tiny_rows_keep_a_positive_scale():
    w = torch.full((2, 100), 1e-9)
    codes, scale = quantize_rows(w, 8, 0.999)
    back = dequantize_rows(codes, scale)
    assert bool((scale > 0).all()) and bool(back.isfinite().all()) and back.abs().max() < 1e-6


def test_storage_rule_and_groups_on_the_real_model():
    cfg = validate({"model": {"num_layers": 2, "model_dim": 64, "num_heads": 2, "num_kv_heads": 1}})["model"]
    state = GPT(320, cfg).state_dict()
    plan = {k: storage_for(k, v, 4096) for k, v in state.items()}
    for name, how in plan.items():
        if any(c in name for c in ("q_gain", "attn_scale", "mlp_scale", "resid_mix", "skip_weights")):
            assert how == "fp32", name
        elif state[name].numel() > 4096:
            assert how == "int", name
        else:
            assert how == "fp16", name
    assert plan["blocks.0.resid_mix"] == "fp32" and plan["tok_emb.weight"] == "int"
    assert storage_for("step", torch.tensor([3]), 0) == "keep"
    assert group_of("tok_emb.weight") == "embed" and group_of("bigram_emb.proj.weight") == "embed"
    assert group_of("blocks.3.attn.c_q.weight") == "attn" and group_of("blocks.0.mlp.fc.weight") == "mlp"
    assert group_of("lm_head.weight") == "other"


def test_quantize_file_round_trip(tmp_path):
    torch.manual_seed(0)
    state = {"big.weight": torch.randn(8, 32), "small.weight": torch.randn(4, 4), "gain": torch.rand(4),
             "mix": torch.rand(2, 4), "count": torch.arange(3)}
    model_meta = {"vocab_size": 5, "model": {"model_dim": 4}, "step": 9}
    tensorfile.save(tmp_path / "w.pgt", state, model_meta)
    quantize(tmp_path / "w.pgt", {**QUANT, "bits": {**INT8, "other": 5}}, tmp_path / "q.pgt")
    tensors, meta = tensorfile.load(tmp_path / "q.pgt")
    assert meta["quant"]["plan"] == {"big.weight": "int", "small.weight": "fp16", "gain": "fp32",
                                     "mix": "fp32", "count": "keep"}
    assert meta["quant"]["bits"] == {"big.weight": 5}
    assert tensors["big.weight.codes"].dtype == torch.int8 and tensors["big.weight.codes"].abs().max() <= 15
    assert tensors["big.weight.scale"].dtype == torch.float16
    assert tensors["small.weight"].dtype == torch.float16
    for back, back_meta in (dequantize(tensors, meta), dequantize(tmp_path / "q.pgt")):
        assert back_meta == model_meta
        assert {k: (v.shape, v.dtype) for k, v in back.items()} == {
            k: (v.shape, v.dtype) for k, v in state.items()}
        assert torch.equal(back["gain"], state["gain"]) and torch.equal(back["mix"], state["mix"])
        assert torch.equal(back["count"], state["count"])
        torch.testing.assert_close(back["small.weight"], state["small.weight"].half().float())
        step = tensors["big.weight.scale"].float()[:, None]
        assert bool(((back["big.weight"] - state["big.weight"]).abs() <= step / 2 + 1e-6).all())


def test_unquantized_file_and_missing_hessians_are_refused(tmp_path):
    tensorfile.save(tmp_path / "w.pgt", {"a": torch.ones(2)}, {"vocab_size": 5})
    with pytest.raises(ValueError, match="not a quantized tensor file"):
        dequantize(tmp_path / "w.pgt")
    with pytest.raises(ValueError, match="unknown method 'gptq9'"):
        quantize(tmp_path / "w.pgt", {**QUANT, "method": "gptq9"}, tmp_path / "q.pgt")
    with pytest.raises(ValueError, match="needs the calibrate stage's Hessians"):
        quantize(tmp_path / "w.pgt", {**QUANT, "method": "gptq"}, tmp_path / "q.pgt")
