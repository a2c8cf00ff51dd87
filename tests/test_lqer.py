"""LQER corrections and int8-per-row matrices (PR #1855's quantization extras): the factors follow the
record's formulas, the chosen matrices lose error, the model's loss moves, the artifact round-trips."""

import pytest
import torch
import torch.nn.functional as F

from pgolf.config import validate
from pgolf.errors import PgolfError
from pgolf.formats import tensorfile
from pgolf.model.gpt import GPT
from pgolf.quant import artifact
from pgolf.quant.lqer import correction, low_rank, pack_asym, pack_sym
from pgolf.quant.quantize import dequantize, quantize, quantize_state

BASE = validate({"quant": {"method": "rtn", "clip": "sdclip", "min_numel": 256,
                           "bits": {"embed": 4, "attn": 4, "mlp": 4, "other": 4}}})["quant"]
LQER = {**BASE, "lqer": {**BASE["lqer"], "rank": 4, "top_k": 1}}


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"tok_emb.weight": torch.randn(64, 32, generator=g),
            "blocks.0.mlp.fc.weight": torch.randn(64, 32, generator=g),
            "blocks.0.attn.c_q.weight": 0.1 * torch.randn(32, 32, generator=g), "gain": torch.ones(32)}


def quantized(sd: dict, cfg: dict) -> tuple[dict, dict]:
    """The tensors and meta that `pgolf quantize` would write."""
    tensors, plan, bits, _ = quantize_state(sd, cfg)
    lqer = sorted(k.removesuffix(".lqer_a") for k in tensors if k.endswith(".lqer_a"))
    return tensors, {"quant": {"plan": plan, "bits": bits, **({"lqer": lqer} if lqer else {})}}


def test_factors_follow_the_records_formulas():
    torch.manual_seed(0)
    a, b = torch.randn(48, 4), torch.randn(4, 32)
    p = pack_asym(a, b, 64)
    sa = (a.abs().amax() / 1.5).half().float()  # the record's _lqer_pack_asym, written out
    assert torch.equal(p["lqer_a"], torch.clamp(torch.round(a / sa), -2, 1).to(torch.int8))
    sb = (b.reshape(-1, 64).abs().amax(1) / 7.5).half()
    assert torch.equal(p["lqer_b_scale"], sb)
    assert torch.equal(p["lqer_b"], torch.clamp(torch.round(b.reshape(-1, 64) / sb.float()[:, None]), -8, 7)
                       .to(torch.int8).reshape(4, 32))
    assert int(p["lqer_a"].min()) >= -2 and int(p["lqer_a"].max()) == 1 and int(p["lqer_b"].min()) >= -8
    ref_b = (p["lqer_b"].float().reshape(-1, 64) * sb.float()[:, None]).reshape(4, 32)
    torch.testing.assert_close(correction({f"m{k}": v for k, v in {".lqer_a": p["lqer_a"], ".lqer_a_scale":
                               p["lqer_a_scale"], ".lqer_b": p["lqer_b"], ".lqer_b_scale": sb}.items()}, "m"),
                               (p["lqer_a"].float() * sa) @ ref_b)
    s = pack_sym(a, b, 4)  # the record's _lqer_pack: per-row scales |row|max / 7
    assert torch.equal(s["lqer_a_scale"], (a.abs().amax(1) / 7).half()) and s["lqer_b"].abs().max() <= 7
    u, sv, vh = torch.linalg.svd(a @ b)
    la, lb = low_rank(a @ b, 2)
    torch.testing.assert_close(la @ lb, (u[:, :2] * sv[:2]) @ vh[:2], atol=1e-4, rtol=1e-4)


def test_lqer_lowers_the_largest_error_and_touches_nothing_else():
    sd = state()
    plain, with_fix = (dequantize(*quantized(sd, cfg))[0] for cfg in (BASE, LQER))
    errors = {k: float((plain[k] - sd[k]).norm()) for k in sd if k.endswith(".weight")}
    chosen = max(errors, key=errors.get)
    assert chosen == "blocks.0.mlp.fc.weight" or chosen == "tok_emb.weight"
    assert float((with_fix[chosen] - sd[chosen]).norm()) < 0.97 * errors[chosen]
    for k in sd:
        if k != chosen:
            assert torch.equal(with_fix[k], plain[k]), k
    tensors, meta = quantized(sd, {**LQER, "lqer": {**LQER["lqer"], "top_k": 3}})
    assert meta["quant"]["lqer"] == sorted(errors)  # top_k 3 takes all three, factors in the file
    tensors, _ = quantized(sd, {**LQER, "lqer": {**LQER["lqer"], "asym": False}})
    assert tensors[f"{chosen}.lqer_a_scale"].shape == (64,)  # sym: one scale per row


