"""PR #1855's model and training parts: each a switch that changes the output or the update, checked
against the record's formulas, and the preset's parameter count against the record's log."""

from pathlib import Path

import pytest
import torch
from test_switches import BASE, build, randomize, tokens, transplant
from test_train import losses, train

from pgolf.config import ConfigError, load, validate
from pgolf.model.gpt import GPT, count_parameters, layer_order, token_losses
from pgolf.model.layers import InputSmearGate, rms_norm
from pgolf.optim.muon import newton_schulz
from pgolf.train.averaging import EMA
from pgolf.train.schedule import lr_scale, recurrence_on
from pgolf.train.train import build_optimizers, param_groups

ROOT = Path(__file__).resolve().parent.parent
GATE = {"attn_gate_window": 4}
INPUT_SMEAR = {"smear_gate": True, "smear_mode": "input", "smear_window": 4}
MIXED = {"parallel_from": 2, "parallel_mode": "mixed_lanes"}

# (the config without the switch, the switch), as tests/test_switches.py's MODEL_SWITCHES.
SWITCHES = {
    "sparse_attn_gate": ({}, GATE),
    "sparse_attn_gate_scale": (GATE, {"attn_gate_scale": 0.5}),
    "input_smear_gate": ({}, INPUT_SMEAR),
    "input_smear_vs_lerp": ({"smear_gate": True}, {"smear_mode": "input"}),
    "input_smear_bos_fix": ({**INPUT_SMEAR, "smear_bos_fix": False}, {"smear_bos_fix": True}),
    "mixed_lanes": ({}, MIXED),
    "mixed_vs_1334_lanes": ({"parallel_from": 2, "parallel_mode": "lanes"}, {"parallel_mode": "mixed_lanes"}),
    "virtual_skips": ({"recur_layers": [1, 2], "ln_scale": True}, {"recur_indexing": "virtual_skips"}),
    "doc_attention": ({}, {"doc_attention": True}),
}


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_changes_the_output(name):
    off, on = SWITCHES[name]
    with_switch, without = build(**{**off, **on}), build(**off)
    transplant(randomize(with_switch), without)
    x = tokens()
    assert not torch.allclose(with_switch(x), without(x), atol=1e-5), f"{name} changed nothing"


def test_preset_parameter_count_matches_the_record():
    cfg = load(ROOT / "configs" / "pr1855.yaml")
    assert count_parameters(GPT(cfg["tokenizer"]["vocab_size"], cfg["model"]))["total"] == 35_945_671  # its log


def test_sparse_gate_starts_at_one_half():
    """Zero-init W: sigmoid(0) = 0.5 on every head, so the block's attention output is halved."""
    gated, plain = build(**GATE), build()
    transplant(randomize(plain), gated)
    x = torch.randn(2, 8, BASE["model_dim"])
    torch.testing.assert_close(gated.blocks[0].attn(x), 0.5 * plain.blocks[0].attn(x))
    assert gated.blocks[0].attn.attn_gate.weight.shape == (BASE["num_heads"], 4)
    assert "blocks.0.attn.attn_gate.weight" in gated.state_dict()  # the name the quantizer routes to int8


def test_sparse_gate_matches_the_records_formula():
    """y_h <- sigmoid(scale * W_h . x[:window]) * y_h per head, before the output projection."""
    attn = randomize(build(**GATE, attn_gate_scale=0.5)).blocks[1].attn
    x = torch.randn(2, 8, BASE["model_dim"])
    seen = []
    attn.proj.register_forward_hook(lambda m, i, o: seen.append(i[0].view(2, 8, BASE["num_heads"], -1)))
    attn(x)
    w, attn.attn_gate = attn.attn_gate.weight, None  # the same attention without its gate
    attn(x)
    g = torch.sigmoid(0.5 * x[..., :4] @ w.T)
    torch.testing.assert_close(seen[0], seen[1] * g.unsqueeze(-1))


