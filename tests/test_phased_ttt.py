"""Phased score-first TTT: per-document LoRA and global SGD phases, scored before every update that
sees a token; adapters that match the model they wrap; documents that do not share adapters."""

import copy

import pytest
import torch
from conftest import evaluate_on_two_processes
from test_evaluate import evaluate_on_one_process
from test_ttt import train_then_score  # the illegal order, shared with chunk TTT's audit test

from pgolf.config import ConfigError, validate
from pgolf.eval import phased
from pgolf.eval.audit import audit, fit_phases
from pgolf.eval.bpb import BPBMeter, build_byte_luts
from pgolf.eval.evaluate import run_ttt, score, val_tokens, windows
from pgolf.eval.lora import DocLoRA, LoRAForward
from pgolf.eval.phased import documents, phased_eval
from pgolf.eval.windows import Scores, score_windows, scored_mask, window_batch
from pgolf.model.gpt import GPT, token_losses

SEQ, STRIDE = 32, 8
STARTS = [0, 40, 100, 130, 200, 240]  # BOS positions of the test stream: 6 documents, 299 targets


def eval_cfg(**ttt) -> dict:
    base = {"enabled": True, "mode": "phased_lora", "lora_rank": 4, "lora_alpha": 8, "lora_lr": 0.03,
            "lora_chunk_tokens": 16,
            "lora_docs": 2, "phases": 2, "phase_docs": 4, "lr": 0.05, "epochs": 1, "chunk_tokens": 64,
            "batch_seqs": 2}
    return validate({"eval": {"seq_len": SEQ, "stride": STRIDE, "batch_seqs": 8, "ttt": {**base, **ttt}}})["eval"]


@pytest.fixture(scope="module")
def val(tiny_dataset):
    """Val tokens cut into short documents: a BOS at each of STARTS and nowhere else."""
    tokens = val_tokens(tiny_dataset.dataset_dir, 299, SEQ).clone()
    tokens[tokens == 1] = 5
    tokens[STARTS] = 1
    return tokens, build_byte_luts(tiny_dataset.tokenizer, tiny_dataset.vocab_size)


def run(model, val, cfg, docs=None, **kw):
    tokens, luts = val
    scores = Scores()
    got = phased_eval(copy.deepcopy(model), tokens, SEQ, cfg["ttt"], BPBMeter(luts), scores=scores, docs=docs, **kw)
    return got, scores.by_target()


def test_documents_run_from_bos_to_bos_and_cover_every_target(val):
    tokens, _ = val
    docs = documents(tokens, 1)
    assert [lo for lo, _ in docs] == STARTS and docs[-1][1] == len(tokens) - 1
    assert all(a[1] == b[0] for a, b in zip(docs, docs[1:], strict=False))
    assert documents(torch.tensor([7, 8, 1, 9, 1, 4]), 1) == [(0, 2), (2, 4), (4, 5)]  # a head before the first BOS


def recurrent_model(vocab: int, **extra) -> GPT:
    torch.manual_seed(1)
    cfg = validate({"model": {"num_layers": 3, "model_dim": 32, "num_heads": 2, "num_kv_heads": 1,
                              "recur_layers": [1], "recur_extra_loops": 1, **extra}})["model"]
    model = GPT(vocab, cfg)
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def test_fresh_adapters_leave_the_model_as_it_is_and_come_off(small_model, tiny_dataset):
    model = recurrent_model(tiny_dataset.vocab_size, smear_gate=True, xsa_last_n=1)
    idx = torch.randint(0, tiny_dataset.vocab_size, (3, SEQ))
    lora = DocLoRA(model, 3, 4, 8.0)
    assert len(lora.q) == 4  # one set per virtual layer: block 1 runs twice
    lora.use([2, 0, 1])
    assert torch.equal(LoRAForward(model, lora)(idx), model(idx))
    for m in (lora.q[1], lora.o[2], lora.mlp[0], lora.head):
        m.B.normal_()
    assert not torch.equal(LoRAForward(model, lora)(idx), model(idx))
    plain = model(idx)
    lora.detach()
    assert torch.equal(model(idx), plain)  # the model's own forward never sees the adapters


