"""`pgolf audit`: a causality check of the evaluation a run submits, on its real model.

It runs the sliding-window evaluation with test-time training twice from the artifact's weights:
once on the val tokens, once with every token after a position t replaced. Every loss recorded for
a target at or before t must come out bit for bit the same: nothing the evaluation did before
scoring a token may depend on what comes after it. t is taken both inside a chunk (where training
on the chunk before scoring it shows) and on a chunk's last target (where a training range that
reached one token too far, into the next chunk, would show).

Under eval.ngram_tilt each target's tilted loss is compared too, the hints computed from each pass's
own tokens; and the hints of targets up to t must not move when the tokens from t's own target on
are replaced (a hint may not read the token it is scored against).

In phased mode (eval.ttt.mode phased_lora) t is taken in a document that the batch right after the
first global phase scores: inside its second chunk and on its first chunk's last target, so that an
adapter trained on a chunk before scoring it shows, and so does a global phase that trained on a
document not yet scored.

It audits the evaluation the run itself made: its eval section comes from the run's resolved config
(results/<run>/record/config.yaml, written by the record stage), and config files given with
--config must agree with it where the audit reads them. The val split is checked against its
manifest and the artifact's vocabulary, as evaluate checks it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from pgolf.config import load
from pgolf.errors import PgolfError
from pgolf.eval.bpb import ByteCounts, byte_counts
from pgolf.eval.evaluate import artifact_model, run_ttt, val_tokens, windows
from pgolf.eval.ngram import HintsOf, meter_for, token_hints
from pgolf.eval.phased import doc_chunks, documents, phase_ends
from pgolf.eval.tttsteps import run_chunks
from pgolf.eval.windows import Scores
from pgolf.formats.shards import check_tokenizer, open_dataset
from pgolf.model.gpt import GPT
from pgolf.pipeline.plan import OUTPUTS, stage_dir


def recorded_losses(model: GPT, tokens: torch.Tensor, cfg: dict, luts: ByteCounts,
                    order: Callable = run_chunks, hints_of: HintsOf = token_hints) -> dict[int, float | tuple]:
    """Each scored target's loss under TTT (and its tilted loss under eval.ngram_tilt, the hints
    computed from these very tokens)."""
    scores = Scores()
    wins = windows(len(tokens), cfg["seq_len"], cfg["stride"])
    run_ttt(copy.deepcopy(model), tokens, wins, cfg["seq_len"], cfg["batch_seqs"], cfg["ttt"],
            meter_for(cfg, tokens, luts, hints_of), scores=scores, order=order)
    return scores.by_target()


def audit_positions(cfg: dict, tokens: torch.Tensor, bos_id: int) -> list[int]:
    """A target in the middle of the second chunk, and the first chunk's last target."""
    n_targets = len(tokens) - 1
    if cfg["ttt"]["mode"] == "phased_lora":
        return [t for t in phased_positions(cfg["ttt"], tokens, bos_id) if t < n_targets - 1]
    c = cfg["ttt"]["chunk_tokens"]
    return [t for t in (c + c // 2, c - 1) if t < n_targets - 1]


def phased_positions(ttt: dict, tokens: torch.Tensor, bos_id: int) -> list[int]:
    """The same two targets in the first document of at least three chunks that the batch after the
    first global phase scores (or the first such document at all, when no phase falls in `tokens`)."""
    docs, size = documents(tokens, bos_id), ttt["lora_chunk_tokens"]
    width = ttt["lora_docs"]
    after = -(-phase_ends(ttt)[0] // width) * width if ttt["phases"] else 0  # documents scored before it
    long = [d for d in docs if len(doc_chunks(d, size)) >= 3]
    pick = next((d for d in docs[after : after + width] if d in long), long[0] if long else docs[0])
    return [pick[0] + size + size // 2, pick[0] + size - 1]


def fit_phases(ttt: dict, tokens: torch.Tensor, bos_id: int) -> dict:
    """The audit reads a few chunks of val: far fewer documents than phase_docs. Phases (and batches)
    shrink to fall inside them, so that the audit crosses every global phase."""
    n, phases = len(documents(tokens, bos_id)), max(1, ttt["phases"])
    docs = max(phases, min(ttt["phase_docs"], n * 2 // 3))
    return {**ttt, "phase_docs": docs, "lora_docs": min(ttt["lora_docs"], max(1, docs // phases))}


def progress(msg: str) -> None:
    print(msg, flush=True)


def audit(model: GPT, tokens: torch.Tensor, cfg: dict, luts: ByteCounts, positions: list[int] | None = None,
          order: Callable = run_chunks, seed: int = 0, log: Callable[[str], None] = progress,
          hints_of: HintsOf = token_hints) -> list[dict]:
    """For each t: how many recorded losses at targets <= t changed when the tokens after t changed.
    Each pass is a whole TTT evaluation (about a minute on the default model on CPU): `log` says
    which one runs and how long the rest will take."""
    ts = positions or audit_positions(cfg, tokens, model.cfg["bos_id"])
    if not ts:  # all() of no verdicts is True: an audit of nothing would print "passed"
        key = "lora_chunk_tokens" if cfg["ttt"]["mode"] == "phased_lora" else "chunk_tokens"
        raise PgolfError(f"audit: the {len(tokens) - 1:,} val targets read are too few to audit a target inside a "
                         f"second chunk of eval.ttt.{key}={cfg['ttt'][key]:,}; raise --chunks, or audit a run whose "
                         "val split holds two chunks")
    passes, t0 = 1 + len(ts), time.perf_counter()
    log(f"audit: pass 1/{passes}: TTT evaluation of {len(tokens) - 1:,} targets as they are")
    base = recorded_losses(model, tokens, cfg, luts, order, hints_of)
    per_pass = time.perf_counter() - t0
    report = []
    for k, t in enumerate(ts, start=2):
        log(f"audit: pass {k}/{passes}: every token after target {t:,} replaced "
            f"(about {per_pass * (passes - k + 1):.0f}s left)")
        changed = tokens.clone()
        gen = torch.Generator().manual_seed(seed + t)
        changed[t + 2 :] = torch.randint(0, model.vocab_size, (len(tokens) - t - 2,), generator=gen)
        other = recorded_losses(model, changed, cfg, luts, order, hints_of)
        # target t predicts token t + 1, so tokens from t + 2 on are the future of every target <= t
        diffs = [i for i, loss in base.items() if i <= t and other[i] != loss]
        report.append({"t": t, "checked": sum(1 for i in base if i <= t), "changed": len(diffs),
                       "first_changed": min(diffs) if diffs else None, "ok": not diffs})
        if cfg["ngram_tilt"]["enabled"]:
            report[-1]["hints_changed"] = hints_moved(tokens, t, cfg["ngram_tilt"], hints_of, model.vocab_size, seed)
            report[-1]["ok"] = report[-1]["ok"] and not report[-1]["hints_changed"]
        log(f"audit: t={t:,}: {report[-1]['checked']:,} losses checked, {len(diffs):,} changed")
    return report


def hints_moved(tokens: torch.Tensor, t: int, tilt: dict, hints_of: HintsOf, vocab: int, seed: int) -> int:
    """How many n-gram hints of targets <= t change when every token from target t's own (t + 1) on is
    replaced: a hint may read no token it is scored against (PR #779's rule), nor any after it."""
    changed = tokens.clone()
    gen = torch.Generator().manual_seed(seed + t + 1)
    changed[t + 1 :] = torch.randint(0, vocab, (len(tokens) - t - 1,), generator=gen)
    a, b = (hints_of(x, tilt["order"], tilt["threshold"]) for x in (tokens, changed))
    moved = (a.gated[: t + 1] != b.gated[: t + 1]) | (a.gated[: t + 1] & (a.token[: t + 1] != b.token[: t + 1]))
    return int(moved.sum())


def enough_documents(data: str | Path, tokens: torch.Tensor, cfg: dict, bos_id: int,
                     vocab_size: int | None = None) -> torch.Tensor:
    """Val read on (doubling) until it holds three documents per global phase, so the audited target
    lies after a phase, or until the split ends: a few chunks of FineWeb hold hundreds of documents,
    a small val split may hold fewer than the phases need."""
    want = 3 * max(1, cfg["ttt"]["phases"])
    while len(documents(tokens, bos_id)) < want:
        more = val_tokens(data, 2 * (len(tokens) - 1), cfg["seq_len"], vocab_size)
        if len(more) == len(tokens):
            print(f"audit: the val split holds {len(documents(tokens, bos_id))} documents, fewer than {want}",
                  flush=True)
            break
        tokens = more
    return tokens


# Where a run keeps its resolved config (pgolf/report/record.py writes it), and the eval keys the audit reads.
RESOLVED_CONFIG = Path("record") / "config.yaml"
AUDITED_KEYS = ("seq_len", "stride", "batch_seqs", "ttt", "ngram_tilt")


def run_eval_config(run: Path, files: list[str] | None) -> dict:
    """The eval section the run was evaluated with. Its own resolved config says it; config files
    given instead must agree with it on every key the audit reads (config.yaml's chunk TTT audited
    for a phased run would pass and prove nothing), and stand alone only where the run has none."""
    resolved = run / RESOLVED_CONFIG
    if files is None:
        if not resolved.is_file():
            raise PgolfError(f"{resolved}: not found: the audit needs the run's own eval config, which the run's "
                             "record stage writes there; finish the run (snakemake with its config), or name the "
                             "config files it ran with: --config FILE...")
        return load(resolved)["eval"]
    cfg = load(*files)["eval"]
    if resolved.is_file():
        own = load(resolved)["eval"]
        differ = _differences(_audited(cfg), _audited(own))
        if differ:
            key, value, theirs = differ[0]
            raise PgolfError(f"--config {' '.join(files)}: eval.{key} is {value!r}, but the run was evaluated with "
                             f"{theirs!r} ({resolved}); drop --config to audit the run's own config")
    return cfg


def _audited(eval_cfg: dict) -> dict:
    """What the audit reads of an eval section; it runs TTT whether the run had it on or not."""
    return {**{k: eval_cfg[k] for k in AUDITED_KEYS}, "ttt": {**eval_cfg["ttt"], "enabled": True}}


def _differences(a: dict, b: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for k in a:
        if isinstance(a[k], dict) and isinstance(b.get(k), dict):
            out += _differences(a[k], b[k], f"{prefix}{k}.")
        elif a[k] != b.get(k):
            out.append((f"{prefix}{k}", a[k], b.get(k)))
    return out


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf audit", description=__doc__)
    ap.add_argument("--run", type=Path, required=True, help="a finished run's folder, e.g. results/default")
    ap.add_argument("--seed", type=int, required=True, help="the seed whose artifact is audited")
    ap.add_argument("--config", nargs="+", default=None,
                    help=f"the run's config files (default: the run's own, <run>/{RESOLVED_CONFIG})")
    ap.add_argument("--data", required=True, help="the dataset folder (its val shards)")
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--chunks", type=int, default=3, help="val chunks to audit over (the whole split is slow)")
    args = ap.parse_args(argv)
    cfg = run_eval_config(args.run, args.config)
    cfg["ttt"] = {**cfg["ttt"], "enabled": True}
    artifact = Path(stage_dir(args.run, args.seed, "compress")) / OUTPUTS["compress"]["artifact"]
    model = artifact_model(artifact)
    # as evaluate checks them: the tokenizer counts the bytes, and an id beyond the vocabulary is no token
    check_tokenizer(args.data, args.tokenizer)
    open_dataset(args.data, model.vocab_size, f"the vocabulary of {artifact}")
    tokens = val_tokens(args.data, args.chunks * cfg["ttt"]["chunk_tokens"], cfg["seq_len"], model.vocab_size)
    if cfg["ttt"]["mode"] == "phased_lora":
        tokens = enough_documents(args.data, tokens, cfg, model.cfg["bos_id"], model.vocab_size)
        n_docs = len(documents(tokens, model.cfg["bos_id"]))
        cfg["ttt"] = fit_phases(cfg["ttt"], tokens, model.cfg["bos_id"])
        print(f"audit: phased TTT over {n_docs} documents, batches of {cfg['ttt']['lora_docs']}, "
              f"phases after {phase_ends(cfg['ttt'])}", flush=True)
    report = audit(model, tokens, cfg, byte_counts(args.data, args.tokenizer, model.vocab_size, len(tokens)))
    print(json.dumps(report, indent=2))
    if not all(r["ok"] for r in report):
        raise SystemExit("pgolf audit: FAILED: a loss recorded before position t depends on tokens after t")
    print("pgolf audit: passed: every recorded loss depends only on tokens before it")