def test_input_smear_gate_matches_the_records_formula():
    """x_t + lambda * sigmoid(w . x_t[:window]) * x_{t-1} * [token t is not BOS]; position 0 unchanged."""
    gate = InputSmearGate(3, bos_id=1)
    gate.gate.weight.data = torch.tensor([[0.5, -1.0, 2.0]])
    gate.lam.data.fill_(0.7)
    x, idx = torch.randn(2, 6, 8), torch.tensor([[5, 6, 1, 7, 8, 9], [1, 4, 4, 1, 2, 3]])
    want = x.clone()
    for b in range(2):
        for t in range(1, 6):
            g = 0.7 * torch.sigmoid(x[b, t, :3] @ torch.tensor([0.5, -1.0, 2.0]))
            want[b, t] = x[b, t] + g * x[b, t - 1] * float(idx[b, t] != 1)
    torch.testing.assert_close(gate(x, idx), want)
    assert torch.equal(InputSmearGate(3, bos_id=1)(x, idx), x)  # zero init: the identity


def test_input_smear_acts_on_the_raw_embedding_before_its_norm():
    model = randomize(build(**INPUT_SMEAR))
    idx = tokens()
    raw = model.tok_emb(idx)
    torch.testing.assert_close(model.embed(idx), rms_norm(model.smear(raw, idx)))


