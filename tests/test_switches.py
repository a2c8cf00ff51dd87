"""Every record technique is a live switch: turning it on changes the model's output or its update."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import TORCHRUN, losses, train

from pgolf.config import ConfigError, load, validate
from pgolf.formats import tensorfile
from pgolf.model.gpt import GPT, count_parameters, layer_order, token_losses
from pgolf.model.layers import SmearGate, exclusive
from pgolf.optim.muon import Muon, newton_schulz
from pgolf.train.averaging import SWA
from pgolf.train.train import build_optimizers, sync_and_clip

BASE = {"num_layers": 4, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2}
ROOT = Path(__file__).resolve().parent.parent


def build(**over) -> GPT:
    torch.manual_seed(0)
    return GPT(64, validate({"model": {**BASE, **over}})["model"])


def randomize(model: GPT) -> GPT:
    """Move every parameter off its (often zero) init so that every path carries signal."""
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.data.add_(0.2 * torch.randn(p.shape, generator=g))
    return model


def tokens(T: int = 16) -> torch.Tensor:
    x = torch.randint(2, 64, (2, T), generator=torch.Generator().manual_seed(2))
    x[:, 5] = 1  # a document boundary (BOS) inside the window
    return x


# (the config without the switch, the switch): the switched-on model's weights are copied into the
# switched-off one, so any difference in output is the switch's doing.
MODEL_SWITCHES = {
    "leaky_relu2": ({}, {"activation": "leaky_relu2"}),
    "leaky_slope": ({"activation": "leaky_relu2"}, {"leaky_slope": 0.1}),
    "qk_norm": ({}, {"qk_norm": False}),
    "partial_rope": ({}, {"rope_dims": 4}),
    "untied_head": ({}, {"tie_embeddings": False}),
    "ln_scale": ({}, {"ln_scale": True}),
    "xsa": ({}, {"xsa_last_n": 2}),
    "bigram_hash": ({}, {"bigram_buckets": 32, "bigram_dim": 8}),
    "smear_gate": ({}, {"smear_gate": True}),
    "smear_bos_fix": ({"smear_gate": True, "smear_bos_fix": False}, {"smear_bos_fix": True}),
    "value_embeddings": ({}, {"ve_layers": [2, 3], "ve_dim": 8}),
    "unet_skips": ({"skip": "none"}, {"skip": "unet"}),
    "gated_skips": ({}, {"skip": "gated"}),
    "recurrence": ({}, {"recur_layers": [1, 2]}),
    "recurrence_loops": ({"recur_layers": [1, 2]}, {"recur_extra_loops": 2}),
    "recurrence_own_norms": ({"recur_layers": [1, 2]}, {"recur_own_norms": True}),
    "parallel_residuals": ({}, {"parallel_from": 2}),
    "qk_gain_init": ({}, {"qk_gain_init": 4.0}),
    "parallel_lanes": ({"parallel_from": 2}, {"parallel_mode": "lanes"}),
    "recur_physical_indexing": ({"recur_layers": [1, 2], "ln_scale": True}, {"recur_indexing": "physical"}),
    "logical_layers": ({}, {"logical_layers": 5}),
    "smear_zero_pad": ({"smear_gate": True}, {"smear_zero_pad": True}),
    "bf16_stream": ({}, {"stream_dtype": "bfloat16"}),
}


def transplant(src: GPT, dst: GPT) -> None:
    """Copy src's weights into dst wherever dst has them (the overlap where shapes differ)."""
    theirs = src.state_dict()
    with torch.no_grad():
        for k, v in dst.state_dict().items():
            if k in theirs:
                w = theirs[k]
                v[tuple(slice(0, min(a, b)) for a, b in zip(v.shape, w.shape, strict=True))].copy_(
                    w[tuple(slice(0, min(a, b)) for a, b in zip(v.shape, w.shape, strict=True))])


@pytest.mark.parametrize("name", MODEL_SWITCHES)
def test_model_switch_changes_the_output(name):
    off, on = MODEL_SWITCHES[name]
    with_switch, without = build(**{**off, **on}), build(**off)
    if name == "qk_gain_init":  # the switch is the init itself: the same noise on both keeps it apart
        randomize(with_switch), randomize(without)
    else:
        transplant(randomize(with_switch), without)
    x = tokens()
    assert not torch.allclose(with_switch(x), without(x), atol=1e-5), f"{name} changed nothing"


