import torch

from pgolf.config import validate
from pgolf.model.gpt import GPT, token_losses
from pgolf.optim.muon import Muon, newton_schulz


def test_baseline_has_the_challenge_parameter_count():
    model = GPT(1024, validate({})["model"])  # 9 layers, d 512, 8 heads, 4 kv heads, mlp 2x
    assert sum(p.numel() for p in model.parameters()) == 17_059_912


def tiny(**over):
    cfg = validate({"model": {"num_layers": 3, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, **over}})
    return GPT(64, cfg["model"])


def test_forward_is_causal_and_softcapped():
    torch.manual_seed(0)
    model = tiny(logit_softcap=2.0)
    for p in model.parameters():  # move off the zero-init so every path matters
        p.data.add_(0.1 * torch.randn_like(p))
    x = torch.randint(0, 64, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 64) and logits.abs().max() <= 2.0
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % 64
    assert torch.allclose(model(x2)[:, :8], logits[:, :8], atol=1e-6)
    assert not torch.allclose(model(x2)[:, 8:], logits[:, 8:])


def test_meta_round_trip_and_losses():
    model = tiny()
    clone = GPT.from_meta(model.meta())
    clone.load_state_dict(model.state_dict())
    x, y = torch.randint(0, 64, (2, 8)), torch.randint(0, 64, (2, 8))
    assert torch.equal(token_losses(model, x, y), token_losses(clone, x, y))
    assert token_losses(model, x, y).shape == (2, 8)


def test_newton_schulz_orthogonalizes():
    torch.manual_seed(0)
    for shape in ((16, 48), (48, 16)):
        X = newton_schulz(torch.randn(shape), steps=5)
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.5 and s.max() < 1.3  # the quintic targets singular values near 1, not exactly


def test_muon_step_matches_a_hand_written_loop():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    ref, buf = w.detach().clone(), torch.zeros(8, 4)
    opt = Muon([w], lr=0.1, momentum=0.9, ns_steps=5)
    for _ in range(3):
        g = torch.randn(8, 4)
        w.grad = g.clone()
        opt.step()
        buf = 0.9 * buf + g
        ref -= 0.1 * (8 / 4) ** 0.5 * newton_schulz(g + 0.9 * buf, 5)
    torch.testing.assert_close(w.detach(), ref)


def test_optimizer_groups_cover_every_parameter_once():
    from pgolf.train.train import build_optimizers

    model = tiny()
    cfg = validate({})["train"]
    adam, muon = build_optimizers(model, cfg)
    groups = [g["params"] for g in adam.param_groups] + [muon.param_groups[0]["params"]]
    ids = [id(p) for g in groups for p in g]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert all(p.ndim == 2 for p in muon.param_groups[0]["params"])
    assert not any(p is b.resid_mix for b in model.blocks for p in muon.param_groups[0]["params"])
