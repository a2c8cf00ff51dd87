"""The records' quantization choices, each a quant option: each one changes the codes or the bytes,
and each record preset sets every quant key itself."""

from pathlib import Path

import pytest
import torch

from pgolf.config import load, validate
from pgolf.formats import tensorfile
from pgolf.quant.artifact import encode
from pgolf.quant.clip import quantile_scale, row_scales
from pgolf.quant.quantize import quantize_state

REPO = Path(__file__).resolve().parent.parent
BASE = validate({"quant": {"method": "rtn", "clip": "search", "min_numel": 4096}})["quant"]
LZMA = {**validate({"compress": {"codec": "lzma"}})["compress"], "level": 6, "shuffle": 0}


def state(std: float = 0.02, seed: int = 0) -> dict[str, torch.Tensor]:
    """A model-shaped state dict: embedding, attention and MLP matrices, a small matrix, control tensors."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g) * std  # noqa: E731
    return {"tok_emb.weight": rnd(256, 64), "blocks.0.attn.c_q.weight": rnd(64, 64) * torch.logspace(-1, 0, 64),
            "blocks.0.mlp.fc.weight": rnd(192, 64), "blocks.0.mlp.proj.weight": rnd(64, 192),
            "bigram.proj.weight": rnd(64, 80), "blocks.0.attn.q_gain": torch.full((4,), 1.5),
            "blocks.0.attn_scale": torch.ones(64)}


def artifact_bytes(sd: dict, cfg: dict) -> tuple[int, dict]:
    tensors, plan, bits, _ = quantize_state(sd, cfg)
    meta = {"vocab_size": 256, "quant": {"method": cfg["method"], "clip": cfg["clip"], "plan": plan, "bits": bits}}
    return len(encode(tensorfile.dumps(tensors, meta), LZMA)), tensors


def test_scale_floor_binds_on_young_weights():
    """At the records' floor (scale >= 1/31 for int6) small weights become mostly 0 and +-1: far fewer bytes."""
    young = state(std=0.005)
    free, free_t = artifact_bytes(young, BASE)
    floored, floored_t = artifact_bytes(young, {**BASE, "clip_floor": 1.0})
    codes = floored_t["blocks.0.mlp.fc.weight.codes"]
    assert float(floored_t["blocks.0.mlp.fc.weight.scale"].float().min()) == pytest.approx(1 / 31, rel=1e-3)
    assert float((codes.abs() <= 1).float().mean()) > 0.95 > float((free_t["blocks.0.mlp.fc.weight.codes"].abs() <= 1)
                                                                    .float().mean())
    assert floored < free / 2
    int8 = row_scales(young["tok_emb.weight"], 8, {**BASE, "clip": "quantile", "clip_floor": 1.0}, "embed")
    assert float(int8.float().min()) == pytest.approx(1 / 127, rel=1e-3)


def test_clip_per_matrix_picks_one_quantile_by_plain_mse():
    w = state()["blocks.0.attn.c_q.weight"]
    w[3, 5] = 0.5  # one outlier row: per row, its own clip; per matrix, one quantile for all
    row = row_scales(w, 6, BASE, "attn")
    matrix = row_scales(w, 6, {**BASE, "clip_scope": "matrix"}, "attn")
    assert not torch.equal(row, matrix)
    assert any(torch.equal(matrix, quantile_scale(w, 6, q)) for q in BASE["clip_search"])
    errors = {q: float((w - torch.round(w / s.float()[:, None]).clamp(-31, 31) * s.float()[:, None]).square().mean())
              for q in BASE["clip_search"] for s in [quantile_scale(w, 6, q)]}
    assert torch.equal(matrix, quantile_scale(w, 6, min(errors, key=errors.get)))


def test_clip_per_group():
    sd = state()
    per_group = {**BASE, "clip": {"embed": "quantile", "attn": "search", "mlp": "search", "other": "quantile"},
                 "clip_quantile": 0.5}
    a, b = quantize_state(sd, BASE)[0], quantize_state(sd, per_group)[0]
    assert not torch.equal(a["tok_emb.weight.scale"], b["tok_emb.weight.scale"])
    assert torch.equal(a["blocks.0.mlp.fc.weight.codes"], b["blocks.0.mlp.fc.weight.codes"])