def test_ntk_rope_only_acts_beyond_the_training_length():
    plain, ntk = randomize(build()), build(rope_ntk_train_len=8)
    ntk.load_state_dict(plain.state_dict())
    assert torch.equal(plain(tokens(8)), ntk(tokens(8)))
    assert not torch.allclose(plain(tokens(16)), ntk(tokens(16)), atol=1e-5)


def test_smear_gate_bos_fix_keeps_documents_apart():
    gate = SmearGate(8, bos_id=1)
    gate.gate.data.fill_(2.0)
    x, idx = torch.randn(1, 6, 8), torch.tensor([[5, 6, 7, 1, 8, 9]])
    y = gate(x, idx)
    assert torch.equal(y[:, 3], x[:, 3]) and torch.equal(y[:, 0], x[:, 0])
    assert not torch.allclose(y[:, 4], x[:, 4])


def test_xsa_removes_the_own_value_direction():
    y, v = torch.randn(2, 5, 4, 8), torch.randn(2, 5, 2, 8)  # 4 heads share 2 kv heads
    out = exclusive(y, v).view(2, 5, 2, 2, 8)
    vn = torch.nn.functional.normalize(v, dim=-1).unsqueeze(3)
    assert (out * vn).sum(-1).abs().max() < 1e-5


def test_recurrence_layer_order_matches_the_records():
    cfg = validate({"model": {"num_layers": 11, "recur_layers": [3, 4, 5], "recur_extra_loops": 2}})["model"]
    order = layer_order(cfg)
    assert order[:8] == [0, 1, 2, 3, 4, 5, 3, 4] and order[8:] == [5, 3, 4, 5, 6, 7, 8, 9, 10]  # PR #1493
    cfg["recur_extra_loops"] = 1
    assert len(layer_order(cfg)) == 14 and layer_order(cfg, recur=False) == list(range(11))  # PR #1517
    shared = GPT(64, validate({"model": {**BASE, "recur_layers": [1]}})["model"])
    assert count_parameters(shared)["total"] == count_parameters(build())["total"]  # loops add no weights


def test_late_qat_passes_gradients_straight_through():
    """(Under torch.compile: tests/test_runtime.py, with inductor.)"""
    model = randomize(build(qat_bits=4))
    model.set_qat(True)
    token_losses(model, tokens(), tokens()).mean().backward()
    assert model.blocks[0].mlp.fc.weight.grad.abs().sum() > 0


def test_fa3_refused_where_it_cannot_run():
    model = build(attention="fa3")
    with pytest.raises(RuntimeError, match="fa3"):
        model(tokens())


def one_step(**train_over) -> dict[str, torch.Tensor]:
    model = randomize(build(tie_embeddings=False, bigram_buckets=32, bigram_dim=8, ve_layers=[3], ve_dim=8))
    cfg = validate({"train": train_over})["train"]
    opts = build_optimizers(model, cfg)
    token_losses(model, tokens(), tokens()).mean().backward()
    sync_and_clip(model, opts[1], 1, cfg["grad_clip"])
    for opt in opts:
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("switch", [{"muon_ns": "polar_express"}, {"muon_row_norm": True},
                                    {"muon_weight_decay": 0.5}, {"adam_weight_decay": 0.5}, {"grad_clip": 0.01},
                                    {"head_lr": 0.05}, {"scalar_weight_decay": 0.5}, {"side_matrices": "adam"}])
def test_optimizer_switch_changes_the_update(switch):
    a, b = one_step(), one_step(**switch)
    assert any(not torch.equal(a[k], b[k]) for k in a), f"{switch} changed nothing"


def test_records_init_is_orthogonal_with_zero_outputs():
    """model.init orthogonal (the records'): Q/K/V/MLP-up and the side projections orthogonal with
    gain 1, output projections zero, BigramHash table zero, value-embedding table std 0.01."""
    big = {"model_dim": 128, "num_heads": 2, "num_kv_heads": 1, "bigram_buckets": 64, "bigram_dim": 64,
           "ve_layers": [3], "ve_dim": 64, "ve_scale_init": 0.1}
    default, records = build(**big), build(**big, init="orthogonal")
    attn = records.blocks[0].attn
    for w in (attn.c_q.weight, attn.c_k.weight, records.blocks[0].mlp.fc.weight, records.bigram.proj.weight,
              records.ve.proj.weight):
        torch.testing.assert_close(torch.linalg.svdvals(w), torch.ones(min(w.shape)), atol=1e-4, rtol=0)
    ratio = (attn.c_q.weight.norm() / default.blocks[0].attn.c_q.weight.norm()).item()
    assert ratio == pytest.approx(3**0.5, rel=0.05)  # PyTorch's Linear init starts Q 1.73x smaller
    assert not attn.proj.weight.any() and not records.blocks[0].mlp.proj.weight.any()
    assert not records.bigram.emb.weight.any() and records.bigram.proj.weight.any()
    assert abs(records.ve.emb.weight.std().item() - 0.01) < 2e-3 and records.ve.scale.item() == pytest.approx(0.1)


