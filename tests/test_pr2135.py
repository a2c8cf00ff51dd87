"""PR #2135's parts beyond PR #1855's: each a switch that changes the output or the update (the
asymmetric softcap, LoRA without K, TTT training the caps), the calibration volume in the record's
unit, and the preset against the record's log and against configs/pr1855.yaml."""

import copy
from pathlib import Path

import pytest
import torch
from test_phased_ttt import SEQ, STRIDE, eval_cfg, recurrent_model, run, val  # noqa: F401  (val: the fixture)
from test_pr1855_smoke import flatten
from test_switches import build, randomize, tokens, transplant

from pgolf.config import ConfigError, load, validate
from pgolf.eval.bpb import BPBMeter
from pgolf.eval.evaluate import run_ttt, windows
from pgolf.eval.lora import DocLoRA
from pgolf.model.gpt import GPT, count_parameters, token_losses
from pgolf.train.train import build_optimizers, param_groups, sync_and_clip

ROOT = Path(__file__).resolve().parent.parent
ASYM = {"asym_softcap": True}


def test_asym_softcap_starts_as_the_symmetric_cap_and_changes_the_output_once_apart():
    asym, plain = build(**ASYM), build()
    transplant(randomize(plain), asym)  # the caps keep their init: 30 and 30
    x = tokens()
    torch.testing.assert_close(asym(x), plain(x), rtol=0, atol=1e-6)  # the record: identical at step 0
    with torch.no_grad():
        asym.softcap_pos.fill_(2.0)
        asym.softcap_neg.fill_(5.0)
    assert not torch.allclose(asym(x), plain(x), atol=1e-3)


def test_asym_softcap_matches_the_records_formula():
    model = build(**ASYM)
    with torch.no_grad():
        model.softcap_pos.fill_(2.0)
        model.softcap_neg.fill_(5.0)
    z = torch.linspace(-12, 12, 25)
    want = torch.where(z >= 0, 2.0 * torch.tanh(z / 2.0), 5.0 * torch.tanh(z / 5.0))
    torch.testing.assert_close(model.softcap(z), want)
    assert model.state_dict()["softcap_pos"].shape == ()  # two scalars, as the record's nn.Parameters


def test_training_leaves_the_caps_at_their_init():
    """The record's optimizers hold neither cap, so a training step moves every other control tensor
    and not them (they take no gradient either: the clip norm is the record's)."""
    model = randomize(build(**ASYM))
    with torch.no_grad():
        model.softcap_pos.fill_(30.0)
        model.softcap_neg.fill_(30.0)
    cfg = validate({})["train"]
    groups = param_groups(model)
    caps = {id(model.softcap_pos), id(model.softcap_neg)}
    assert not caps & {id(p) for ps in groups.values() for p in ps}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens()
    token_losses(model, x[:, :-1], x[:, 1:]).mean().backward()
    assert model.softcap_pos.grad is None
    opts = build_optimizers(model, cfg)
    sync_and_clip(model, opts[1], 1, cfg["grad_clip"])
    for opt in opts:
        opt.step()
    after = model.state_dict()
    assert after["softcap_pos"] == after["softcap_neg"] == 30.0
    assert not torch.equal(after["skip_weights"], before["skip_weights"])


@pytest.mark.parametrize("mode", ["phased_lora", "chunk"])
def test_ttt_trains_the_caps_only_with_train_softcap(val, mode):  # noqa: F811
    tokens, luts = val
    base = recurrent_model(320, **ASYM)
    with torch.no_grad():  # caps that bend the logits: at 30 their gradient moves them less than an fp32 ulp
        base.softcap_pos.fill_(2.0)
        base.softcap_neg.fill_(3.0)
    start = (2.0, 3.0)
    bpb = {}
    for on in (False, True):
        model = copy.deepcopy(base)
        cfg = {**eval_cfg(mode=mode)["ttt"], "train_softcap": on}  # config.py pairs it with model.asym_softcap
        bpb[on] = run_ttt(model, tokens, windows(len(tokens), SEQ, STRIDE), SEQ, 8, cfg, BPBMeter(luts))["val_bpb"]
        moved = (model.softcap_pos.item(), model.softcap_neg.item())
        assert (moved[0] != start[0] and moved[1] != start[1]) if on else moved == start, (on, moved)
    assert bpb[True] != bpb[False]  # the chunks (documents) after the first update score through the moved caps


