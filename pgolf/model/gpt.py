"""The challenge's GPT with every record technique as a config switch (schemas: the `model` section).

At the defaults it is the baseline train_gpt.py: GQA attention with QK RMSNorm, RoPE and a learnable
per-head query gain; relu^2 MLP; resid_mix with the post-embedding input x0; U-Net skips; tied
embeddings; logits softcapped by c*tanh(z/c). The switches add the records' ideas on top: LeakyReLU^2,
partial RoPE with NTK scaling, LN scale, XSA, BigramHash, SmearGate, value embeddings, sigmoid skip
gates, depth recurrence and parallel residuals; `pgolf/model/layers.py` holds the small modules.

Naming rule the quantizer relies on: every matrix is an nn.Linear or nn.Embedding (its name ends in
".weight"); every control tensor (gains, scales, mixes, gates) is a bare parameter with another name.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf.errors import PgolfError
from pgolf.formats import tensorfile
from pgolf.model.layers import (
    BigramHash,
    DocMask,
    GateLinear,
    InputSmearGate,
    Rotary,
    SmearGate,
    ValueEmbedding,
    attend,
    doc_mask,
    exclusive,
    fake_quant,
    rms_norm,
)


class Linear(nn.Linear):
    """nn.Linear without bias whose forward can fake-quantize its weight (late QAT, straight-through).

    The switch is a tensor, not a Python flag, so torch.compile keeps it in the graph instead of
    constant-folding it (the bug that made late QAT dead code in PR #414's lineage).
    """

    def __init__(self, fan_in: int, fan_out: int, qat_bits: int = 0, zero: bool = False) -> None:
        super().__init__(fan_in, fan_out, bias=False)
        self.qat_bits, self.zero = qat_bits, zero
        self.register_buffer("qat_on", torch.zeros(()), persistent=False)
        if zero:  # an output projection: each block (and an untied head) starts contributing nothing
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.qat_bits:
            w = w + self.qat_on * (fake_quant(w, self.qat_bits) - w).detach()
        return F.linear(x, w.to(x.dtype))


class Attention(nn.Module):
    def __init__(self, cfg: dict, xsa: bool) -> None:
        super().__init__()
        d, q = cfg["model_dim"], cfg["qat_bits"]
        self.heads, self.kv_heads = cfg["num_heads"], cfg["num_kv_heads"]
        self.head_dim = d // self.heads
        kv_dim = self.kv_heads * self.head_dim
        self.c_q, self.c_k, self.c_v = Linear(d, d, q), Linear(d, kv_dim, q), Linear(d, kv_dim, q)
        self.proj = Linear(d, d, q, zero=True)  # each block starts as the identity
        self.q_gain = nn.Parameter(torch.full((self.heads,), float(cfg["qk_gain_init"])))
        self.rotary = Rotary(self.head_dim, cfg["rope_dims"], cfg["rope_base"], cfg["rope_ntk_train_len"])
        self.qk_norm, self.xsa, self.backend = cfg["qk_norm"], xsa, cfg["attention"]
        # The sparse head-output gate reads the attention input's first dims (PR #1787/#1855).
        self.attn_gate = GateLinear(cfg["attn_gate_window"], self.heads) if cfg["attn_gate_window"] else None
        self.gate_scale = cfg["attn_gate_scale"]

    def forward(self, x: Tensor, v_extra: Tensor | None = None, mask: DocMask | None = None) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.heads, self.head_dim)
        k = self.c_k(x).view(B, T, self.kv_heads, self.head_dim)
        v = self.c_v(x)
        if v_extra is not None:  # value embeddings feed token identity straight into V
            v = v + v_extra
        v = v.view(B, T, self.kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = rms_norm(q), rms_norm(k)
        q, k = self.rotary(q), self.rotary(k)
        q = q * self.q_gain.to(q.dtype)[:, None]
        y = attend(q, k, v, self.backend, mask)  # (B, T, H, D)
        if self.xsa:
            y = exclusive(y, v)
        if self.attn_gate is not None:
            g = self.attn_gate(x[..., : self.attn_gate.in_features])
            y = y * torch.sigmoid(self.gate_scale * g).unsqueeze(-1)
        return self.proj(y.reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        d, q = cfg["model_dim"], cfg["qat_bits"]
        hidden = int(cfg["mlp_mult"] * d)
        self.fc, self.proj = Linear(d, hidden, q), Linear(hidden, d, q, zero=True)
        self.slope = cfg["leaky_slope"] if cfg["activation"] == "leaky_relu2" else 0.0

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h = F.leaky_relu(h, self.slope) if self.slope else F.relu(h)
        return self.proj(h.square())


class Controls(nn.Module):
    """A looped block's control tensors for one extra pass (its own norms, PR #461)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))


class Block(nn.Module):
    """Attention and MLP weights (the core, shared by every pass) and the first pass's controls;
    `extra` holds the controls of later passes when a looped block has its own norms."""

    def __init__(self, cfg: dict, index: int, passes: int) -> None:
        super().__init__()
        d, n = cfg["model_dim"], cfg["num_layers"]
        self.attn = Attention(cfg, xsa=index >= n - cfg["xsa_last_n"])
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))
        self.extra = nn.ModuleList(Controls(d) for _ in range(passes - 1))
        self.parallel = 0 <= cfg["parallel_from"] <= index and cfg["parallel_mode"] == "gptj"

    def controls(self, ctl: int) -> nn.Module:
        return self.extra[min(ctl, len(self.extra)) - 1] if ctl and len(self.extra) else self

    def forward(self, x: Tensor, x0: Tensor, ctl: int, norm_scale: float, v_extra: Tensor | None,
                mask: DocMask | None = None) -> Tensor:
        c = self.controls(ctl)
        mix = c.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        a = self.attn(rms_norm(x) * norm_scale, v_extra, mask)
        if self.parallel:  # GPT-J style: attention and MLP both read the block's input
            return x + c.attn_scale.to(x.dtype) * a + c.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * norm_scale)
        x = x + c.attn_scale.to(x.dtype) * a
        return x + c.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * norm_scale)

    def lanes(self, attn_lane: Tensor, mlp_lane: Tensor, x0: Tensor, ctl: int, norm_scale: float,
              v_extra: Tensor | None, mask: DocMask | None = None) -> tuple[Tensor, Tensor]:
        """Two-lane parallel residuals (PR #1334): attention reads and writes its own lane (with
        resid_mix), the MLP its own (without); the model merges the lanes after the last block."""
        c = self.controls(ctl)
        mix = c.resid_mix.to(attn_lane.dtype)
        h = mix[0] * attn_lane + mix[1] * x0
        attn_lane = h + c.attn_scale.to(h.dtype) * self.attn(rms_norm(h) * norm_scale, v_extra, mask)
        mlp_lane = mlp_lane + c.mlp_scale.to(h.dtype) * self.mlp(rms_norm(mlp_lane) * norm_scale)
        return attn_lane, mlp_lane

    def mixed_lanes(self, lane0: Tensor, lane1: Tensor, x0: Tensor, ctl: int, norm_scale: float,
                    v_extra: Tensor | None, post: Tensor, resid: Tensor,
                    mask: DocMask | None = None) -> tuple[Tensor, Tensor]:
        """PR #1530/#1855's lanes: attention reads lane 0 (with resid_mix), the MLP reads lane 1, and
        each lane k becomes resid[k] lane_k + post[0, k] attn + post[1, k] mlp."""
        c = self.controls(ctl)
        mix, post, resid = c.resid_mix.to(lane0.dtype), post.to(lane0.dtype), resid.to(lane0.dtype)
        h = rms_norm(mix[0] * lane0 + mix[1] * x0) * norm_scale
        a = c.attn_scale.to(lane0.dtype) * self.attn(h, v_extra, mask)
        m = c.mlp_scale.to(lane0.dtype) * self.mlp(rms_norm(lane1) * norm_scale)
        return (resid[0] * lane0 + post[0, 0] * a + post[1, 0] * m,
                resid[1] * lane1 + post[0, 1] * a + post[1, 1] * m)