def test_group_that_does_not_divide_b_falls_back_to_row_scales():
    tensors, meta = quantized(state(), {**LQER, "lqer": {**LQER["lqer"], "group": 48}})  # 4 x 32 = 128
    name = meta["quant"]["lqer"][0]
    assert tensors[f"{name}.lqer_b_scale"].shape == (4,) and tensors[f"{name}.lqer_a_scale"].shape == (64,)


def test_lqer_changes_the_models_loss_and_the_artifact_round_trips(tmp_path):
    mcfg = validate({"model": {"num_layers": 1, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1}})["model"]
    torch.manual_seed(0)
    model = GPT(64, mcfg)
    for p in model.parameters():  # trained-like weights, not zero-init projections
        torch.nn.init.normal_(p, std=0.3)
    tensorfile.save(tmp_path / "w.pgt", {k: v.float() for k, v in model.state_dict().items()}, {"vocab_size": 64})
    tokens = torch.randint(0, 64, (2, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for name, cfg in (("off", BASE), ("on", {**LQER, "lqer": {**LQER["lqer"], "top_k": 3}})):
        quantize(tmp_path / "w.pgt", cfg, tmp_path / f"{name}.pgt")
        raw = (tmp_path / f"{name}.pgt").read_bytes()
        data = artifact.encode(raw, {**validate({})["compress"], "codec": "brotli", "level": 5, "shuffle": 2})
        assert artifact.decode(data) == raw
        sd, _ = dequantize(*tensorfile.loads(artifact.decode(data), "a"))
        model.load_state_dict(sd)
        with torch.no_grad():
            logits = model(tokens[:, :-1])
        losses.append(float(F.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))))
    assert len(tensorfile.load(tmp_path / "on.pgt")[1]["quant"]["lqer"]) == 3
    assert abs(losses[0] - losses[1]) > 1e-4


def test_damaged_factors_fail_naming_the_tensor():
    tensors, meta = quantized(state(), LQER)
    name = meta["quant"]["lqer"][0]
    sb = tensors[f"{name}.lqer_b_scale"]
    bad = {**tensors, f"{name}.lqer_b_scale": torch.cat([sb, sb[:1]])}  # 3 scales for 128 values
    with pytest.raises(PgolfError, match=name.replace(".", r"\.")):
        dequantize(bad, meta)
    gone = {k: v for k, v in tensors.items() if k != f"{name}.lqer_a"}
    with pytest.raises(PgolfError, match="lacks tensor"):
        dequantize(gone, meta)
    with pytest.raises(PgolfError, match="'nope'"):
        dequantize(tensors, {"quant": {**meta["quant"], "lqer": ["nope"]}})


def test_int8_rows_stores_the_gate_with_absmax_row_scales():
    g = torch.Generator().manual_seed(0)
    sd = {**state(), "blocks.0.attn.attn_gate.weight": torch.randn(4, 12, generator=g)}
    tensors, meta = quantized(sd, BASE)
    assert meta["quant"]["plan"]["blocks.0.attn.attn_gate.weight"] == "fp16"  # small: fp16 by default
    tensors, meta = quantized(sd, {**BASE, "int8_rows": ["attn_gate"]})
    w = sd["blocks.0.attn.attn_gate.weight"]
    scale = (w.abs().amax(1) / 127).half()  # the record's _quantize_gate_int8_row, written out
    assert meta["quant"]["plan"]["blocks.0.attn.attn_gate.weight"] == "int"
    assert meta["quant"]["bits"]["blocks.0.attn.attn_gate.weight"] == 8
    assert torch.equal(tensors["blocks.0.attn.attn_gate.weight.scale"], scale)
    assert torch.equal(tensors["blocks.0.attn.attn_gate.weight.codes"],
                       torch.clamp(torch.round(w / scale.float()[:, None]), -127, 127).to(torch.int8))
    back = dequantize(tensors, meta)[0]["blocks.0.attn.attn_gate.weight"]
    assert float((back - w).abs().max()) <= float(scale.float().max()) / 2 + 1e-6
    with pytest.raises(PgolfError, match="quant.int8_rows: pattern 'gain' names tensor 'gain'"):
        quantized(sd, {**BASE, "int8_rows": ["gain"]})
