# Config validation and the paths and params every rule shares. Plain strings only in params:
# Snakemake tracks them, so a changed config section reruns its stage and what follows it.

import json
from pathlib import Path

import pgolf.config
import pgolf.provenance

# Snakemake reads --configfile with a YAML loader that keeps the last of two equal keys; read each
# file again strictly so a repeated section fails instead of silently dropping the first.
for _f in workflow.configfiles:
    pgolf.config.read_file(_f)
config.update(pgolf.config.validate(config))

wildcard_constraints:
    seed=r"\d+",

RUN = f"results/{config['run']}"
DATASET = config["data"]["name"]
VOCAB = config["tokenizer"]["vocab_size"]
RAW_DIR = f"data/raw/{DATASET}"
DOCS = f"data/docs/{DATASET}.parquet"
TOKENIZER = f"data/tokenizers/{DATASET}_sp{VOCAB}.model"
DATASET_DIR = f"data/datasets/{DATASET}_sp{VOCAB}"
SEED_DIR = f"{RUN}/seed{{seed}}"
NPROC = config["train"]["nproc"]
# torchrun picks a free rendezvous port with --standalone, so several trainings can share a host.
TORCHRUN = "torchrun --standalone --nproc-per-node {resources.nproc} -m pgolf"


def section(name, keys=None):
    """A config section (or some of its keys) as canonical JSON: a plain string param Snakemake tracks."""
    sec = config[name]
    return json.dumps(sec if keys is None else {k: sec[k] for k in keys}, sort_keys=True)


def code(stage):
    return pgolf.provenance.code_version(stage)


def print_summary():
    table = Path(f"{RUN}/summary.md")
    if table.exists():
        print("\n" + table.read_text())
