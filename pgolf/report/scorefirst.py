"""Score-first, for a pgolf record folder: pgolf audit's perturbation check on the folder's model
config, for the sliding evaluation and for each TTT mode.

Every loss recorded for a target at or before t must come out bit for bit the same when every token
after t is replaced. Score-first is a property of the evaluation's code and order, not of trained
weights, so the model is the config's with random weights (perturbed from their init: zero-init
output projections would hide a block that reads the future), on a random token stream cut into
documents by BOS; sizes are shrunk to a few windows and chunks so that it runs in seconds on a CPU
(sequence length at most 64, TTT chunks of at most 256 tokens, phased LoRA chunks of at most 32
and rank at most 8, one epoch, n-gram tilt contexts of one token so that it fires on a random
stream): none of them changes the order in which tokens are scored and trained on.
"""

from __future__ import annotations

import copy

import torch

from pgolf.errors import PgolfError

SEQ, CHUNK, N_TOKENS = 64, 256, 1201
TILT_ORDER = 2  # one-token contexts recur in a random stream, so the n-gram tilt fires
TTT_MODES = ("chunk", "phased_lora")  # the schema's eval.ttt.mode values


def model_of(cfg: dict, seed: int = 0):
    from pgolf.model.gpt import GPT

    torch.manual_seed(seed)
    model = GPT(cfg["tokenizer"]["vocab_size"], cfg["model"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def stream(vocab: int, bos: int, seed: int = 0) -> torch.Tensor:
    """Random tokens in documents of 40 to 160 tokens, each starting with BOS."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab, (N_TOKENS,), generator=gen)
    pos = 0
    while pos < N_TOKENS:
        tokens[pos] = bos
        pos += int(torch.randint(40, 161, (1,), generator=gen))
    return tokens


def small_eval(cfg: dict, mode: str | None) -> dict:
    """The folder's eval section with sizes shrunk; `mode` None is the sliding evaluation alone."""
    from pgolf.config import validate

    e = copy.deepcopy(cfg["eval"])
    e["seq_len"] = min(e["seq_len"], SEQ)
    e["stride"] = max(1, min(e["stride"], e["seq_len"] // 4))
    e["batch_seqs"] = min(e["batch_seqs"], 8)
    e["ngram_tilt"]["order"] = min(e["ngram_tilt"]["order"], TILT_ORDER)
    t = e["ttt"]
    t.update(enabled=mode is not None, mode=mode or t["mode"], chunk_tokens=min(t["chunk_tokens"], CHUNK),
             batch_seqs=min(t["batch_seqs"], 4), epochs=min(t["epochs"], 1),
             lora_chunk_tokens=min(t["lora_chunk_tokens"], 32), lora_rank=min(t["lora_rank"], 8))
    if mode is None:
        return e
    return validate({**cfg, "eval": e})["eval"]  # the schema's rules (legality among them) hold for it


def uniform_bytes(vocab: int):
    """Every token one byte: the audit compares losses, which no byte count enters."""
    from pgolf.eval.bpb import ByteLUTs

    return ByteLUTs(torch.ones(vocab, dtype=torch.int32), torch.zeros(vocab, dtype=torch.bool),
                    torch.zeros(vocab, dtype=torch.bool))


def sliding_losses(model, tokens: torch.Tensor, e: dict) -> dict[int, float | tuple]:
    from pgolf.eval.ngram import meter_for
    from pgolf.eval.windows import Scores, score_windows, windows

    scores = Scores()
    wins = windows(len(tokens), e["seq_len"], e["stride"])
    meter = meter_for(e, tokens, uniform_bytes(model.vocab_size))
    with torch.inference_mode():
        score_windows(model, tokens, wins, e["seq_len"], e["batch_seqs"], meter, torch.device("cpu"), "fp32",
                      scores=scores)
    return scores.by_target()


def audit_sliding(model, tokens: torch.Tensor, e: dict) -> dict:
    """The sliding evaluation's losses before t, with the tokens after t replaced (as pgolf audit does)."""
    t = len(tokens) // 2
    base = sliding_losses(model, tokens, e)
    changed = tokens.clone()
    gen = torch.Generator().manual_seed(t)
    changed[t + 2 :] = torch.randint(4, model.vocab_size, (len(tokens) - t - 2,), generator=gen)
    other = sliding_losses(model, changed, e)
    diffs = [i for i, loss in base.items() if i <= t and other[i] != loss]
    return {"t": t, "checked": sum(1 for i in base if i <= t), "changed": len(diffs), "ok": not diffs}


def audit_mode(model, tokens: torch.Tensor, e: dict) -> list[dict]:
    from pgolf.eval.audit import audit, fit_phases

    if e["ttt"]["mode"] == "phased_lora":
        e = {**e, "ttt": fit_phases(e["ttt"], tokens, model.cfg["bos_id"])}
    return audit(model, tokens, e, uniform_bytes(model.vocab_size), log=lambda _: None)


def tilt_evidence(e: dict, tokens: torch.Tensor) -> list[str]:
    """Under eval.ngram_tilt, that the tilted losses were compared too, and on how many hinted targets."""
    tilt = e["ngram_tilt"]
    if not tilt["enabled"]:
        return []
    from pgolf.eval.ngram import token_hints

    hinted = int(token_hints(tokens, tilt["order"], tilt["threshold"]).gated.sum())
    return [f"n-gram tilt: tilted losses compared too, {hinted} of {len(tokens) - 1:,} targets hinted "
            f"(order {tilt['order']})"]


def audit_config(cfg: dict) -> tuple[list[str], list[str]]:
    """(evidence lines, failure reasons) of the sliding evaluation and every TTT mode on `cfg`."""
    try:
        model = model_of(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise PgolfError(f"its model section does not build a pgolf model ({e})") from None
    from pgolf.config import validate

    try:  # the config as run first: its own TTT must be legal, whatever the shrunk copies below allow
        validate(cfg)
    except PgolfError as e:
        return [], [f"config.yaml: {e}"]
    tokens = stream(model.vocab_size, model.cfg["bos_id"])
    lines, reasons = [], []
    run_mode = cfg["eval"]["ttt"]["mode"] if cfg["eval"]["ttt"]["enabled"] else None
    r = audit_sliding(model, tokens, small_eval(cfg, None))
    lines.append(f"sliding: {r['checked']:,} losses up to t={r['t']}, {r['changed']} changed")
    if not r["ok"]:
        reasons.append(f"sliding evaluation: {r['changed']} losses at targets <= {r['t']} changed with the tokens "
                       "after it")
    for mode in TTT_MODES:
        try:
            e = small_eval(cfg, mode)
        except PgolfError as err:  # a mode this model config cannot run: no failure, unless it is the run's
            if mode == run_mode:
                reasons.append(f"ttt {mode} (the run's): its shrunk copy is refused ({err})")
            lines.append(f"ttt {mode}: not applicable ({err})")
            continue
        report = audit_mode(model, tokens, e)
        lines.append(f"ttt {mode}: " + ", ".join(f"{x['checked']:,} losses up to t={x['t']}, {x['changed']} changed"
                                                  for x in report))
        reasons += [f"ttt {mode}: {x['changed']} losses at targets <= {x['t']} changed with the tokens after it"
                    for x in report if not x["ok"]]
    lines += tilt_evidence(small_eval(cfg, None), tokens)
    lines.append(f"on {cfg['tokenizer']['vocab_size']}-token random streams, the config's model with random weights")
    return lines, reasons
