"""The token n-gram tilt: its hints are the record's online counts over earlier tokens only, the
tilted distribution still sums to one, it moves BPB, and the audits cover it."""

import copy

import numpy as np
import pytest
import torch

from pgolf.config import ConfigError, validate
from pgolf.eval.audit import audit
from pgolf.eval.bpb import BPBMeter, build_byte_luts
from pgolf.eval.evaluate import score, val_tokens, windows
from pgolf.eval.ngram import Hints, TiltedMeter, tilted_nll, token_hints
from pgolf.eval.windows import Scores
from pgolf.report import scorefirst

SEQ, STRIDE = 32, 8


def streamed_hints(tokens, order: int, threshold: float) -> tuple[list[int], list[bool]]:
    """The record's state machine written as a plain left-to-right loop over tuples (no hashing):
    the hint of target i is read before target i is counted."""
    tokens, ctx_len = [int(t) for t in tokens], order - 1
    ring = [tokens[1], *tokens[1:]]  # the record's ring starts with the first target
    total, top, top_token, pairs = {}, {}, {}, {}
    hint, gated = [0] * (len(tokens) - 1), [False] * (len(tokens) - 1)
    for i in range(len(tokens) - 1):
        if i + 1 < ctx_len:
            continue
        ctx = tuple(ring[i + 1 - ctx_len : i + 1]) if ctx_len else ()
        if ctx in total and np.float32(top[ctx]) / np.float32(total[ctx]) >= np.float32(threshold):
            hint[i], gated[i] = top_token[ctx], True
        y = tokens[i + 1]
        count = pairs[ctx, y] = pairs.get((ctx, y), 0) + 1
        total[ctx] = total.get(ctx, 0) + 1
        if count > top.get(ctx, 0):  # strictly more: a tie keeps the token that got there first
            top[ctx], top_token[ctx] = count, y
    return hint, gated


