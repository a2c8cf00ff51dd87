"""Small modules and functions of the model: norms, rotary embeddings, the attention kernels, XSA,
fake quantization, and the token-side extras (BigramHash, SmearGate, value embeddings).

Tensors inside attention are laid out (batch, time, heads, head_dim), FlashAttention 3's layout.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

try:  # FlashAttention 3 (Hopper); SDPA otherwise
    from flash_attn_interface import flash_attn_func as _fa3
except ImportError:
    _fa3 = None


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """RoPE on the first `dims` of each head (0 = all); the rest carry content without position.

    With `ntk_train_len` set, sequences longer than it get the NTK-aware base
    base * (T / train_len) ** (dims / (dims - 2)), which stretches the low frequencies instead of
    extrapolating them.
    """

    def __init__(self, head_dim: int, dims: int, base: float, ntk_train_len: int = 0) -> None:
        super().__init__()
        self.dims, self.base, self.ntk_train_len = dims or head_dim, base, ntk_train_len

    def forward(self, x: Tensor) -> Tensor:  # (B, T, H, D)
        T, rd = x.size(1), self.dims
        base = self.base
        if self.ntk_train_len and T > self.ntk_train_len:
            base = base * (T / self.ntk_train_len) ** (rd / (rd - 2))
        inv_freq = base ** -(torch.arange(0, rd, 2, device=x.device, dtype=torch.float32) / rd)
        freqs = torch.outer(torch.arange(T, device=x.device, dtype=torch.float32), inv_freq)
        cos, sin = freqs.cos()[None, :, None].to(x.dtype), freqs.sin()[None, :, None].to(x.dtype)
        rot, rest = x[..., :rd], x[..., rd:]
        x1, x2 = rot.chunk(2, dim=-1)
        return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest), dim=-1)


DocMask = BlockMask | Tensor  # what doc_mask builds: Flex's block mask or SDPA's boolean mask


def fa3_available() -> bool:
    return _fa3 is not None


def attend(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto", mask: DocMask | None = None) -> Tensor:
    """Causal attention with GQA; FlashAttention 3 on CUDA when asked for or importable, else SDPA.
    With `mask` (doc_mask's, built once per batch), a position attends only within its own document:
    FlexAttention with a block mask, or SDPA with a dense boolean mask where Flex cannot run (the same
    scores as the records' VarLen kernel)."""
    if backend == "fa3" and (_fa3 is None or not q.is_cuda):
        raise RuntimeError("model.attention is 'fa3' but flash_attn_interface is not importable on CUDA here")
    if mask is None and backend != "sdpa" and _fa3 is not None and q.is_cuda:
        out = _fa3(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal=True)
        return (out[0] if isinstance(out, tuple) else out).to(v.dtype)
    q, k, v = (t.transpose(1, 2).to(v.dtype) for t in (q, k, v))
    gqa = k.size(1) != q.size(1)
    if isinstance(mask, BlockMask):
        y = _fused(flex_attention)(q, k, v, block_mask=mask, enable_gqa=gqa)
    elif mask is not None:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    else:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return y.transpose(1, 2)


def doc_mask(docs: Tensor, backend: str) -> DocMask:
    """Causal and same-document attention for `docs` (B, T), a document index per position, built once
    per batch for every layer: FlexAttention's block mask where Flex runs this pass (forward and, with
    grad on, backward: torch 2.13 has no Flex backward on CPU) unless `backend` is 'sdpa'; otherwise
    SDPA's dense (B, 1, T, T) boolean mask."""
    B, T = docs.shape
    if backend != "sdpa" and flex_runs(docs.device.type, torch.is_grad_enabled()):
        def same_doc(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
            return (q >= kv) & (docs[b, q] == docs[b, kv])

        return _fused(create_block_mask)(same_doc, B, None, T, T, device=docs.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=docs.device).tril()
    return (causal & (docs[:, :, None] == docs[:, None, :])).unsqueeze(1)


@torch.compiler.assume_constant_result  # a compiled model calls it once while tracing, as a constant
def flex_runs(device_type: str, grad: bool) -> bool:
    """Whether FlexAttention runs on this device type, with a backward pass when `grad`."""
    return _flex_probe(device_type, grad)


@functools.cache
def _flex_probe(device_type: str, grad: bool) -> bool:
    q = torch.zeros(1, 1, 16, 8, device=device_type, requires_grad=grad)
    try:  # a tiny unfused call: Flex refuses what it cannot do (e.g. backward on CPU) before computing
        with warnings.catch_warnings():  # its advice to compile, which the real calls are
            warnings.simplefilter("ignore")
            out = flex_attention(q, q, q)
        if grad:
            out.sum().backward()
    except NotImplementedError as e:
        when = " with gradients" if grad else ""
        print(f"document attention: masked SDPA on {device_type}{when} ({e})", file=sys.stderr)
        return False
    return True


def _fused(fn: Callable) -> Callable:
    """`fn` compiled: unfused, FlexAttention materializes every score (6x slower than masked SDPA on
    CPU) and create_block_mask builds the whole (B, T, T) mask (7-25x slower). Inside a compiled model
    the outer compile fuses them; otherwise each is compiled on its own."""
    return fn if torch.compiler.is_compiling() else functools.partial(_run_compiled, fn)


def _run_compiled(fn: Callable, *args: object, **kwargs: object) -> object:
    try:
        return _compiled(fn)(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as e:
        # No C++ compiler or Triton, a killed compile worker: the probe's unfused call ran, so the
        # error's last line says what failed and how to run without Flex (its cause keeps Inductor's dump).
        why = (str(e.inner_exception).strip().splitlines() or [type(e.inner_exception).__name__])[0]
        raise RuntimeError(f"document attention: FlexAttention's {fn.__name__} failed to compile ({why}); "
                           "model.attention: sdpa runs it as masked SDPA") from e


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # Lazily: torch.compile imports Dynamo, seconds of start-up. One kernel per shape (a new batch's
    # mask and documents are inputs, not guards, so scoring compiles once): torch 2.13's CPU Flex
    # kernel for dynamic shapes fails to build in bf16 (C++ errors), and scoring runs few shapes.
    return torch.compile(fn, dynamic=False)


def exclusive(y: Tensor, v: Tensor) -> Tensor:
    """XSA: remove from each head's output its component along its own position's value direction."""
    B, T, H, D = y.shape
    g = y.view(B, T, v.size(2), H // v.size(2), D)
    vn = F.normalize(v, dim=-1).unsqueeze(3)
    return (g - (g * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)


def fake_quant(w: Tensor, bits: int) -> Tensor:
    """Per-row symmetric round-to-nearest at `bits`, back in float: what QAT trains against."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-8)
    return (w / scale).round().clamp(-qmax, qmax) * scale


def shift_right(x: Tensor) -> Tensor:
    """x[:, t-1] at position t (zeros at t = 0), along dim 1."""
    return F.pad(x, (0, 0) * (x.dim() - 2) + (1, 0))[:, :-1]


class BigramHash(nn.Module):
    """A hashed (previous, current) token pair embedding, projected to the model width and added to
    the token embedding before its norm. Position 0 has no previous token and gets its own bucket."""

    def __init__(self, vocab_size: int, cfg: dict, d: int) -> None:
        super().__init__()
        self.buckets = cfg["bigram_buckets"]
        self.emb = nn.Embedding(self.buckets, cfg["bigram_dim"])
        nn.init.normal_(self.emb.weight, std=0.02)
        self.proj = nn.Linear(cfg["bigram_dim"], d, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.scale = nn.Parameter(torch.tensor(float(cfg["bigram_scale_init"])))

    def forward(self, idx: Tensor) -> Tensor:
        prev = shift_right(idx.unsqueeze(-1)).squeeze(-1)
        h = torch.bitwise_xor(36313 * idx, 27191 * prev) % (self.buckets - 1)
        h[:, 0] = self.buckets - 1
        return self.scale.to(self.proj.weight.dtype) * self.proj(self.emb(h))


class SmearGate(nn.Module):
    """x_t <- (1 - g) x_t + g x_{t-1} with a learned per-dim gate g. With `bos_id` >= 0 a document's
    first token (BOS) takes nothing from the previous document's last token (the BOS fix). The first
    position has no x_{t-1}: it keeps x_0, or with `zero_pad` mixes with zeros, (1 - g) x_0, as
    PR #549's script does."""

    def __init__(self, d: int, bos_id: int, zero_pad: bool = False) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.zeros(d))
        self.bos_id, self.zero_pad = bos_id, zero_pad

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate).to(x.dtype).expand_as(x).clone()
        if not self.zero_pad:
            g[:, 0] = 0  # nothing before the first position: it keeps its own value
        if self.bos_id >= 0:
            g = g * (idx != self.bos_id).unsqueeze(-1).to(x.dtype)
        return torch.lerp(x, shift_right(x), g)


class GateLinear(nn.Linear):
    """A tiny zero-init gate projection (a few leading dims in, sliced by the caller so calibration
    sees the input it multiplies; a gate per head or one out). It is a
    matrix for the quantizer but trained by Adam with the control tensors, as the records route it:
    Newton-Schulz on a 12-wide matrix would set every singular value to 1 from step one."""

    def __init__(self, fan_in: int, fan_out: int) -> None:
        super().__init__(fan_in, fan_out, bias=False)
        nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class InputSmearGate(nn.Module):
    """PR #1667/#1855's SmearGate on the raw embedding: x_t <- x_t + lambda * sigmoid(w . x_t[:window])
    * x_{t-1}; w and lambda start at zero, so it starts as the identity. The first position has no
    x_{t-1} and keeps x_0; with `bos_id` >= 0 a BOS token takes nothing from the previous document."""

    def __init__(self, window: int, bos_id: int) -> None:
        super().__init__()
        self.gate = GateLinear(window, 1)
        self.lam = nn.Parameter(torch.zeros(1))
        self.bos_id = bos_id

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        g = self.lam.to(x.dtype) * torch.sigmoid(self.gate(x[:, 1:, : self.gate.in_features]))
        prev = x[:, :-1]
        if self.bos_id >= 0:
            prev = prev * (idx[:, 1:] != self.bos_id).unsqueeze(-1).to(x.dtype)
        return torch.cat((x[:, :1], x[:, 1:] + g * prev), dim=1)


class ValueEmbedding(nn.Module):
    """One vocab x ve_dim table projected to the KV width, added to V on the chosen layers, each
    with its own scale (VE128)."""

    def __init__(self, vocab_size: int, cfg: dict, kv_dim: int) -> None:
        super().__init__()
        self.layers = list(cfg["ve_layers"])
        self.emb = nn.Embedding(vocab_size, cfg["ve_dim"])
        nn.init.normal_(self.emb.weight, std=0.02)
        self.proj = nn.Linear(cfg["ve_dim"], kv_dim, bias=False)
        nn.init.zeros_(self.proj.weight)
        self.scale = nn.Parameter(torch.tensor(float(cfg["ve_scale_init"])))
        self.layer_scales = nn.Parameter(torch.ones(len(self.layers)))

    def forward(self, idx: Tensor) -> Tensor:
        return self.scale.to(self.proj.weight.dtype) * self.proj(self.emb(idx))

    def for_layer(self, ve: Tensor, layer: int) -> Tensor | None:
        if layer not in self.layers:
            return None
        return self.layer_scales[self.layers.index(layer)].to(ve.dtype) * ve
