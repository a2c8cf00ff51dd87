"""Phased score-first TTT (PRs #1610, #1626, #1855): per-document LoRA plus global SGD phases.

Documents are the val stream's spans from one BOS token to the next. They are taken in stream
order, `lora_docs` at a time, each with its own fresh adapters (pgolf/eval/lora.py). A batch walks
its documents chunk by chunk (`lora_chunk_tokens` targets): chunk c of every document is scored,
then every document that has a chunk after c takes one Adam step on chunk c's mean loss, both from
one forward, as the record's forward_ttt_train (its losses recorded before the backward). After the
batch in which the scored documents first reach a phase boundary (`phase_docs` split in `phases`:
833, 1666, 2500), the base model itself trains by SGD on the documents up to that boundary, all of
them already scored, as chunk mode trains on a chunk (the optimizer, lr, momentum, epochs,
chunk_tokens, batch_seqs and grad_clip keys; cosine LR; the last chunk left out, as the record does).

Both kinds of step go through the same `order` as chunk mode (tttsteps.run_chunks: score chunk c,
then train on it), so the score-before-update rule is one piece of code and `pgolf audit` checks it
here too. Where pgolf differs from the record, it is so that no update has seen a later token:
- documents are taken in stream order, not sorted by length (a length is known only at a document's
  end);
- chunk [a, e) is scored in the seq_len-token window that a full chunk from a would end, across
  document boundaries (pgolf's models train on packed streams), so its context does not depend on
  where the document ends;
- phase boundaries count documents from `phase_docs`, not from the number of documents in the split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from pgolf.errors import ConfigError
from pgolf.eval.bpb import BPBMeter
from pgolf.eval.lora import DocLoRA, LoRAForward
from pgolf.eval.tttsteps import Chunk, chunk_lr, freeze, make_optimizer, run_chunks, train_chunk, training_sequences
from pgolf.eval.windows import Scores, Window, forward_losses, record, scored_mask, window_batch
from pgolf.model.gpt import GPT
from pgolf.runtime.device import autocast

Doc = tuple[int, int]  # targets [lo, hi); target i predicts token i + 1, so a document's last target is the next BOS


def documents(tokens: Tensor, bos_id: int) -> list[Doc]:
    """The stream's documents as target spans; every target lies in exactly one. The BOS id is the
    model's (model.bos_id), not pgolf.data's: the data stages are no part of a submission's code."""
    n = len(tokens) - 1
    starts = (tokens[:n] == bos_id).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], n], strict=True))


def doc_chunks(doc: Doc, size: int) -> list[tuple[int, int]]:
    lo, hi = doc
    return [(a, min(a + size, hi)) for a in range(lo, hi, size)]


def chunk_window(a: int, e: int, size: int, seq_len: int, n_targets: int) -> Window:
    """The window that scores targets [a, e): the seq_len tokens before a + size, where a full chunk
    would end, so that a short last chunk gets the same context as a full one would."""
    start = min(max(0, a + size - seq_len), n_targets - seq_len)
    return (start, a - start, e - start)