@torch.no_grad()
def test_q_k_v_and_head_adapters_are_low_rank_weight_updates(tiny_dataset):
    """Reference: an adapter beside a linear map equals that map with alpha/rank * B A added to its weight."""
    model = recurrent_model(tiny_dataset.vocab_size, tie_embeddings=False)
    idx = torch.randint(0, tiny_dataset.vocab_size, (2, SEQ))
    lora = DocLoRA(model, 2, 4, 8.0)
    lora.use([1, 0])
    merged = [copy.deepcopy(model) for _ in range(2)]
    targets = [(lora.q[2], "blocks.1.attn.c_q"), (lora.v[0], "blocks.0.attn.c_v"), (lora.head, "lm_head")]
    for ad, name in targets:
        ad.B.normal_(std=0.3)
        for doc, m in enumerate(merged):
            m.get_submodule(name).weight += ad.scale * ad.B[doc] @ ad.A[doc]
    # slot 2 is block 1's second pass: merging into block 1 changes both passes, so compare
    # against the adapter on both of block 1's slots
    lora.q[1].A.copy_(lora.q[2].A)
    lora.q[1].B.copy_(lora.q[2].B)
    got = LoRAForward(model, lora)(idx)
    assert torch.allclose(got[0], merged[1](idx[:1])[0], atol=1e-5)  # row 0 is document 1
    assert torch.allclose(got[1], merged[0](idx[1:])[0], atol=1e-5)


def test_phased_scores_every_target_once_and_with_lr_zero_is_the_model_in_its_windows(small_model, val):
    tokens, luts = val
    sliding = score(small_model, tokens, windows(len(tokens), SEQ, STRIDE), SEQ, 8, BPBMeter(luts))
    got, losses = run(small_model, val, eval_cfg(lora_lr=0.0, phases=0))
    assert got["tokens"] == sliding["tokens"] == len(tokens) - 1 and got["bytes"] == sliding["bytes"]
    assert sorted(losses) == list(range(len(tokens) - 1)) and got["docs"] == 6
    # reference: chunk [a, e) of a document is scored in the window of the seq_len tokens before a + 16
    for t in (3, 45, 101, 298):
        lo = max(s for s in STARTS if s <= t)
        a = lo + (t - lo) // 16 * 16
        start = min(max(0, a + 16 - SEQ), len(tokens) - 1 - SEQ)
        row = tokens[start : start + SEQ + 1][None]
        want = token_losses(small_model, row[:, :-1], row[:, 1:])[0, t - start].item()
        assert losses[t] == pytest.approx(want, abs=1e-5)


def test_phased_ttt_changes_bpb_against_no_ttt_and_adapters_alone(small_model, val):
    tokens, luts = val
    base, _ = run(small_model, val, eval_cfg(lora_lr=0.0, phases=0))
    lora_only, _ = run(small_model, val, eval_cfg(phases=0))
    full = run_ttt(copy.deepcopy(small_model), tokens, [], SEQ, 8, eval_cfg()["ttt"], BPBMeter(luts))
    assert lora_only["val_bpb"] < base["val_bpb"]  # each document's adapters learn from its scored chunks
    assert full["val_bpb"] != lora_only["val_bpb"] and full["phases"] == 2  # eval.ttt.mode reaches phased TTT


def test_adapters_are_reset_per_document_and_global_phases_carry_over(small_model, val):
    tokens, _ = val
    docs = documents(tokens, 1)
    one = eval_cfg(lora_docs=1, phases=0)
    alone, solo = run(small_model, val, one, docs=docs[2:3])
    _, after_two = run(small_model, val, one, docs=docs[:3])
    lo, hi = docs[2]
    assert all(after_two[t] == solo[t] for t in range(lo, hi)) and alone["docs"] == 1
    _, warm = run(small_model, val, eval_cfg(lora_docs=1, phases=0, lora_warm_a=True), docs=docs[:3])
    assert any(warm[t] != solo[t] for t in range(lo, hi))  # PR #1767's warm A carries one document into the next
    _, phased_run = run(small_model, val, eval_cfg(lora_docs=1, phases=1, phase_docs=2), docs=docs[:3])
    assert all(phased_run[t] == after_two[t] for t in range(0, lo))  # scored before the phase
    assert all(phased_run[t] != after_two[t] for t in range(lo, hi))  # scored after it: the base model moved