def test_phased_ttt_without_k_adapters(val):  # noqa: F811
    model = recurrent_model(320)
    with_k, without = DocLoRA(model, 2, 4, 8.0), DocLoRA(model, 2, 4, 8.0, k=False)
    assert without.k is None and len(without.handles) == len(with_k.handles) - len(model.blocks)
    per_slot = sum(p.numel() for p in with_k.k.parameters())
    assert sum(p.numel() for p in with_k.parameters()) - sum(p.numel() for p in without.parameters()) == per_slot
    with_k.detach()
    without.detach()
    assert run(model, val, eval_cfg(lora_k=False))[0]["val_bpb"] != run(model, val, eval_cfg())[0]["val_bpb"]


def calibrate(train: dict, **cal) -> dict:
    return validate({"train": train, "calibrate": cal})["calibrate"]


def test_calibration_counts_in_the_records_batches():
    """batches x the per-process micro-batch (micro_batch_seqs, at most the sequences per process),
    of train.seq_len tokens: #1855's 16 x 48 x 2,048 per process, #2135's 32."""
    record = {"nproc": 8, "seq_len": 2048, "batch_tokens": 786432, "micro_batch_seqs": 48}
    assert calibrate(record, batches=16) | {"seqs": 768, "seq_len": 2048} == calibrate(record, batches=16)
    assert calibrate({**record, "nproc": 1}, batches=32)["seqs"] == 1536  # grad accumulation: the same batch
    assert calibrate({**record, "micro_batch_seqs": 96}, batches=2)["seqs"] == 96  # at most 48 a process
    assert calibrate(record, batches=0, seqs=8, seq_len=64)["seqs"] == 8  # 0: counted in sequences
    assert calibrate(record, batches=2, seqs=96, seq_len=2048)["seqs"] == 96  # written, and agreeing
    with pytest.raises(ConfigError, match=r"calibrate.seqs: 8 disagrees with calibrate.batches=16"):
        calibrate(record, batches=16, seqs=8)
    with pytest.raises(ConfigError, match=r"calibrate.seq_len: 64 disagrees"):
        calibrate(record, batches=1, seq_len=64)
    assert load(ROOT / "configs" / "pr1855.yaml")["calibrate"]["seqs"] == 16 * 48
    assert load(ROOT / "configs" / "pr2135.yaml")["calibrate"]["seqs"] == 32 * 48
    assert validate({})["calibrate"]["batches"] == 0  # the CPU default stays 64 sequences


def test_switches_refuse_what_they_cannot_apply_to():
    with pytest.raises(ConfigError, match="model.asym_softcap .*logit_softcap above 0"):
        validate({"model": {"asym_softcap": True, "logit_softcap": 0}})
    with pytest.raises(ConfigError, match="eval.ttt.train_softcap .* model.asym_softcap: true"):
        validate({"eval": {"ttt": {"train_softcap": True}}})


# Every key where the preset differs from configs/pr1855.yaml: PR #2130's changes and #2135's one.
FROM_1855 = {
    "run": "pr2135", "seeds": [314, 42, 0], "model.asym_softcap": True, "model.smear_bos_fix": False,
    "train.matrix_lr": 0.028, "calibrate.batches": 32, "calibrate.seqs": 1536, "quant.int8_rows": [],
    "quant.lqer.group": 32, "compress.sort_rows": ["tok_emb", "attn", "mlp"], "eval.seq_len": 2560,
    "eval.ttt.lora_lr": 8e-5, "eval.ttt.lora_weight_decay": 2.0, "eval.ttt.lora_k": False, "eval.ttt.phases": 1,
    "eval.ngram_tilt.enabled": True, "compare.metric": "ttt_ngram_bpb",
    "compare.baseline_mean": 1.05651, "compare.baseline_std": 0.00036,
}


def test_preset_is_pr1855_with_the_records_changes_and_its_parameter_count():
    old, new = flatten(load(ROOT / "configs" / "pr1855.yaml")), flatten(load(ROOT / "configs" / "pr2135.yaml"))
    assert {k: new[k] for k in new if new[k] != old[k]} == FROM_1855
    cfg = load(ROOT / "configs" / "pr2135.yaml")
    assert count_parameters(GPT(8192, cfg["model"]))["total"] == 35_945_673  # its logs' model_params
