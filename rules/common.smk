# Config validation and the paths and params every rule shares. Plain strings only in params:
# Snakemake tracks them, so a changed config section reruns its stage and what follows it.

import json
from pathlib import Path

import snakemake.io

import pgolf.pipeline.bundle
import pgolf.pipeline.cluster
import pgolf.config
import pgolf.errors
import pgolf.pipeline.stages
import pgolf.pipeline.provenance

# Snakemake reads config files with YAML 1.1 (`3e-4` is a string there) and keeps the last of two
# equal keys. Build the config again from the same files with pgolf's reader (YAML 1.2 numbers, a
# repeated key refused), in Snakemake's order: the Snakefile's configfile, --configfile, --config.
_cli_files = [Path(f).absolute() for f in workflow.config_settings.configfiles]
# A preset given with --configfile stands alone on the schema's defaults (or on what it `extends`),
# never on config.yaml, the CPU toy run, by accident: the Snakefile's configfile is for a plain run.
_own_files = [] if workflow.config_settings.replace_workflow_config or _cli_files else [
    f for f in workflow.configfiles if Path(f).absolute() not in _cli_files]
_overrides = pgolf.config.typed_overrides(dict(workflow.config_settings.config))  # --config seeds=[1337]
try:
    _resolved = pgolf.config.load(*_own_files, *_cli_files, overrides=_overrides)
except pgolf.errors.PgolfError as e:
    raise WorkflowError(str(e)) from None
config.clear()
config.update(_resolved)

wildcard_constraints:
    seed=r"\d+",

RUN = f"results/{config['run']}"
DATASET = config["data"]["name"]
VOCAB = config["tokenizer"]["vocab_size"]
# the embedded corpus is one download whatever the dataset is named (data.name names what is built from it)
RAW_DIR = "data/raw/embedded"
DOCS = f"data/docs/{DATASET}.parquet"
# A CaseOps tokenizer and its shards are other files than the plain ones: switching back and forth
# between runs that differ in tokenizer.caseops rebuilds neither.
_CASEOPS = "_caseops" if config["tokenizer"]["caseops"] else ""
TOKENIZER = f"data/tokenizers/{DATASET}_sp{VOCAB}{_CASEOPS}.model"
DATASET_DIR = f"data/datasets/{DATASET}_sp{VOCAB}{_CASEOPS}"
SEED_DIR = f"{RUN}/seed{{seed}}"
NPROC = config["train"]["nproc"]
# SLURM: the site comes from the profile's default-resources (pgolf/pipeline/cluster.py); a local run has none.
# Which one this is, Snakemake's executor says (the command's, read where the user invoked Snakemake; a
# job's own Snakemake inside SLURM gets the site that was checked here). A missing, misspelt or
# placeholder site key under SLURM, or a site under another executor, fails here, before any submission.
_cli = pgolf.pipeline.cluster.snakemake_cli_args() if not (workflow.remote_exec or workflow.subprocess_exec) else None
_profiles = ", ".join(str(p) for p in (getattr(_cli, "profile", None) or []))
try:
    SITE = pgolf.pipeline.cluster.read_site(getattr(workflow.resource_settings.default_resources, "args", None) or [],
                                            f"the profile ({_profiles})" if _profiles else "the command line",
                                            getattr(_cli, "executor", None))
except pgolf.errors.PgolfError as e:
    raise WorkflowError(str(e)) from None


def is_local(stage):
    """Whether a stage runs on the submitting host under SLURM (pgolf/pipeline/stages.py says why)."""
    return pgolf.pipeline.stages.stage(stage).local


def slurm(stage):
    """A stage's SLURM resources (partition by the config's device, cores, memory, runtime, GPUs, one node)."""
    return pgolf.pipeline.cluster.resources(stage, config, SITE)


def gpus(stage):
    """GPUs a stage holds on a CUDA run: train.nproc under torchrun, one on the device otherwise. With
    a gpu limit (the GPU profiles) a calibration never runs beside a training."""
    row = pgolf.pipeline.stages.stage(stage)
    if config["device"] != "cuda" or not row.device:
        return 0
    return NPROC if row.torchrun else 1


def threads_of(stage):
    return pgolf.pipeline.cluster.threads(stage, SITE, workflow.cores)


def group_of(stage):
    return pgolf.pipeline.cluster.group(stage, SITE)



# torchrun picks a free rendezvous port with --standalone, so several trainings can share a host.
# `pgolf launch` is torchrun with the same arguments, whose log ends with a stage's one-line error
# instead of torchrun's own traceback (pgolf/runtime/launch.py).
TORCHRUN = "pgolf launch --standalone --nproc-per-node {resources.nproc:q} -m pgolf"


def section(name, without=()):
    """A config section, whole, as canonical JSON: a plain string param Snakemake tracks, so any key
    of it that changes reruns the stage. `without` keeps out keys the stage does not read, where
    passing them would rerun it for nothing; the rule says why beside each."""
    sec = config[name]
    missing = [k for k in without if k not in sec]
    if missing:
        raise WorkflowError(f"section({name!r}): {missing} are no keys of it")
    return json.dumps({k: v for k, v in sec.items() if k not in without}, sort_keys=True)


def config_path(key, path):
    """A path the config names, as a rule's input. Snakemake reads {name} in an input path as a
    wildcard (a function's paths too) and has no escape for it: such a path fails here, by its key."""
    if snakemake.io.contains_wildcard(path):
        raise WorkflowError(f"{key}: {path!r} has '{{...}}' in it, which Snakemake takes for a wildcard in a rule's "
                            "inputs: rename it")
    return path


def code(stage):
    return pgolf.pipeline.provenance.code_version(stage)


def print_summary():
    table = Path(f"{RUN}/summary.md")
    if table.exists():
        print("\n" + table.read_text())