def layer_order(cfg: dict, recur: bool = True) -> list[int]:
    """Physical block index of each virtual layer: the recurrent span runs 1 + recur_extra_loops times;
    with logical_layers, logical layer j runs block j mod num_layers (PR #461: 11 over 10 cores)."""
    n, span = cfg["num_layers"], cfg["recur_layers"]
    if cfg["logical_layers"]:
        return [j % n for j in range(cfg["logical_layers"])]
    if not (recur and span):
        return list(range(n))
    a, b = min(span), max(span)
    return list(range(b + 1)) + list(range(a, b + 1)) * cfg["recur_extra_loops"] + list(range(b + 1, n))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, cfg: dict) -> None:
        super().__init__()
        self.vocab_size, self.cfg = vocab_size, dict(cfg)
        d, n = cfg["model_dim"], cfg["num_layers"]
        self.tok_emb = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.tok_emb.weight, std=cfg["tied_embed_init_std"])
        order = layer_order(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i, order.count(i) if cfg["recur_own_norms"] else 1) for i in range(n))
        self.recur_active = True  # the trainer switches recurrence off until its start step
        # The records with recurrence (#1334, #1517) keep the physical layers' skip count and LN scale.
        counted = n if cfg["recur_indexing"] == "physical" else len(order)  # virtual_skips: virtual
        n_skips = min(counted // 2, counted - counted // 2) if cfg["skip"] != "none" else 0
        self.skip_weights = nn.Parameter(torch.ones(n_skips, d))
        if cfg["skip"] == "gated":
            self.skip_gates = nn.Parameter(torch.zeros(n_skips, d))
        self.bigram = BigramHash(vocab_size, cfg, d) if cfg["bigram_buckets"] else None
        self.smear = self.smear_gate(cfg) if cfg["smear_gate"] else None
        self.ve = ValueEmbedding(vocab_size, cfg, self.blocks[0].attn.kv_heads * self.blocks[0].attn.head_dim) \
            if cfg["ve_layers"] else None
        self.lm_head = None if cfg["tie_embeddings"] else Linear(d, vocab_size, zero=True)
        self.lanes_from = cfg["parallel_from"] if cfg["parallel_mode"] == "lanes" else -1
        if self.lanes_from >= 0:
            self.lane_merge = nn.Parameter(torch.tensor(0.5))  # the attention lane's share at the merge
        self.mixed_from = cfg["parallel_from"] if cfg["parallel_mode"] == "mixed_lanes" else -1
        if self.mixed_from >= 0:  # one row per block, as the record allocates them (its count includes all)
            self.lane_post = nn.Parameter(torch.ones(n, 2, 2))  # [block, attn/mlp output, lane written]
            self.lane_resid = nn.Parameter(torch.full((n, 2), 1.1))
        if cfg["asym_softcap"]:  # PR #1923's AsymLogit rescale; fixed unless TTT trains them (eval.ttt.train_softcap)
            cap = float(cfg["logit_softcap"])
            self.softcap_pos = nn.Parameter(torch.tensor(cap), requires_grad=False)
            self.softcap_neg = nn.Parameter(torch.tensor(cap), requires_grad=False)
        if cfg["init"] == "orthogonal":
            self.orthogonal_init()

    @staticmethod
    def smear_gate(cfg: dict) -> nn.Module:
        bos = cfg["bos_id"] if cfg["smear_bos_fix"] else -1
        if cfg["smear_mode"] == "input":
            return InputSmearGate(cfg["smear_window"], bos)
        return SmearGate(cfg["model_dim"], bos, cfg["smear_zero_pad"])

    @torch.no_grad()
    def orthogonal_init(self) -> None:
        """The records' init (PR #549 lineage): every matrix of at least 64x64 orthogonal with gain 1
        (Q, K, V, MLP up, the BigramHash and value-embedding projections), the output projections
        zero; the BigramHash table zero and the value-embedding table at std 0.01."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and not getattr(m, "zero", False) and min(m.weight.shape) >= 64:
                nn.init.orthogonal_(m.weight, gain=1.0)
        if self.bigram is not None:
            nn.init.zeros_(self.bigram.emb.weight)
        if self.ve is not None:
            nn.init.normal_(self.ve.emb.weight, std=0.01)

    def set_qat(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, Linear):
                m.qat_on.fill_(float(on))

    def embed(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx)
        if self.bigram is not None:
            x = x + self.bigram(idx)
        if self.smear is None:
            return self.to_stream(rms_norm(x))
        if self.cfg["smear_mode"] == "input":  # the record smears the raw embedding, before its norm
            return self.to_stream(rms_norm(self.smear(x, idx)))
        return self.smear(self.to_stream(rms_norm(x)), idx)

    def to_stream(self, x: Tensor) -> Tensor:
        if self.cfg["stream_dtype"] == "bfloat16":  # the records' bf16 embedding and residual stream
            x = x.bfloat16()
        return x

    def head_input(self, idx: Tensor) -> Tensor:
        """The normalized final hidden state that the output matrix multiplies (GPTQ calibrates on it)."""
        x = x0 = self.embed(idx)
        order = layer_order(self.cfg, self.recur_active)
        n_enc, skips, passes = len(order) // 2, [], [0] * len(self.blocks)
        ve = self.ve(idx) if self.ve is not None else None
        # Attention stays inside a document (VarLen, PR #1530): one mask per batch for every layer.
        mask = None
        if self.cfg["doc_attention"]:
            mask = doc_mask((idx == self.cfg["bos_id"]).cumsum(1), self.cfg["attention"])
        physical = self.cfg["recur_indexing"] in ("physical", "virtual_skips")
        lanes, lane1 = None, None  # #1334's lane pair; #1855's MLP lane (x is its attention lane)
        for j, i in enumerate(order):
            if 0 <= self.mixed_from <= i and j >= n_enc and lane1 is None:  # decoder only, as #1855
                lane1 = x  # before the skip: #1855 adds skips to the attention lane only
            if j >= n_enc and skips and j - n_enc < len(self.skip_weights):
                x = self.merge_skip(x, skips.pop(), j - n_enc)  # once #1334's lanes run, x is no longer read
            scale = ((i if physical else j) + 1) ** -0.5 if self.cfg["ln_scale"] else 1.0
            v_extra = self.ve.for_layer(ve, j if self.cfg["logical_layers"] else i) if ve is not None else None
            if 0 <= self.lanes_from <= i and lanes is None:
                lanes = (x, x)
            if lanes is not None:
                lanes = self.blocks[i].lanes(*lanes, x0, passes[i], scale, v_extra, mask)
            elif lane1 is not None:
                x, lane1 = self.blocks[i].mixed_lanes(x, lane1, x0, passes[i], scale, v_extra,
                                                      self.lane_post[i], self.lane_resid[i], mask)
            else:
                x = self.blocks[i](x, x0, passes[i], scale, v_extra, mask)
            passes[i] += 1
            if j < n_enc:
                skips.append(x)
        if lanes is not None:
            m = self.lane_merge.to(lanes[0].dtype)
            x = m * lanes[0] + (1 - m) * lanes[1]
        if lane1 is not None:
            x = 0.5 * (x + lane1)
        return rms_norm(x)

    def merge_skip(self, x: Tensor, skip: Tensor, i: int) -> Tensor:
        s = self.skip_weights[i].to(x.dtype) * skip
        if self.cfg["skip"] == "gated":  # sigmoid gate between the skip and the stream
            return torch.lerp(s, x, torch.sigmoid(self.skip_gates[i]).to(x.dtype))
        return x + s

    def forward(self, idx: Tensor) -> Tensor:
        h = self.head_input(idx)
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        return self.softcap(F.linear(h, w.to(h.dtype)).float())

    def softcap(self, logits: Tensor) -> Tensor:
        """c tanh(z / c); with asym_softcap, c_+ for z >= 0 and c_- below (PR #1923, #2130)."""
        if self.cfg["asym_softcap"]:
            pos, neg = self.softcap_pos.to(logits.dtype), self.softcap_neg.to(logits.dtype)
            return torch.where(logits >= 0, pos * torch.tanh(logits / pos), neg * torch.tanh(logits / neg))
        cap = self.cfg["logit_softcap"]
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def meta(self) -> dict:
        return {"vocab_size": self.vocab_size, "model": dict(self.cfg)}

    @classmethod
    def from_meta(cls, meta: dict) -> GPT:
        """The model a weights file describes. Its model config is complete: train writes the whole
        validated section, so no schema (and no jsonschema) is needed here, in code a submission runs."""
        try:
            return cls(meta["vocab_size"], meta["model"])
        except (KeyError, TypeError) as e:
            raise PgolfError(f"model config in the file's header is incomplete or malformed ({e!r}); "
                             "written by an older pgolf? retrain") from None


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters by top-level module ("blocks", "tok_emb", ...), plus "total"."""
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        counts[top] = counts.get(top, 0) + p.numel()
    counts["total"] = sum(counts.values())
    return counts


def token_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy in nats per target, shape (B, T), float32."""
    return logit_losses(model(x), y)


def logit_losses(logits: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy in nats of each target y (B, T) under logits (B, T, V)."""
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def load_weights(path: str | Path) -> GPT:
    tensors, meta = tensorfile.load(path)
    model = GPT.from_meta(meta)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model
