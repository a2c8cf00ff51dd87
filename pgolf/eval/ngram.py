"""The token n-gram tilt at evaluation (PR #1145's token channel, as PRs #2130/#2135 run it).

An online n-gram state over the val stream proposes at most one hinted token per target: the token
that most often followed the same `order - 1` tokens earlier in the stream, when it followed them in
at least `threshold` of those times. The model's distribution for that target is then tilted, the
hinted token's logit raised by `boost` and the distribution renormalized over the whole vocabulary:

    p'(a) = exp(boost * [a == h]) p(a) / Z,   Z = 1 + q (exp(boost) - 1),   q = p(h)
    -log p'(y) = -log p(y) - boost * [y == h] + log1p(q * expm1(boost))

so a tilted target's loss needs only its own loss and log q, and p' still sums to 1.

The hint for target i (which predicts token i + 1) is a function of tokens 0..i alone: the state
is built from the targets before it, never from the target itself (PR #779's rule). It is computed
for every target in one pass before scoring, as the record does, and the tests and `pgolf audit`
check it by changing later tokens. Counts are kept exactly as the record's C state keeps them
(online_ngram_state.c): a context is its 64-bit hash, a (context, token) pair the hash of both, the
top token the first to reach the highest count (a later tie does not displace it), and its share
top/total in float32. The whole pass is vectorized here: a stable sort by context puts each
context's earlier occurrences before each of its targets, in stream order.

Like the record's, the context ring starts with the first target (token 1) where the stream's first
token would be: the first full context is token 1 twice, then tokens 2..order-2. It is still a token
before every target whose context holds it, and it keeps the numbers the record's: a stream whose
first `order - 1` tokens recur (a boilerplate document start) would otherwise hint differently there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pgolf.eval.bpb import BPBMeter, ByteCounts, summed

# The record's hash constants (online_ngram_state.c): position j of a context multiplies its token by
# COEFFS[j]; a pair mixes its context's hash with the token times COEFFS[context length % 32].
COEFFS = np.array([36313, 27191, 51647, 81929, 131071, 196613, 262147, 393241, 524309, 655373, 786433, 917521,
                   1048583, 1179653, 1310729, 1441801, 1572869, 1703941, 1835017, 1966087, 2097169, 2228243,
                   2359319, 2490389, 2621471, 2752549, 2883617, 3014687, 3145757, 3276833, 3407903, 3538973],
                  dtype=np.uint64)
PAIR_MIX = np.uint64(1000003)
MAX_ORDER = len(COEFFS) + 1  # a context of order - 1 tokens, one coefficient each


@dataclass(frozen=True)
class Hints:
    """Per target of the stream: the hinted token, and whether the tilt applies (gated)."""

    token: Tensor  # int64 (n_targets,), 0 where not gated
    gated: Tensor  # bool (n_targets,)


def context_hashes(tokens: np.ndarray, ctx_len: int) -> np.ndarray:
    """The hash of the ctx_len tokens up to and including token i, for every target i >= ctx_len - 1
    (target i predicts token i + 1): XOR over j of token * COEFFS[j], oldest token first."""
    first = max(ctx_len - 1, 0)
    n = len(tokens) - 1 - first
    keys, term = np.zeros(max(n, 0), dtype=np.uint64), np.empty(max(n, 0), dtype=np.uint64)
    for j in range(ctx_len):
        np.multiply(tokens[j : j + n], COEFFS[j], out=term)
        np.bitwise_xor(keys, term, out=keys)
    return keys


def stable_order(keys: np.ndarray) -> np.ndarray:
    """Indices that sort uint64 keys, equal keys in stream order. Only equality matters here, so the
    keys are sorted as int64 by torch, whose stable sort is 2.4x numpy's on one core and uses more."""
    return torch.sort(torch.from_numpy(keys.view(np.int64)), stable=True).indices.numpy()


def group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """For each element of a sorted array, the index where its run of equal keys begins."""
    idx = np.arange(len(sorted_keys))
    new = np.ones(len(sorted_keys), dtype=bool)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    return np.maximum.accumulate(np.where(new, idx, 0))