def test_polar_express_orthogonalizes():
    s = torch.linalg.svdvals(newton_schulz(torch.randn(3, 16, 48), steps=5, coeffs="polar_express"))
    assert s.min() > 0.6 and s.max() < 1.2


def test_parallel_muon_matches_single_process_muon(tmp_path):
    import parallel_muon_worker as w

    out = tmp_path / "parallel.pt"
    cmd = [*TORCHRUN, "--nproc-per-node=2", str(Path(w.__file__)), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                                                   "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out)
    ps = w.params()
    ref = Muon(ps, **w.OPTIONS)
    for step in range(w.STEPS):
        for p, g0, g1 in zip(ps, w.grads(0, step), w.grads(1, step), strict=True):
            p.grad = (g0 + g1) / 2
        ref.step()
    for p, q in zip(ps, got["params"], strict=True):
        torch.testing.assert_close(q, p.detach(), atol=1e-5, rtol=1e-5)
    ref_state = ref.state_dict()["state"]
    for k, st in got["state"]["state"].items():  # the checkpointed momentum is the full bank
        torch.testing.assert_close(st["momentum_bank"], ref_state[k]["momentum_bank"], atol=1e-5, rtol=1e-5)


def test_swa_averages_only_low_lr_snapshots():
    model = torch.nn.Linear(2, 2, bias=False)
    swa = SWA(every=2, below=0.5)
    seen = []
    for step, scale in enumerate([1.0, 0.9, 0.4, 0.3, 0.2, 0.1]):
        model.weight.data.fill_(float(step))
        swa.maybe_add(model, step, scale)
        if scale < 0.5 and step % 2 == 0:
            seen.append(float(step))
    assert swa.count == 2 and swa.average()["weight"].flatten()[0] == sum(seen) / len(seen)


def test_recurrence_switches_on_at_its_step_and_the_loss_stays_finite(tiny_dataset, tmp_path):
    proc = train(tiny_dataset, tmp_path, model={"recur_layers": [1], "recur_start_step": 6})
    assert "step 6: depth recurrence on" in proc.stdout and "step 0: depth recurrence off" in proc.stdout
    ls = losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(ls))) and ls[6] < ls[0]


def test_late_qat_and_swa_change_training_from_their_switch_on(tiny_dataset, tmp_path):
    plain = train(tiny_dataset, tmp_path / "plain", model={"qat_bits": 6})
    late = train(tiny_dataset, tmp_path / "qat", model={"qat_bits": 6}, qat_below=0.6, swa=True, swa_every=1,
                 swa_below=0.8)
    assert "late QAT on" in late.stdout and "late QAT" not in plain.stdout
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "qat")
    assert a[:10] == b[:10] and a[10:] != b[10:]  # LR scale 0.5 < 0.6 from step 10 of 12 (warmdown 4)
    _, meta = tensorfile.load(tmp_path / "qat" / "ema.pgt")
    assert meta["weights"] == "swa over 3 snapshots"


def test_every_switch_on_still_learns(tiny_dataset, tmp_path):
    model = {"activation": "leaky_relu2", "rope_dims": 8, "rope_ntk_train_len": 32, "ln_scale": True,
             "xsa_last_n": 2, "bigram_buckets": 64, "bigram_dim": 8, "smear_gate": True, "ve_layers": [1],
             "ve_dim": 8, "skip": "gated", "recur_layers": [1], "recur_start_step": 4, "recur_own_norms": True,
             "parallel_from": 1, "tie_embeddings": False, "qat_bits": 6, "num_layers": 3}
    train(tiny_dataset, tmp_path, model=model, muon_ns="polar_express", muon_row_norm=True, muon_weight_decay=0.01,
          adam_weight_decay=0.01, grad_clip=1.0, warmdown_frac=0.3, warmdown_steps=0, min_lr_scale=0.1,
          qat_below=0.5, swa=True, swa_every=1, swa_below=0.5)
    ls = losses(tmp_path)
    assert ls[-1] < ls[0] - 0.5