def two_forward_adapt_batch(fwd, tokens, batch, cfg, seq_len, meter, scores, order, precision):
    """Reference: each chunk scored by score_windows under inference_mode, then trained on by a second
    forward with gradients over the documents that have a chunk after it (pgolf before one forward)."""
    lora, size, width = fwd.lora, cfg["lora_chunk_tokens"], cfg["lora_docs"]
    lora.reset(cfg["lora_warm_a"])
    opt = phased.lora_optimizer(lora, cfg)
    chunks = [phased.doc_chunks(d, size) for d in batch]

    def windows_of(rows, c):
        return [phased.chunk_window(*chunks[r][c], size, seq_len, len(tokens) - 1) for r in rows]

    def score(c, _):
        rows = [r for r, ch in enumerate(chunks) if c < len(ch)]
        lora.use(phased.padded(rows, width))
        score_windows(fwd, tokens, windows_of(rows, c), seq_len, width, meter, torch.device("cpu"), precision, scores)

    def train(c, _):
        rows = [r for r, ch in enumerate(chunks) if c < len(ch) - 1]
        if rows:
            part = windows_of(rows, c)
            lora.use(phased.padded(rows, width))
            idx = window_batch(tokens, part, seq_len, width)
            losses, mask = token_losses(fwd, idx[:, :-1], idx[:, 1:])[: len(part)], scored_mask(part, seq_len)
            opt.zero_grad()
            ((losses * mask).sum(1) / mask.sum(1)).sum().backward()
            opt.step()

    order(list(range(max(len(ch) for ch in chunks))), score, train)


def test_one_forward_per_chunk_scores_and_trains_as_two_forwards_do(small_model, val, monkeypatch):
    """Each chunk's score comes from the forward its adapters then train on: the same losses as a
    separate scoring forward before a training forward, in half the forwards. Batches of 4 documents
    pad the last batch (2 documents) and every step where a document has ended; a phase after the first."""
    cfg = eval_cfg(lora_docs=4, phases=1, phase_docs=4)
    steps = [max(len(phased.doc_chunks(d, 16)) for d in documents(val[0], 1)[i : i + 4]) for i in (0, 4)]
    forwards = [0]

    def counted(self, idx):
        forwards[0] += 1
        return lora_forward(self, idx)

    lora_forward = LoRAForward.forward
    monkeypatch.setattr(LoRAForward, "forward", counted)
    got, losses = run(small_model, val, cfg)
    assert forwards[0] == sum(steps)  # one a chunk step, the last one's too
    monkeypatch.setattr(phased, "adapt_batch", two_forward_adapt_batch)
    forwards[0] = 0
    want, ref = run(small_model, val, cfg)
    assert forwards[0] == sum(2 * n - 1 for n in steps)  # every step but the last trains on a second forward
    assert got["tokens"] == want["tokens"] == len(val[0]) - 1 and got["bytes"] == want["bytes"]
    assert got["val_bpb"] == pytest.approx(want["val_bpb"], abs=1e-6)
    assert losses.keys() == ref.keys() and all(losses[t] == pytest.approx(ref[t], abs=1e-6) for t in ref)
    still, _ = run(small_model, val, eval_cfg(lora_docs=4, lora_lr=0.0, phases=0))
    assert abs(got["val_bpb"] - still["val_bpb"]) > 1e-3  # the comparison is of a TTT that moves the scores


def test_audit_passes_phased_ttt_inside_a_chunk_and_on_its_boundary(small_model, val):
    tokens, luts = val
    report = audit(small_model, tokens, eval_cfg(), luts)
    # document 3, the first of three chunks that the batch after the phase at 2 documents scores
    assert [r["t"] for r in report] == [130 + 24, 130 + 15]
    assert all(r["ok"] and r["checked"] > 140 for r in report)


def test_audit_catches_an_adapter_trained_before_scoring(small_model, val):
    tokens, luts = val
    report = audit(small_model, tokens, eval_cfg(), luts, order=train_then_score)
    assert not report[0]["ok"] and 130 <= report[0]["first_changed"] <= 154