def reference_mixed_lanes(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """The record's _forward_hidden for 4 blocks without recurrence, written out: 2 encoder blocks,
    then decoder blocks 2-3 as lanes from block 2, skips into lane 0, the mean of the lanes."""
    x = x0 = model.embed(idx)
    skips = []
    for i in range(2):
        x = model.blocks[i](x, x0, 0, 1.0, None)
        skips.append(x)
    lane0 = lane1 = x
    for k, i in enumerate((2, 3)):
        b, skip = model.blocks[i], skips.pop()
        gate = torch.sigmoid(model.skip_gates[k]) if model.cfg["skip"] == "gated" else None
        lane0 = torch.lerp(model.skip_weights[k] * skip, lane0, gate) if gate is not None \
            else lane0 + model.skip_weights[k] * skip
        a = b.attn_scale * b.attn(rms_norm(b.resid_mix[0] * lane0 + b.resid_mix[1] * x0), None)
        m = b.mlp_scale * b.mlp(rms_norm(lane1))
        post, resid = model.lane_post[i], model.lane_resid[i]
        lane0, lane1 = (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                        resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)
    return rms_norm(0.5 * (lane0 + lane1))


@pytest.mark.parametrize("skip", ["unet", "gated"])
def test_mixed_lanes_match_the_records_decoder(skip):
    model = randomize(build(**MIXED, skip=skip))
    idx = tokens()
    torch.testing.assert_close(model.head_input(idx), reference_mixed_lanes(model, idx))
    init = build(**MIXED)
    assert torch.equal(init.lane_post, torch.ones(4, 2, 2)) and torch.equal(init.lane_resid, torch.full((4, 2), 1.1))


def test_virtual_skips_count_virtual_layers_and_scale_by_block():
    cfg = validate({"model": {"num_layers": 11, "recur_layers": [3, 4, 5], "recur_extra_loops": 2,
                              "recur_indexing": "virtual_skips", "model_dim": 16, "num_heads": 2,
                              "num_kv_heads": 1}})["model"]
    assert len(layer_order(cfg)) == 17 and GPT(64, cfg).skip_weights.shape[0] == 8  # the record's 8 skips
    small = {"recur_layers": [1, 2], "ln_scale": True, "skip": "none"}
    physical, mixed = build(**small, recur_indexing="physical"), build(**small, recur_indexing="virtual_skips")
    transplant(randomize(mixed), physical)
    torch.testing.assert_close(mixed(tokens()), physical(tokens()))  # without skips: the same LN scales


def test_gates_are_trained_by_adam_with_the_control_tensors():
    model = build(**GATE, **INPUT_SMEAR)
    groups = param_groups(model)
    gates = [model.smear.gate.weight, model.smear.lam] + [b.attn.attn_gate.weight for b in model.blocks]
    assert all(any(p is q for q in groups["scalar"]) for p in gates)
    assert not any(p is q for p in gates for q in groups["muon"])


def test_lr_floor_clamps_the_warmdown():
    """MIN_LR 0.10 with warmdown 0.85 (#1855): max((1 - f) / 0.85, 0.10), against lerp's 0.1 + 0.9 w."""
    c = validate({"train": {"iterations": 1000, "warmdown_frac": 0.85, "min_lr_scale": 0.1,
                            "min_lr_mode": "clamp"}})["train"]
    lerp = {**c, "min_lr_mode": "lerp"}
    assert lr_scale(c, 100, 0) == 1.0 and lr_scale(c, 150, 0) == 1.0
    assert lr_scale(c, 575, 0) == pytest.approx(0.5) and lr_scale(lerp, 575, 0) == pytest.approx(0.55)
    assert lr_scale(c, 950, 0) == pytest.approx(0.1)
    assert lr_scale(lerp, 950, 0) == pytest.approx(0.1 + 0.9 * 0.05 / 0.85)


def test_recurrence_starts_at_its_fraction_of_the_wall_clock_budget():
    cfg = load(ROOT / "configs" / "pr1855.yaml")
    m, t = cfg["model"], cfg["train"]
    assert not recurrence_on(m, t, 2000, 0.349 * 599.5) and recurrence_on(m, t, 1700, 0.35 * 599.5)
    assert layer_order(m).count(4) == 3  # blocks 3-5 run 3 times


def test_ema_without_warmup_uses_the_fixed_decay_from_step_zero():
    model = torch.nn.Linear(2, 1, bias=False)
    model.weight.data.zero_()
    fixed, warm = EMA(model, 0.9, warmup=False), EMA(model, 0.9)
    model.weight.data.fill_(1.0)
    fixed.update(model, 0), warm.update(model, 0)
    assert fixed.shadow["weight"][0, 0].item() == pytest.approx(0.1)
    assert warm.shadow["weight"][0, 0].item() == pytest.approx(0.9)  # decay capped at 1/10


def test_polar_express_margin_is_the_records_plain_norm():
    g = torch.randn(2, 16, 48)
    ours = newton_schulz(g, 5, "polar_express", margin=1.0)
    x = g / (g.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # the record's zeropower_via_newtonschulz5, fp32
    from pgolf.optim.muon import POLAR_EXPRESS
    for a, b, c in POLAR_EXPRESS:
        A = x @ x.mT
        x = a * x + (b * A + c * A @ A) @ x
    torch.testing.assert_close(ours, x)
    assert not torch.allclose(newton_schulz(g, 5, "polar_express"), ours, atol=1e-4)


def test_margin_changes_the_muon_update():
    def one_step(margin: float) -> dict:
        model = randomize(build())
        cfg = validate({"train": {"muon_ns": "polar_express", "muon_ns_margin": margin}})["train"]
        opts = build_optimizers(model, cfg)
        token_losses(model, tokens(), tokens()).mean().backward()
        for opt in opts:
            opt.step()
        return model.state_dict()
    a, b = one_step(1.02), one_step(1.0)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_the_records_topology_learns_in_bf16(tiny_dataset, tmp_path):
    """The preset's model and training switches together on a tiny model: the loop switches on at 35%
    of training (step 4 of 12) and the loss falls."""
    model = {"num_layers": 3, "init": "orthogonal", "stream_dtype": "bfloat16", "ln_scale": True, "skip": "gated",
             "activation": "leaky_relu2", "xsa_last_n": 3, "rope_dims": 8, **GATE, "attn_gate_scale": 0.5,
             **INPUT_SMEAR, "recur_layers": [1], "recur_extra_loops": 2, "recur_start_frac": 0.35,
             "recur_indexing": "virtual_skips", "parallel_from": 2, "parallel_mode": "mixed_lanes"}
    proc = train(tiny_dataset, tmp_path, model=model, precision="bf16", warmup_steps=0, warmdown_frac=0.85,
                 warmdown_steps=0, min_lr_scale=0.1, min_lr_mode="clamp", muon_ns="polar_express",
                 muon_ns_margin=1.0, muon_row_norm=True, ema_warmup=False, adam_beta2=0.99, grad_clip=0.3)
    assert "step 5: depth recurrence on" in proc.stdout
    ls = losses(tmp_path)
    assert ls[-1] < ls[0] - 0.5


def test_doc_attention_keeps_documents_apart():
    """With doc_attention, a document's logits are those of the document run alone; the text before
    it is as without the switch. A BOS at position 5 of each row (tokens())."""
    plain = randomize(build())
    docs = build(doc_attention=True)
    docs.load_state_dict(plain.state_dict())
    x = tokens()
    full = docs(x)
    torch.testing.assert_close(full[:, 5:], plain(x[:, 5:]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[:, :5], plain(x)[:, :5], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(full[:, 5:], plain(x)[:, 5:], atol=1e-4)


def test_doc_attention_refuses_fa3():
    with pytest.raises(ConfigError, match="doc_attention"):
        validate({"model": {"doc_attention": True, "attention": "fa3"}})
