"""`pgolf evaluate`: val BPB of the EMA weights, of the weights read back from the artifact, by
sliding window over the artifact weights, and with legal score-first TTT when eval.ttt.enabled (in
the mode eval.ttt.mode names: chunk, pgolf/eval/ttt.py, or phased_lora, pgolf/eval/phased.py).
Windows are spread over processes under torchrun; the scored path is checked against the budget."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from pgolf.errors import PgolfError
from pgolf.eval.bpb import BPBMeter, ByteCounts, byte_counts
from pgolf.eval.ngram import TiltedMeter, token_hints
from pgolf.eval.phased import phased_eval
from pgolf.eval.ttt import ttt_eval
from pgolf.eval.tttsteps import freeze, run_chunks
from pgolf.eval.windows import Scores, Window, plain_windows, score_windows, windows
from pgolf.formats import tensorfile
from pgolf.formats.results import first_nonfinite, write_result
from pgolf.formats.shards import check_tokenizer, check_vocab, load_split, open_dataset
from pgolf.model.gpt import GPT, load_weights
from pgolf.quant.artifact import read_artifact, read_checked
from pgolf.quant.quantize import dequantize
from pgolf.runtime.device import PRECISIONS, compiled
from pgolf.runtime.distributed import setup_distributed, teardown

__all__ = ["evaluate", "plain_windows", "score", "val_tokens", "windows"]


def val_tokens(data: str | Path, max_tokens: int, seq_len: int, vocab_size: int | None = None) -> torch.Tensor:
    """All val shards in order, cut to max_tokens targets when max_tokens > 0 (ids checked against
    vocab_size when given)."""
    tokens = torch.from_numpy(load_split(data, "val", vocab_size).astype(np.int64))
    if max_tokens:
        tokens = tokens[: max_tokens + 1]
    if len(tokens) - 1 < seq_len:
        raise PgolfError(f"{data}: {len(tokens)} val tokens are fewer than one window "
                         f"of eval.seq_len={seq_len} + 1")
    return tokens


@torch.inference_mode()
def score(model: GPT, tokens: torch.Tensor, wins: list[tuple[int, int]], seq_len: int, batch: int,
          meter: BPBMeter, rank: int = 0, world: int = 1, label: str = "", precision: str = "auto",
          forward: torch.nn.Module | None = None) -> dict:
    """BPB over windows `wins` (this process takes every world-th one), summed over all processes.
    `forward` is the model to run (its compiled form), `model` by default."""
    device = next(model.parameters()).device
    run = forward if forward is not None else model  # a compiled module has no truth value
    score_windows(run, tokens, wins[rank::world], seq_len, batch, meter, device, precision,
                  label=label if rank == 0 else "")
    meter.all_reduce()
    return meter.result()


def artifact_model(path: str | Path) -> GPT:
    """The model as the artifact holds it: read, checked, decompressed and dequantized."""
    return quantized_model(*dequantize(*tensorfile.loads(read_artifact(path), str(path))))


def quantized_model(state: dict[str, torch.Tensor], meta: dict) -> GPT:
    model = GPT.from_meta(meta)
    model.load_state_dict(state)
    return model


def pruning(header: dict, unpruned: Path | None, post_quant: dict, score_model: Callable[[GPT], dict]) -> dict:
    """How many +-1 codes compress pruned (the checked artifact header's count) and the BPB before
    pruning: the quantized tensors compress read (`unpruned`, --unpruned), scored as post_quant is;
    post_quant itself when nothing was pruned. Without `unpruned`, a pruned artifact reports only its count."""
    pruned = int(header.get("pruned_codes", 0))
    if pruned and unpruned is None:
        return {"pruned_codes": pruned}
    before = score_model(quantized_model(*dequantize(unpruned))) if pruned else post_quant
    return {"pruned_codes": pruned, "unpruned": before, "prune_cost_bpb": post_quant["val_bpb"] - before["val_bpb"]}


def run_ttt(model: GPT, tokens: torch.Tensor, wins: list[Window], seq_len: int, batch: int, cfg: dict,
            meter: BPBMeter, rank: int = 0, world: int = 1, scores: Scores | None = None,
            order: Callable = run_chunks, precision: str = "auto", forward: torch.nn.Module | None = None) -> dict:
    """BPB under the TTT mode eval.ttt.mode names (`cfg` is eval.ttt); the model is adapted in place.
    Chunk mode scores the sliding windows `wins` through `forward` (the compiled model); phased LoRA
    mode cuts the same val stream into documents and runs the model with its adapters hooked in."""
    if cfg["mode"] == "phased_lora":
        return phased_eval(model, tokens, seq_len, cfg, meter, rank, world, scores, order, precision)
    return ttt_eval(model, tokens, wins, seq_len, batch, cfg, meter, rank, world, scores, order, precision, forward)


def measure(cfg: dict, data: Path, tokenizer: Path, ema: Path, artifact: Path, rank: int, world: int,
            device: torch.device, precision: str = "auto", unpruned: Path | None = None) -> dict:
    """The scores of evaluate (`cfg` is the eval section) on this process's share of the windows,
    summed over all processes: every process returns the same result."""
    T, B = cfg["seq_len"], cfg["batch_seqs"]
    # A tokenizer other than the shards' counts other bytes: a plausible BPB, and a wrong one.
    check_tokenizer(data, tokenizer)
    ema_model = load_weights(ema).to(device).eval()
    checked = read_checked(artifact)  # one read: the model and the header's counts, under one checksum
    art = quantized_model(*dequantize(*tensorfile.loads(checked.raw, str(artifact)))).to(device).eval()
    open_dataset(data, ema_model.vocab_size, f"the vocabulary of {ema}")
    check_vocab(data, art.vocab_size, f"the vocabulary of {artifact}")
    tokens = val_tokens(data, cfg["max_tokens"], T, ema_model.vocab_size)
    luts = byte_counts(data, tokenizer, ema_model.vocab_size, len(tokens))  # a CaseOps sidecar, or the tables
    plain, sliding = plain_windows(len(tokens), T), windows(len(tokens), T, cfg["stride"])
    result, seconds = {}, {}
    scored_meter = ngram_meters(cfg, tokens, luts, seconds)
    if cfg["ttt"]["enabled"]:  # frozen before the first compile: requires_grad is part of a compiled graph's guards
        freeze(art, cfg["ttt"])
    fwd = {id(m): compiled(m, cfg["compile"], device) for m in (ema_model, art)}
    parts = {"pre_quant": (ema_model, plain), "post_quant": (art, plain), "sliding": (art, sliding)}
    for name, (model, wins) in parts.items():
        t0 = time.perf_counter()
        meter = scored_meter() if name == "sliding" else BPBMeter(luts)
        result[name] = score(model, tokens, wins, T, B, meter, rank, world, label=name,
                             precision=precision, forward=fwd[id(model)])
        seconds[name] = time.perf_counter() - t0
        log(rank, f"{name}: bpb {result[name]['val_bpb']:.4f} loss {result[name]['val_loss']:.4f} "
                  f"({len(wins)} windows, {seconds[name]:.1f}s)")
        split_tilted(result, name, rank)
    result["sliding"].update(seq_len=T, stride=cfg["stride"])
    t0 = time.perf_counter()  # not part of the scored path: a diagnostic of pruning's cost
    result.update(pruning(checked.header, unpruned, result["post_quant"], lambda m: score(
        m.to(device).eval(), tokens, plain, T, B, BPBMeter(luts), rank, world, label="unpruned", precision=precision)))
    if "unpruned" in result and result["pruned_codes"]:
        seconds["unpruned"] = time.perf_counter() - t0
        log(rank, f"unpruned: bpb {result['unpruned']['val_bpb']:.4f}, pruning {result['pruned_codes']:,} codes cost "
                  f"{result['prune_cost_bpb']:+.4f} ({seconds['unpruned']:.1f}s)")
    if cfg["ttt"]["enabled"]:  # adapts `art` in place: it runs last
        t0 = time.perf_counter()
        result["ttt"] = run_ttt(art, tokens, sliding, T, B, cfg["ttt"], scored_meter(), rank, world,
                                precision=precision, forward=fwd[id(art)])
        seconds["ttt"] = time.perf_counter() - t0
        result["ttt_gain_bpb"] = result["ttt"]["val_bpb"] - result["sliding"]["val_bpb"]
        log(rank, f"ttt: bpb {result['ttt']['val_bpb']:.4f} (gain {result['ttt_gain_bpb']:+.4f}) over "
                  f"{result['ttt']['chunks']} chunks, {seconds['ttt']:.1f}s")
        split_tilted(result, "ttt", rank)
    result["quant_gap_bpb"] = result["post_quant"]["val_bpb"] - result["pre_quant"]["val_bpb"]
    result["eval_seconds"] = seconds
    result["scored_eval_seconds"] = seconds["sliding"] + seconds.get("ttt", 0.0) + seconds.get("ngram_hints", 0.0)
    check_budget(cfg, result["scored_eval_seconds"], rank)
    return result


def ngram_meters(cfg: dict, tokens: torch.Tensor, luts: ByteCounts, seconds: dict) -> Callable[[], BPBMeter]:
    """A new meter for each scored pass (sliding window, TTT): under eval.ngram_tilt one that also
    keeps the tilted scores, with the hints of the val stream computed once here, timed into
    `seconds` (the record counts them inside its eval time)."""
    tilt = cfg["ngram_tilt"]
    if not tilt["enabled"]:
        return lambda: BPBMeter(luts)
    t0 = time.perf_counter()
    hints = token_hints(tokens, tilt["order"], tilt["threshold"])
    seconds["ngram_hints"] = time.perf_counter() - t0
    return lambda: TiltedMeter(luts, hints, tilt["boost"])


def split_tilted(result: dict, name: str, rank: int) -> None:
    """A tilted pass's n-gram scores to their own part of eval.json, `<name>_ngram`, with their gain."""
    if "ngram" not in result[name]:
        return
    tilted = result[name].pop("ngram")
    tilted["gain_bpb"] = tilted["val_bpb"] - result[name]["val_bpb"]
    result[f"{name}_ngram"] = tilted
    log(rank, f"{name}_ngram: bpb {tilted['val_bpb']:.4f} ({tilted['gain_bpb']:+.4f} from the n-gram tilt; "
              f"{tilted['hinted']:,} targets hinted, {tilted['hint_hits']:,} right)")


def log(rank: int, msg: str) -> None:
    if rank == 0:
        print(msg, flush=True)


def check_budget(cfg: dict, used: float, rank: int) -> None:
    """Warn or fail (eval.on_over_budget) when the scored path ran past eval.time_budget_seconds."""
    budget = cfg["time_budget_seconds"]
    if not budget or used <= budget:
        return
    msg = (f"the scored evaluation (sliding window + TTT + n-gram hints) took {used:.1f}s, "
           f"over eval.time_budget_seconds={budget}")
    if cfg["on_over_budget"] == "fail":
        raise PgolfError(msg)
    log(rank, f"WARNING: {msg}")


def refuse_nonfinite(result: dict, ema: Path, artifact: Path, out: Path) -> None:
    """A NaN score is no score: name the weights it came from, and write no eval.json for aggregate to average."""
    bad = first_nonfinite(result)
    if bad is not None:
        source = ema if bad[0].startswith("pre_quant") else artifact
        raise PgolfError(f"{source}: {bad[0]} is {bad[1]} (NaN/Inf weights or an overflow); {out} not written")


def evaluate(cfg: dict, data: Path, tokenizer: Path, ema: Path, artifact: Path, out: Path, device: str = "auto",
             precision: str = "auto", unpruned: Path | None = None) -> dict:
    """The evaluate stage: `cfg` is the eval section, the paths are the rule's (`unpruned` only when
    compress pruned); `device` is auto, cpu or cuda. Under torchrun every process scores its share
    and rank 0 writes `out`. Returns what `out` holds."""
    rank, world, dev = setup_distributed(device)
    result = measure(cfg, data, tokenizer, ema, artifact, rank, world, dev, precision, unpruned)
    refuse_nonfinite(result, ema, artifact, out)  # every process holds the same all-reduced result, so all stop alike
    if rank == 0:
        write_result(out, result)
    teardown(world)
    return result


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf evaluate", description=__doc__)
    for name in ("--data", "--tokenizer", "--ema", "--artifact", "--cfg", "--out"):
        ap.add_argument(name, required=True)
    ap.add_argument("--unpruned", help="the quantized tensors before pruning, to score what pruning cost")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", default="auto", choices=PRECISIONS, help="autocast: bf16, fp32, auto (bf16 on CUDA)")
    args = ap.parse_args(argv)
    evaluate(json.loads(args.cfg), Path(args.data), Path(args.tokenizer), Path(args.ema), Path(args.artifact),
             Path(args.out), args.device, args.precision, None if args.unpruned is None else Path(args.unpruned))