def test_records_passthrough_threshold_and_fp16_control_tensors():
    sd = state()
    _, plan, _, _ = quantize_state(sd, BASE)
    assert plan["bigram.proj.weight"] == "int" and plan["blocks.0.attn.q_gain"] == "fp32"
    records = {**BASE, "min_numel": 65536, "control_dtype": "fp16"}
    tensors, plan, _, _ = quantize_state(sd, records)
    assert plan["bigram.proj.weight"] == plan["blocks.0.mlp.fc.weight"] == plan["blocks.0.attn.q_gain"] == "fp16"
    assert tensors["blocks.0.attn_scale"].dtype == torch.float16
    assert artifact_bytes(sd, {**BASE, "control_dtype": "fp16"})[0] < artifact_bytes(sd, BASE)[0]


def test_fp16_embedding_int5_mlp_and_magnitude_pruning():
    sd = state()
    tensors, plan, bits, _ = quantize_state(sd, {**BASE, "keep_fp16": ["tok_emb"], "bits": {**BASE["bits"], "mlp": 5}})
    assert plan["tok_emb.weight"] == "fp16" and tensors["tok_emb.weight"].dtype == torch.float16
    assert bits["blocks.0.mlp.fc.weight"] == 5 and int(tensors["blocks.0.mlp.fc.weight.codes"].abs().max()) <= 15
    plain, plain_t = artifact_bytes(sd, BASE)
    pruned, pruned_t = artifact_bytes(sd, {**BASE, "magnitude_prune": 0.03})
    w, codes = sd["blocks.0.mlp.fc.weight"], pruned_t["blocks.0.mlp.fc.weight.codes"]
    small = w.abs() < w.abs().flatten().kthvalue(int(0.03 * w.numel())).values
    assert not codes[small].any() and pruned < plain
    assert float((codes == 0).float().mean()) > float((plain_t["blocks.0.mlp.fc.weight.codes"] == 0).float().mean())
    assert torch.equal(pruned_t["blocks.0.attn.q_gain"], plain_t["blocks.0.attn.q_gain"])  # control tensors untouched


RECORDS = {  # preset -> the quant keys its record's export implies
    "pr549": {"method": "rtn", "clip_scope": "matrix", "clip_floor": 1.0, "min_numel": 65536, "control_dtype": "fp16",
              "keep_fp16": [], "magnitude_prune": 0, "bits": {"embed": 8, "attn": 6, "mlp": 6, "other": 8}},
    "pr1326": {"method": "gptq", "clip_scope": "matrix", "clip_floor": 1.0, "min_numel": 65536,
               "control_dtype": "fp16", "keep_fp16": [], "magnitude_prune": 0},
    "pr1517": {"method": "gptq", "clip": "sdclip", "clip_floor": 0, "min_numel": 65536, "control_dtype": "fp16",
               "clip_k": {"embed": 20.0, "attn": 9.5, "mlp": 9.5, "other": 9.5}},
    "pr461": {"method": "rtn", "clip_floor": 1.0, "min_numel": 65536, "control_dtype": "fp16",
              "keep_fp16": ["tok_emb"], "magnitude_prune": 0.03, "bits": {"embed": 8, "attn": 6, "mlp": 5, "other": 8}},
}


@pytest.mark.parametrize("preset", sorted(RECORDS))
def test_presets_set_their_records_quantization_and_prune(preset):
    cfg = load(REPO / "configs" / f"{preset}.yaml")
    for key, value in RECORDS[preset].items():
        assert cfg["quant"][key] == value, key
    assert load(REPO / "config.yaml", REPO / "configs" / f"{preset}.yaml")["quant"] == cfg["quant"]
    written = (REPO / "configs" / f"{preset}.yaml").read_text().split("\nquant:\n", 1)[1].split("\ncompress:", 1)[0]
    assert all(f"\n  {key}:" in f"\n{written}" for key in BASE if key not in ("block_size", "damp", "act_order"))
    assert cfg["compress"]["prune"]