def repetitive(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Phrases of a small pool repeated with a few tokens changed: contexts recur, with one
    continuation or several."""
    gen = np.random.default_rng(seed)
    pool = [gen.integers(0, vocab, int(gen.integers(4, 12))) for _ in range(6)]
    out = np.concatenate([pool[int(gen.integers(0, len(pool)))] for _ in range(n // 4)])[:n]
    flip = gen.random(len(out)) < 0.05
    out[flip] = gen.integers(0, vocab, int(flip.sum()))
    return torch.from_numpy(out)


@pytest.mark.parametrize("order,threshold,vocab", [(16, 0.8, 50), (4, 0.8, 50), (3, 0.5, 8), (2, 0.6667, 3),
                                                   (1, 0.3, 5), (5, 1.0, 20)])
def test_hints_are_the_online_counts_of_earlier_targets(order, threshold, vocab):
    tokens = repetitive(3000, vocab, seed=order)
    hints = token_hints(tokens, order, threshold)
    token, gated = streamed_hints(tokens, order, threshold)
    assert hints.gated.tolist() == gated and hints.token.tolist() == token
    assert 0 < sum(gated) < len(gated)  # both kinds of target occur


def test_a_tie_keeps_the_first_token_and_the_share_is_compared_in_float32():
    # after "7": 3, then 4 (a tie at one each: 3 stays), then 4 (4 leads 2 to 1); the two tokens
    # before keep the record's doubled first target away from the "7" contexts
    tokens = torch.tensor([1, 2, 7, 3, 7, 4, 7, 4, 7, 9])
    hints = token_hints(tokens, order=2, threshold=0.5)
    after_seven = [2, 4, 6, 8]  # targets whose context is "7"
    assert [bool(hints.gated[i]) for i in after_seven] == [False, True, True, True]
    assert [int(hints.token[i]) for i in after_seven[1:]] == [3, 3, 4]
    # 4 of 5 is 0.8 in float32 exactly as float32(0.8): at the threshold, so tilted
    tokens = torch.tensor([9, 8, 5, 1, 5, 1, 5, 1, 5, 1, 5, 2, 5, 0])
    assert bool(token_hints(tokens, order=2, threshold=0.8).gated[12])


def test_the_first_context_is_the_first_target_twice_as_the_record_keeps_it():
    # order 3: target 1's context is (token 1, token 1) = (4, 4), not (token 0, token 1)
    tokens = torch.tensor([0, 4, 6, 4, 4, 6, 0, 4, 6])
    hints = token_hints(tokens, order=3, threshold=0.5)
    assert bool(hints.gated[4]) and int(hints.token[4]) == 6  # (4, 4) was followed by 6 at target 1
    assert not bool(hints.gated[7])  # (0, 4) never came before: the stream's first token is no context


def test_a_hint_reads_no_token_from_its_own_target_on():
    tokens = repetitive(2000, 30, seed=1)
    base = token_hints(tokens, 4, 0.6)
    for t in (500, 1000, 1500):
        changed = tokens.clone()
        changed[t + 1 :] = torch.randint(0, 30, (len(tokens) - t - 1,), generator=torch.Generator().manual_seed(t))
        other = token_hints(changed, 4, 0.6)
        assert torch.equal(base.gated[: t + 1], other.gated[: t + 1])
        assert torch.equal(base.token[: t + 1], other.token[: t + 1])
        assert not torch.equal(base.gated[t + 1 :], other.gated[t + 1 :])  # the change did reach later hints


def test_the_tilted_distribution_sums_to_one_and_is_the_boosted_softmax():
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 300, generator=gen, dtype=torch.float64)
    for row, hint in zip(logits, (0, 17, 299, 5), strict=True):
        ys = torch.arange(300)
        nll = -torch.log_softmax(row, 0)
        log_q = torch.log_softmax(row, 0)[hint].expand(300)
        tilted = tilted_nll(nll, log_q, ys == hint, 2.625)
        assert torch.exp(-tilted).sum().item() == pytest.approx(1.0, abs=1e-12)
        boosted = row.clone()
        boosted[hint] += 2.625
        assert torch.allclose(tilted, -torch.log_softmax(boosted, 0), rtol=0, atol=1e-12)


@pytest.fixture(scope="module")
def val(tiny_dataset):
    tokens = val_tokens(tiny_dataset.dataset_dir, 1200, SEQ)
    return tokens, build_byte_luts(tiny_dataset.tokenizer, tiny_dataset.vocab_size)


def test_the_tilt_moves_bpb_and_leaves_the_untilted_score_alone(small_model, val):
    tokens, luts = val
    wins = windows(len(tokens), SEQ, STRIDE)
    plain = score(small_model, tokens, wins, SEQ, 8, BPBMeter(luts))
    hints = token_hints(tokens, 3, 0.5)
    got = score(small_model, tokens, wins, SEQ, 8, TiltedMeter(luts, hints, 2.625))
    tilted = got.pop("ngram")
    assert got == plain
    assert tilted["hinted"] == int(hints.gated.sum()) > 20 and 0 < tilted["hint_hits"] <= tilted["hinted"]
    assert (tilted["tokens"], tilted["bytes"]) == (plain["tokens"], plain["bytes"])
    assert abs(tilted["val_bpb"] - plain["val_bpb"]) > 1e-3
    unboosted = score(small_model, tokens, wins, SEQ, 8, TiltedMeter(luts, hints, 0.0))["ngram"]
    assert unboosted["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-12)


def test_each_tilted_loss_is_the_boosted_softmax_of_the_model(small_model, val):
    tokens, luts = val
    hints = token_hints(tokens, 3, 0.5)
    scores = Scores()
    from pgolf.eval.windows import score_windows

    with torch.inference_mode():
        score_windows(small_model, tokens, [(0, 0)], SEQ, 1, TiltedMeter(luts, hints, 1.5), torch.device("cpu"),
                      "fp32", scores)
        logits = small_model(tokens[None, :SEQ])[0].double()
    tilted = torch.cat(scores.tilted)
    for i in range(SEQ):
        row = logits[i].clone()
        row[hints.token[i]] += 1.5 if hints.gated[i] else 0.0
        assert tilted[i].item() == pytest.approx(-torch.log_softmax(row, 0)[tokens[i + 1]].item(), abs=2e-5)


def tilt_cfg(**ttt) -> dict:
    base = {"enabled": True, "lr": 0.05, "epochs": 1, "chunk_tokens": 256, "batch_seqs": 4}
    return validate({"eval": {"seq_len": SEQ, "stride": STRIDE, "batch_seqs": 8, "max_tokens": 1200,
                              "ttt": {**base, **ttt}, "ngram_tilt": {"enabled": True, "order": 3,
                                                                     "threshold": 0.5}}})["eval"]


def test_audit_compares_tilted_losses_and_hints(small_model, val):
    tokens, luts = val
    report = audit(small_model, tokens, tilt_cfg(epochs=0), luts, log=lambda _: None)
    assert all(r["ok"] and r["hints_changed"] == 0 and r["checked"] > 200 for r in report)


def peeking_hints(tokens, order: int, threshold: float) -> Hints:
    """Hints that name the token after the target: what the audit exists to catch."""
    token = torch.zeros(len(tokens) - 1, dtype=torch.long)
    token[:-1] = tokens[2:]
    return Hints(token, torch.ones(len(tokens) - 1, dtype=torch.bool))


def own_target_hints(tokens, order: int, threshold: float) -> Hints:
    """Hints that name the target itself (PR #779's rule broken): losses up to t cannot show it, the
    hints' own check does."""
    return Hints(tokens[1:].clone(), torch.ones(len(tokens) - 1, dtype=torch.bool))


@pytest.mark.parametrize("hints_of", [peeking_hints, own_target_hints])
def test_audit_catches_hints_that_read_ahead(small_model, val, hints_of):
    tokens, luts = val
    report = audit(copy.deepcopy(small_model), tokens, tilt_cfg(epochs=0), luts, log=lambda _: None,
                   hints_of=hints_of)
    assert not any(r["ok"] for r in report) and all(r["hints_changed"] > 0 for r in report)
    if hints_of is peeking_hints:
        assert all(r["changed"] > 0 for r in report)


def test_score_first_check_covers_the_tilt():
    cfg = validate({"tokenizer": {"vocab_size": 320}, "model": {"num_layers": 2, "model_dim": 32, "num_heads": 2,
                                                                  "num_kv_heads": 1},
                    "eval": {"seq_len": 32, "stride": 8, "ngram_tilt": {"enabled": True}}})
    model, tokens, e = scorefirst.model_of(cfg), scorefirst.stream(320, 1), scorefirst.small_eval(cfg, None)
    assert scorefirst.audit_sliding(model, tokens, e)["ok"]
    losses = scorefirst.sliding_losses(model, tokens, e)
    assert sum(a != b for a, b in losses.values()) > 50  # tilted losses are compared: the tilt fired on them
    line = scorefirst.tilt_evidence(e, tokens)[0]
    assert line.startswith("n-gram tilt: tilted losses compared too, ") and "(order 2)" in line
    assert scorefirst.tilt_evidence(scorefirst.small_eval(validate({}), None), tokens) == []


def test_an_ngram_metric_needs_the_tilt():
    with pytest.raises(ConfigError, match="compare.metric: sliding_ngram_bpb needs eval.ngram_tilt.enabled"):
        validate({"compare": {"metric": "sliding_ngram_bpb"}})
    with pytest.raises(ConfigError, match="ttt_ngram_bpb needs eval.ttt.enabled"):
        validate({"compare": {"metric": "ttt_ngram_bpb"}, "eval": {"ngram_tilt": {"enabled": True}}})
    assert validate({})["eval"]["ngram_tilt"] == {"enabled": False, "order": 16, "threshold": 0.8, "boost": 2.625}


def test_evaluate_reports_the_tilted_sliding_score_beside_the_untilted(setup, tmp_path):
    from test_evaluate import evaluate_on_one_process

    cfg = validate({"eval": {"seq_len": 32, "stride": 8, "batch_seqs": 16, "max_tokens": 2000,
                             "ngram_tilt": {"enabled": True, "order": 3, "threshold": 0.5}}})["eval"]
    r = evaluate_on_one_process(setup, cfg, tmp_path / "eval.json")
    tilted = r["sliding_ngram"]
    assert "ngram" not in r["sliding"] and "post_quant_ngram" not in r  # only the scored passes are tilted
    assert tilted["tokens"] == r["sliding"]["tokens"] and tilted["hinted"] > 0
    assert tilted["gain_bpb"] == tilted["val_bpb"] - r["sliding"]["val_bpb"] != 0
    seconds = r["eval_seconds"]
    assert r["scored_eval_seconds"] == seconds["sliding"] + seconds["ngram_hints"]