def test_audit_catches_a_global_phase_on_documents_not_yet_scored(small_model, val, monkeypatch):
    tokens, luts = val
    monkeypatch.setattr(phased, "scored_stream", lambda tokens, docs: tokens)  # the whole split, scored or not
    report = audit(small_model, tokens, eval_cfg(), luts)
    assert not any(r["ok"] for r in report) and report[1]["first_changed"] == 100  # the first scored after the phase


def test_audit_fits_the_phases_inside_the_documents_it_reads(val):
    tokens, _ = val
    ttt = fit_phases(eval_cfg(phase_docs=2500, lora_docs=64, phases=3)["ttt"], tokens, 1)
    assert ttt["phase_docs"] == 4 and ttt["lora_docs"] == 1


def test_bad_phased_settings_fail_naming_the_key(small_model, val):
    with pytest.raises(ConfigError, match="eval.ttt.lora_chunk_tokens=33"):
        eval_cfg(lora_chunk_tokens=33)
    with pytest.raises(ConfigError, match="eval.ttt.phases=3"):
        eval_cfg(phases=3, phase_docs=2)
    ttt = {**eval_cfg()["ttt"], "lora_chunk_tokens": 40}  # a caller that skips validate() is stopped too
    with pytest.raises(ConfigError, match="eval.ttt.lora_chunk_tokens=40"):
        phased_eval(small_model, val[0], SEQ, ttt, BPBMeter(val[1]))


def test_evaluate_runs_phased_ttt_on_one_and_two_processes_alike(setup, tmp_path):
    cfg = eval_cfg(lora_docs=1, phases=1, phase_docs=2, chunk_tokens=256)
    cfg["max_tokens"] = 2800  # two documents of the fixture's val split and the start of a third
    one = evaluate_on_one_process(setup, cfg, tmp_path / "one.json")
    assert one["ttt"]["docs"] == 3 and one["ttt"]["phases"] == 1
    assert one["ttt"]["tokens"] == one["sliding"]["tokens"] and one["ttt"]["bytes"] == one["sliding"]["bytes"]
    two = evaluate_on_two_processes(setup, cfg, tmp_path / "eval.json")  # a document each, then the phase
    assert two["ttt"]["tokens"] == one["ttt"]["tokens"]
    assert two["ttt"]["val_bpb"] == pytest.approx(one["ttt"]["val_bpb"], rel=1e-5)


def test_phased_ttt_scores_the_ngram_tilt_from_the_forward_it_trains_on(small_model, val):
    """Phased TTT records its scores from its training forward (windows.record): the tilt must reach them."""
    from pgolf.eval.ngram import TiltedMeter, tilted_nll, token_hints

    tokens, luts = val
    hints, scores = token_hints(tokens, 2, 0.3), Scores()
    cfg = eval_cfg(lora_lr=0.0, phases=0)["ttt"]
    got = phased_eval(copy.deepcopy(small_model), tokens, SEQ, cfg, TiltedMeter(luts, hints, 2.625), scores=scores)
    tilted, losses = got.pop("ngram"), scores.by_target()
    assert tilted["hinted"] == int(hints.gated.sum()) > 20 and tilted["tokens"] == got["tokens"]
    assert abs(tilted["val_bpb"] - got["val_bpb"]) > 1e-3
    for t in hints.gated.nonzero().flatten().tolist()[::7]:  # as the lr-0 test above: the model in its chunk's window
        lo = max(s for s in STARTS if s <= t)
        start = min(max(0, lo + (t - lo) // 16 * 16 + 16 - SEQ), len(tokens) - 1 - SEQ)
        row = tokens[start : start + SEQ + 1][None]
        with torch.no_grad():
            log_p = torch.log_softmax(small_model(row[:, :-1])[0, t - start].double(), 0)
        want = tilted_nll(-log_p[tokens[t + 1]], log_p[hints.token[t]], tokens[t + 1] == hints.token[t], 2.625)
        assert losses[t][1] == pytest.approx(want.item(), abs=2e-5)