def token_hints(tokens: Tensor | np.ndarray, order: int, threshold: float) -> Hints:
    """The hint of every target of `tokens` (a stream; target i predicts token i + 1) from the targets
    before it, under contexts of order - 1 tokens."""
    toks = np.asarray(tokens, dtype=np.int64).astype(np.uint64)
    n_targets, ctx_len = len(toks) - 1, order - 1
    first = max(ctx_len - 1, 0)  # the first target with a full context
    ring = toks.copy()
    if len(toks) > 1:
        ring[0] = toks[1]  # the record seeds its ring with the first target (see above)
    ctx = context_hashes(ring, ctx_len)
    del ring
    nxt = toks[first + 1 :]
    m = len(ctx)
    pos = np.arange(m)
    with np.errstate(over="ignore"):  # the hash wraps mod 2^64, as the record's C does
        pair = (ctx * PAIR_MIX) ^ (nxt * COEFFS[ctx_len % len(COEFFS)])
    # each pair's count once this target is counted: its earlier occurrences + 1
    by_pair = stable_order(pair)
    count = np.empty(m, dtype=np.uint64)
    count[by_pair] = pos - group_starts(pair[by_pair]) + 1
    del by_pair, pair
    # each context's occurrences in stream order; the state a target sees is its predecessor's
    by_ctx = stable_order(ctx)
    starts = group_starts(ctx[by_ctx])
    seen = pos - starts  # the context's occurrences before this one: its total
    # running maximum of the pair counts within each context (the group's rank above the count's
    # bits keeps contexts apart); a strict rise makes its token the top one, so a tie keeps the old
    rank = np.cumsum(starts == pos).astype(np.uint64) - np.uint64(1)
    value = (rank << np.uint64(32)) | count[by_ctx]
    best = np.maximum.accumulate(value)
    rises = np.ones(m, dtype=bool)
    rises[1:] = value[1:] > best[:-1]
    top_at = np.maximum.accumulate(np.where(rises, pos, 0))
    prev = np.maximum(pos - 1, 0)
    top_count = (best[prev] & np.uint64(0xFFFFFFFF)).astype(np.float32)
    top_token = nxt[by_ctx[top_at[prev]]]
    share = np.where(seen > 0, top_count / np.maximum(seen, 1).astype(np.float32), np.float32(0))
    gated_sorted = (seen > 0) & (share >= np.float32(threshold))
    token = np.zeros(n_targets, dtype=np.int64)
    gated = np.zeros(n_targets, dtype=bool)
    token[first + by_ctx] = np.where(gated_sorted, top_token, 0).astype(np.int64)
    gated[first + by_ctx] = gated_sorted
    return Hints(torch.from_numpy(token), torch.from_numpy(gated))


def tilted_nll(nll: Tensor, log_q: Tensor, hit: Tensor, boost: float) -> Tensor:
    """-log p'(y) of a tilted target from -log p(y), log p(hint) and whether y is the hint (float64)."""
    q = log_q.double().clamp(max=0.0).exp()
    return nll.double() - boost * hit.double() + torch.log1p(q * math.expm1(boost))


class TiltedMeter(BPBMeter):
    """A BPB meter that also keeps the tilted score of the same targets: the untilted losses go to
    the meter itself, the tilted ones to `tilted`. windows.forward_losses takes log p(hint) from each
    forward's logits, windows.record the tilted losses from those."""

    def __init__(self, luts: ByteCounts, hints: Hints, boost: float) -> None:
        super().__init__(luts)
        self.hints, self.boost = hints, boost
        self.tilted = BPBMeter(luts)
        self.counts = torch.zeros(2, dtype=torch.float64)  # hinted targets, of which the hint was right

    def gate(self, targets: Tensor, keep: Tensor) -> Tensor:
        """(B, T) bool: the scored positions (`keep`) whose target (`targets`, stream indices) is hinted."""
        gate = keep.clone()
        gate[keep] = self.hints.gated[targets[keep]]
        return gate

    def log_q(self, logits: Tensor, targets: Tensor, keep: Tensor) -> Tensor:
        """(B, T) float32 on the CPU: log p(hint) under `logits` (B, T, V, on the scoring device) at each
        gated position, 0 elsewhere. targets and keep (B, T) on the CPU, as for gate()."""
        gate, out = self.gate(targets, keep), torch.zeros(keep.shape)
        if gate.any():
            rows = logits[gate.to(logits.device)].float()
            hint = self.hints.token[targets[gate]].to(logits.device)
            out[gate] = (rows.gather(1, hint[:, None]).squeeze(1) - torch.logsumexp(rows, dim=1)).cpu()
        return out

    def tilt(self, losses: Tensor, log_q: Tensor, y: Tensor, targets: Tensor, keep: Tensor) -> Tensor:
        """(B, T) float64: each position's loss, tilted where it is gated, from its loss, log_q (as
        log_q() gives it) and its target token y; all on the CPU. Counts the hinted targets."""
        gate, out = self.gate(targets, keep), losses.double()
        if gate.any():
            hit = y[gate] == self.hints.token[targets[gate]]
            out[gate] = tilted_nll(losses[gate], log_q[gate], hit, self.boost)
            self.counts += torch.tensor([hit.numel(), hit.sum().item()], dtype=torch.float64)
        return out

    def all_reduce(self) -> None:
        super().all_reduce()
        self.tilted.all_reduce()
        self.counts = summed(self.counts)

    def result(self) -> dict:
        """The untilted result, with the tilted one under "ngram"."""
        tilted = self.tilted.result()
        hinted, hits = (int(x) for x in self.counts.tolist())
        return {**super().result(), "ngram": {**tilted, "hinted": hinted, "hint_hits": hits}}


HintsOf = Callable[[Tensor, int, float], Hints]


def meter_for(cfg: dict, tokens: Tensor, luts: ByteCounts, hints_of: HintsOf = token_hints) -> BPBMeter:
    """The meter a scored pass of the eval section `cfg` over `tokens` fills: tilted, with the hints
    of `tokens`, when eval.ngram_tilt is on; plain otherwise. `hints_of` exists for the audit's tests
    (they pass one that reads ahead, to show the audit catches it)."""
    tilt = cfg["ngram_tilt"]
    if not tilt["enabled"]:
        return BPBMeter(luts)
    return TiltedMeter(luts, hints_of(tokens, tilt["order"], tilt["threshold"]), tilt["boost"])
