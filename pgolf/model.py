"""The challenge's baseline GPT (openai/parameter-golf train_gpt.py), every size from config.

GQA attention with QK RMSNorm, RoPE and a learnable per-head query gain; relu^2 MLP; resid_mix
with the post-embedding input x0; U-Net skips from the first half of the blocks to the second;
tied embeddings; logits softcapped by c*tanh(z/c).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pgolf import tensorfile


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, H, T, D)
        t = torch.arange(x.size(2), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos().to(x.dtype), freqs.sin().to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int, kv_heads: int, rope_base: float, q_gain: float) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, d // heads
        kv_dim = kv_heads * self.head_dim
        self.c_q = nn.Linear(d, d, bias=False)
        self.c_k = nn.Linear(d, kv_dim, bias=False)
        self.c_v = nn.Linear(d, kv_dim, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.proj.weight)  # each block starts as the identity
        self.q_gain = nn.Parameter(torch.full((heads,), q_gain))
        self.rotary = Rotary(self.head_dim, rope_base)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q = self.c_q(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(rms_norm(q)), self.rotary(rms_norm(k))
        q = q * self.q_gain.to(q.dtype)[None, :, None, None]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, hidden, bias=False)
        self.proj = nn.Linear(hidden, d, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: dict) -> None:
        super().__init__()
        d = cfg["model_dim"]
        self.attn = Attention(d, cfg["num_heads"], cfg["num_kv_heads"], cfg["rope_base"], cfg["qk_gain_init"])
        self.mlp = MLP(d, int(cfg["mlp_mult"] * d))
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))

    def forward(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        x = mix[0] * x + mix[1] * x0
        x = x + self.attn_scale.to(x.dtype) * self.attn(rms_norm(x))
        return x + self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, cfg: dict) -> None:
        super().__init__()
        self.vocab_size, self.cfg = vocab_size, dict(cfg)
        d, n = cfg["model_dim"], cfg["num_layers"]
        self.tok_emb = nn.Embedding(vocab_size, d)
        nn.init.normal_(self.tok_emb.weight, std=cfg["tied_embed_init_std"])
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(n))
        self.num_encoder = n // 2
        self.skip_weights = nn.Parameter(torch.ones(min(self.num_encoder, n - self.num_encoder), d))

    def head_input(self, idx: Tensor) -> Tensor:
        """The normalized final hidden state that multiplies tok_emb.weight (GPTQ calibrates the tied head on it)."""
        x = x0 = rms_norm(self.tok_emb(idx))
        skips = []
        for block in self.blocks[: self.num_encoder]:
            x = block(x, x0)
            skips.append(x)
        for i, block in enumerate(self.blocks[self.num_encoder :]):
            if skips:  # U-Net: the last encoder output feeds the first decoder block, and so on
                x = x + self.skip_weights[i].to(x.dtype) * skips.pop()
            x = block(x, x0)
        return rms_norm(x)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.head_input(idx)
        logits = F.linear(x, self.tok_emb.weight.to(x.dtype)).float()
        cap = self.cfg["logit_softcap"]
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def meta(self) -> dict:
        return {"vocab_size": self.vocab_size, "model": dict(self.cfg)}

    @classmethod
    def from_meta(cls, meta: dict) -> GPT:
        return cls(meta["vocab_size"], meta["model"])


def token_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy in nats per target, shape (B, T), float32."""
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(y)


def load_weights(path: str | Path) -> GPT:
    tensors, meta = tensorfile.load(path)
    model = GPT.from_meta(meta)
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    return model
