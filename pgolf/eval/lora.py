"""Per-document LoRA adapters for phased TTT (PRs #1530, #1767, #1855), attached by forward hooks.

The adapters sit where the records put them: beside Q, K (unless `k` is off, as in PR #2135) and
V (each reading the block's normed input), beside the whole attention sublayer ("O": normed input
to attention output), beside the whole MLP (its normed input to its output), and beside the head
(final hidden state to logits, before the softcap). Each virtual layer has its own adapters, so a
block that recurrence runs three times gets three sets. Every adapter holds one (A, B) pair per
document of a batch: row r of a forward uses document `rows[r]`'s pair, so documents batched
together never share an update.

Hooks leave pgolf/model/gpt.py as it is: the model's modules are wrapped from outside, and `detach`
takes the adapters off again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from pgolf.model.gpt import GPT, layer_order


class BatchedLoRA(nn.Module):
    """x -> (alpha / rank) * B_r A_r x for each row r: A uniform in +-1/sqrt(fan_in), B zero, so a
    fresh adapter adds nothing (PR #1767's alpha/rank scaling decouples the step size from the rank)."""

    def __init__(self, docs: int, fan_in: int, fan_out: int, rank: int, alpha: float, gen: torch.Generator) -> None:
        super().__init__()
        self.bound, self.scale = fan_in ** -0.5, alpha / rank
        self.A = nn.Parameter(torch.empty(docs, rank, fan_in))
        self.B = nn.Parameter(torch.zeros(docs, fan_out, rank))
        self.reset(gen, warm_a=False)

    @torch.no_grad()
    def reset(self, gen: torch.Generator, warm_a: bool) -> None:
        """A new document: B zero; A redrawn unless it is kept warm across documents (PR #1767)."""
        if not warm_a:  # drawn on the CPU generator so every device draws the same A
            self.A.copy_(torch.empty(self.A.shape).uniform_(-self.bound, self.bound, generator=gen))
        self.B.zero_()

    def forward(self, x: Tensor, rows: Tensor) -> Tensor:
        a, b = self.A[rows].to(x.dtype), self.B[rows].to(x.dtype)
        return (x @ a.transpose(1, 2)) @ b.transpose(1, 2) * self.scale


class DocLoRA(nn.Module):
    """All adapters of `model` for `docs` documents, hooked into its modules until `detach`."""

    def __init__(self, model: GPT, docs: int, rank: int, alpha: float, seed: int = 0, k: bool = True) -> None:
        super().__init__()
        self.seed, self.gen = seed, torch.Generator().manual_seed(seed)
        attn = model.blocks[0].attn
        d, kv = model.cfg["model_dim"], attn.kv_heads * attn.head_dim
        self.order = layer_order(model.cfg, model.recur_active)

        def per_slot(fan_in: int, fan_out: int) -> nn.ModuleList:
            return nn.ModuleList(BatchedLoRA(docs, fan_in, fan_out, rank, alpha, self.gen) for _ in self.order)

        self.q = per_slot(d, d)
        self.k = per_slot(d, kv) if k else None  # PR #2135 adapts without them (TTT_K_LORA=0)
        self.v, self.o, self.mlp = per_slot(d, kv), per_slot(d, d), per_slot(d, d)
        self.head = BatchedLoRA(docs, d, model.vocab_size, rank, alpha, self.gen)
        self.rows = torch.zeros(docs, dtype=torch.long)
        self.on = False  # only LoRAForward's calls see the adapters; the model's own forward runs plain
        self.slot, self.passes = [0] * len(model.blocks), [0] * len(model.blocks)
        self.handles: list[RemovableHandle] = []
        self.to(next(model.parameters()).device)
        self.attach(model)

    def reset(self, warm_a: bool) -> None:
        """Every document's adapters as they started (the same A draws, B zero), so that what a
        document scores depends on its own tokens and the base model only; with warm_a, A stays."""
        self.gen.manual_seed(self.seed)
        for m in self.modules():
            if isinstance(m, BatchedLoRA):
                m.reset(self.gen, warm_a)

    def attach(self, model: GPT) -> None:
        slots = [[j for j, b in enumerate(self.order) if b == i] for i in range(len(model.blocks))]
        for i, block in enumerate(model.blocks):
            a = block.attn
            # Attention runs once per pass of its block (plain, parallel or lane form): its pre-hook
            # says which virtual layer this pass is, for every adapter of the block.
            self.handles.append(a.register_forward_pre_hook(self.enter(i, slots[i])))
            for lin, lora in ((a.c_q, self.q), (a.c_k, self.k), (a.c_v, self.v), (a, self.o), (block.mlp, self.mlp)):
                if lora is not None:
                    self.handles.append(lin.register_forward_hook(self.beside(i, lora)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def enter(self, i: int, slots: list[int]):
        def hook(module: nn.Module, args: tuple) -> None:
            if not self.on:
                return
            self.slot[i] = slots[self.passes[i]]
            self.passes[i] += 1
        return hook

    def beside(self, i: int, loras: nn.ModuleList):
        def hook(module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            if not self.on:
                return out
            return out + loras[self.slot[i]](args[0], self.rows).to(out.dtype)
        return hook

    def use(self, rows: list[int]) -> None:
        """Row r of the next batches is document rows[r]."""
        self.rows = torch.tensor(rows, dtype=torch.long, device=self.head.A.device)


class LoRAForward(nn.Module):
    """model(idx) with the adapters of the documents `lora.rows` added; idx's rows are those documents.
    The head is GPT.forward's, plus the head adapter before the softcap (a test holds the two equal
    when every B is zero)."""

    def __init__(self, model: GPT, lora: DocLoRA) -> None:
        super().__init__()
        self.model, self.lora = model, lora

    def forward(self, idx: Tensor) -> Tensor:
        m, lora = self.model, self.lora
        lora.passes, lora.on = [0] * len(lora.passes), True
        try:
            h = m.head_input(idx)
        finally:
            lora.on = False
        w = m.tok_emb.weight if m.lm_head is None else m.lm_head.weight
        return m.softcap((F.linear(h, w.to(h.dtype)) + lora.head(h, lora.rows).to(h.dtype)).float())