def phase_ends(cfg: dict) -> list[int]:
    """Cumulative document counts after which the base model trains (833, 1666, 2500 for the record)."""
    return [cfg["phase_docs"] * (i + 1) // cfg["phases"] for i in range(cfg["phases"])]


def lora_optimizer(lora: DocLoRA, cfg: dict) -> torch.optim.Optimizer:
    """Adam per element, so each document's rows of A and B are their own optimizer (the record's eps)."""
    betas = (float(cfg["lora_beta1"]), float(cfg["lora_beta2"]))
    return torch.optim.AdamW(lora.parameters(), lr=cfg["lora_lr"], betas=betas, eps=1e-10,
                             weight_decay=cfg["lora_weight_decay"])


def padded(rows: list[int], docs: int) -> list[int]:
    """Document rows of a window batch: window_batch pads with copies of the first window."""
    return rows + rows[:1] * (docs - len(rows))


@dataclass
class ChunkPass:
    """Chunk c's one forward through the adapters as they were when it ran (PR #1855's forward_ttt_train:
    scored, then backpropagated)."""

    c: int
    part: list[Window]  # the windows of the documents that have a chunk c, in row order
    idx: Tensor  # (width, seq_len + 1) token rows: those windows, then padding
    losses: Tensor  # (width, seq_len) per-target losses, with their graph when some document trains on chunk c
    weight: Tensor  # (width, seq_len): 1 on the chunk targets of a document that trains on chunk c, else 0
    log_q: Tensor | None  # under the n-gram tilt, log p(hint) of the scored targets (windows.forward_losses)


def adapt_batch(fwd: LoRAForward, tokens: Tensor, batch: list[Doc], cfg: dict, seq_len: int, meter: BPBMeter,
                scores: Scores | None, order: Callable, precision: str) -> None:
    """Score a batch of documents chunk by chunk, each document's adapters training on its chunks
    once they are scored. One forward per chunk, as the record: score(c) records its losses, and
    train(c), which `order` calls after it, backpropagates the same forward. A forward is reused only
    while no step has come between (train drops it after its step), so either step alone does what
    it says whatever the order: a train(c) before score(c) runs its own forward, and score(c) then
    scores the stepped adapters, as the audit's illegal order must show."""
    lora, size, width = fwd.lora, cfg["lora_chunk_tokens"], cfg["lora_docs"]
    device = next(fwd.model.parameters()).device
    lora.reset(cfg["lora_warm_a"])
    opt = lora_optimizer(lora, cfg)
    chunks = [doc_chunks(d, size) for d in batch]
    last: list[ChunkPass] = []  # the forward since the last step, if any

    def forward(c: int) -> ChunkPass:
        if last and last[0].c == c:
            return last[0]
        rows = [r for r, ch in enumerate(chunks) if c < len(ch)]
        part = [chunk_window(*chunks[r][c], size, seq_len, len(tokens) - 1) for r in rows]
        trains = torch.tensor([c < len(chunks[r]) - 1 for r in rows])  # a document's last chunk trains nothing
        weight = torch.zeros(width, seq_len)  # padded rows neither score nor train
        weight[: len(part)] = (scored_mask(part, seq_len) & trains[:, None]).float()
        lora.use(padded(rows, width))
        idx = window_batch(tokens, part, seq_len, width).to(device)
        with torch.set_grad_enabled(bool(trains.any())), autocast(device, precision):
            losses, log_q = forward_losses(fwd, idx, part, seq_len, meter)
        last[:] = [ChunkPass(c, part, idx, losses, weight.to(device), log_q)]
        return last[0]

    def score(c: int, _: int) -> None:
        p = forward(c)
        record(p.losses, p.idx, p.part, seq_len, meter, scores, p.log_q)

    def train(c: int, _: int) -> None:
        p = forward(c)
        if not p.losses.requires_grad:  # every document with a chunk c ends there
            return
        per_doc = (p.losses * p.weight).sum(1) / p.weight.sum(1).clamp(min=1)
        opt.zero_grad(set_to_none=True)
        per_doc.sum().backward()  # documents' adapters are disjoint: each gets its own chunk's mean
        opt.step()
        last.clear()  # the adapters moved: a later score runs a forward of its own

    steps = list(range(max(len(ch) for ch in chunks)))
    order(steps, score, train)


def global_phase(model: GPT, params: list[torch.nn.Parameter], stream: Tensor, cfg: dict, seq_len: int,
                 rank: int, world: int, precision: str) -> None:
    """SGD on the base model over `stream` (documents already scored), chunk_tokens at a time."""
    for p in params:
        p.requires_grad_(True)
    model.train()
    opt = make_optimizer(params, cfg)
    n, size = len(stream) - 1, cfg["chunk_tokens"]
    spans = [Chunk([], lo, min(lo + size, n)) for lo in range(0, n, size)]
    for c, span in enumerate(spans[:-1]):  # the record leaves the last chunk out
        train_chunk(model, opt, training_sequences(stream, span, seq_len), cfg, chunk_lr(cfg, c, len(spans)),
                    rank, world, precision)
    for p in params:
        p.requires_grad_(False)
    model.eval()


def scored_stream(tokens: Tensor, docs: list[Doc]) -> Tensor:
    """The tokens of `docs` end to end: each document's tokens, then the last one's closing token."""
    return torch.cat([tokens[lo:hi] for lo, hi in docs] + [tokens[docs[-1][1] : docs[-1][1] + 1]])


def phased_eval(model: GPT, tokens: Tensor, seq_len: int, cfg: dict, meter: BPBMeter, rank: int = 0,
                world: int = 1, scores: Scores | None = None, order: Callable = run_chunks,
                precision: str = "auto", docs: list[Doc] | None = None) -> dict:
    """BPB of `docs` (every document of the stream by default) under phased TTT; the model is
    adapted in place. Processes share each segment of batches between two phases."""
    if cfg["lora_chunk_tokens"] > seq_len:  # pgolf.config refuses it too; a wrong window here would score silently
        raise ConfigError(f"eval.ttt.lora_chunk_tokens={cfg['lora_chunk_tokens']} is longer than "
                          f"eval.seq_len={seq_len}")
    freeze(model, cfg)  # the frozen blocks stay out of the global phases
    docs = documents(tokens, model.cfg["bos_id"]) if docs is None else docs
    params = [p for p in model.parameters() if p.requires_grad]  # what freeze() left trainable
    for p in params:
        p.requires_grad_(False)  # the adapters train between phases, the base model only in them
    model.eval()
    fwd = LoRAForward(model, DocLoRA(model, cfg["lora_docs"], cfg["lora_rank"], cfg["lora_alpha"],
                                       k=cfg["lora_k"]))
    batches = [docs[i : i + cfg["lora_docs"]] for i in range(0, len(docs), cfg["lora_docs"])]
    ends, phase, segment = phase_ends(cfg), 0, []
    try:
        for k, batch in enumerate(batches):
            segment.append(batch)
            done = min((k + 1) * cfg["lora_docs"], len(docs))  # documents scored once this batch is
            due = phase < len(ends) and done >= ends[phase]  # at most one phase per batch, as the record
            if not (due or k == len(batches) - 1):
                continue
            for b in segment[rank::world]:
                adapt_batch(fwd, tokens, b, cfg, seq_len, meter, scores, order, precision)
            segment = []
            if due:
                global_phase(model, params, scored_stream(tokens, docs[: ends[phase]]), cfg, seq_len,
                             rank, world, precision)
                phase += 1
                fwd.lora.reset(warm_a=False)  # the record builds new adapters after each phase
    finally:
        fwd.lora.detach()
        for p in params:
            p.requires_grad_(True)
    meter.all_reduce()
    n_chunks = sum(len(doc_chunks(d, cfg["lora_chunk_tokens"])) for d in docs)
    return {**meter.result(), "chunks": n_chunks, "docs": len(docs), "phases": phase}