def test_the_records_topologies_learn_in_bf16(tiny_dataset, tmp_path):
    """#1334's two lanes with physical indexing over a loop, and #461's logical layers over cores, with
    the records' init, bf16 stream, control-tensor decay and Adam-trained side matrices."""
    common = {"num_layers": 3, "init": "orthogonal", "stream_dtype": "bfloat16", "ln_scale": True, "skip": "gated",
              "smear_gate": True, "smear_zero_pad": True, "bigram_buckets": 64, "bigram_dim": 8, "ve_dim": 8}
    lanes = {**common, "recur_layers": [1], "recur_indexing": "physical", "parallel_from": 2,
             "parallel_mode": "lanes", "ve_layers": [2]}
    logical = {**common, "logical_layers": 4, "recur_own_norms": True, "ve_layers": [3]}
    for name, model in (("lanes", lanes), ("logical", logical)):
        train(tiny_dataset, tmp_path / name, model=model, precision="bf16", scalar_weight_decay=0.02,
              side_matrices="adam")
        ls = losses(tmp_path / name)
        assert ls[-1] < ls[0] - 0.5, name


def test_local_clip_scope_clips_each_process_before_averaging(tiny_dataset, tmp_path):
    for scope in ("global", "local"):
        train(tiny_dataset, tmp_path / scope, nproc=2, grad_clip=0.05, clip_scope=scope, iterations=4)
    assert losses(tmp_path / "global") != losses(tmp_path / "local")


def test_switch_consistency_is_checked():
    for bad, key in [({"model": {"recur_layers": [1, 3]}}, "recur_layers"),
                     ({"model": {"ve_layers": [9]}}, "ve_layers"),
                     ({"model": {"rope_dims": 7}}, "rope_dims"),
                     ({"train": {"qat_below": 0.2}}, "qat_bits")]:
        with pytest.raises(ConfigError, match=key):
            validate({"model": {**BASE, **bad.get("model", {})}, "train": bad.get("train", {})})


# #549's and #1334's logged counts; #1517's write-up states none (11 blocks, 5 physical skips).
@pytest.mark.parametrize("preset,count", [("pr549", 26_928_220), ("pr1326", 34_401_372), ("pr1517", 35_941_976)])
def test_preset_parameter_count_matches_the_record(preset, count):
    cfg = load(ROOT / "configs" / f"{preset}.yaml")
    assert count_parameters(GPT(cfg["tokenizer"]["vocab_size"], cfg["model"]))["total"] == count


def test_params_and_bench_commands(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pgolf", "params", "configs/pr549.yaml"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "pr549: 26,928,220 parameters (11 blocks, 11 virtual layers" in out
    figures = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "pgolf", "bench", "config.yaml", "configs/smoke.yaml", "--steps", "2",
                          "--warmup", "1", "--device", "cpu", "--peak-tflops", "1", "--json", str(figures)],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert "ms/step" in out and "tokens/s" in out and "MFU" in out and "peak memory" in out
    r = json.loads(figures.read_text())
    assert r["ms_per_step"] > 0 and 0 < r["mfu"] < 1 and r["flops_per_token"] > 6 * 1000


def test_gptq_covers_the_switches_matrices():
    from pgolf.quant.calibrate import collect_hessians
    from pgolf.quant.quantize import dequantize_state, quantize_state

    model = randomize(build(tie_embeddings=False, bigram_buckets=32, bigram_dim=8, ve_layers=[3], ve_dim=8,
                            recur_layers=[1], recur_own_norms=True))
    hessians = collect_hessians(model, tokens(), batch=2)
    assert {"lm_head.weight", "bigram.proj.weight", "ve.proj.weight", "blocks.1.mlp.fc.weight"} <= set(hessians)
    assert "tok_emb.weight" not in hessians  # untied: the embedding is a lookup, with no input activations
    cfg = validate({"quant": {"method": "gptq", "min_numel": 0}})["quant"]
    tensors, plan, _, _ = quantize_state({k: v.float() for k, v in model.state_dict().items()}, cfg, hessians)
    clone = build(tie_embeddings=False, bigram_buckets=32, bigram_dim=8, ve_layers=[3], ve_dim=8,
                  recur_layers=[1], recur_own_norms=True)
    clone.load_state_dict(dequantize_state(tensors, plan))
    assert plan["blocks.1.extra.0.resid_mix"] == "fp32" and plan["lm_head.weight"] == "int"
    assert (clone(tokens()) - model(tokens())).abs().mean() < 0.5 * model(tokens()).abs().mean()  # int6, tiny rows
