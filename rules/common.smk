# Config validation and the paths and params every rule shares. Plain strings only in params:
# Snakemake tracks them, so a changed config section reruns its stage and what follows it.

import json
import re
from pathlib import Path

import snakemake.io

import pgolf.pipeline.bundle
import pgolf.pipeline.features
import pgolf.pipeline.cluster
import pgolf.config
import pgolf.errors
import pgolf.pipeline.stages
import pgolf.pipeline.plan
import pgolf.pipeline.provenance
import pgolf.pipeline.study

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
    # every run the config asks for: itself, or a study's baseline and variants (pgolf/pipeline/study.py)
    RUNS = pgolf.pipeline.study.runs(pgolf.config.merged(*_own_files, *_cli_files, overrides=_overrides))
except pgolf.errors.PgolfError as e:
    raise WorkflowError(str(e)) from None
_resolved = next(iter(RUNS.values()))[1]  # the baseline: the config the data and site settings come from
config.clear()
config.update(_resolved)
# Every job of every run, each in a folder named by what it depends on: runs that agree on a stage
# share its job (pgolf/pipeline/plan.py).
try:
    PLAN = pgolf.pipeline.plan.Plan(RUNS, pgolf.pipeline.provenance.code_version, pgolf.pipeline.bundle.code_bytes)
except pgolf.errors.PgolfError as e:
    raise WorkflowError(str(e)) from None
STORE = pgolf.pipeline.plan.STORE
STUDY = f"results/{config['run']}" if config["study"]["variants"] else None


def _alternatives(names):
    return "|".join(re.escape(n) for n in sorted(set(names))) or "(?!)"


wildcard_constraints:
    key=r"[0-9a-f]{16}",
    run=_alternatives(folder.removeprefix("results/") for folder in PLAN.runs),
    docs=_alternatives(r.data.docs_name for r in PLAN.runs.values()),
    dataset=_alternatives(r.data.dataset_name for r in PLAN.runs.values()),

RUN = f"results/{config['run']}"
# the embedded corpus is one download whatever the dataset is named (data.name names what is built from it)
RAW_DIR = "data/raw/embedded"
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
    """A stage's SLURM resources (partition by the config's device, cores, memory, runtime, GPUs, one
    node), from the config of the run its job belongs to for a keyed stage (a study's variants may
    differ in device or nproc), from the config for a data stage."""
    names = pgolf.pipeline.cluster.resources(stage, config, SITE)
    if stage not in pgolf.pipeline.plan.OUTPUTS:
        return names
    return {n: (lambda wildcards, n=n: pgolf.pipeline.cluster.resources(stage, job_cfg(stage, wildcards), SITE)[n])
            for n in names}


def job_cfg(stage, wildcards):
    return PLAN.job(stage, wildcards.key).cfg


def nproc(stage):
    return lambda wildcards: job_cfg(stage, wildcards)["train"]["nproc"]


def gpus(stage):
    """GPUs a stage holds on a CUDA run: train.nproc under torchrun, one on the device otherwise. With
    a gpu limit (the GPU profiles) a calibration never runs beside a training."""
    row = pgolf.pipeline.stages.stage(stage)

    def count(wildcards):
        cfg = job_cfg(stage, wildcards)
        if cfg["device"] != "cuda" or not row.device:
            return 0
        return cfg["train"]["nproc"] if row.torchrun else 1

    return count


def keyed_inputs(stage):
    """A keyed stage's inputs, by its job's key: unpack() them in the rule."""
    return lambda wildcards: PLAN.job(stage, wildcards.key).inputs


def keyed_outputs(stage):
    return {n: f"{STORE}/{stage}/{{key}}/{f}" for n, f in pgolf.pipeline.plan.OUTPUTS[stage].items()}


def keyed_params(stage):
    """A keyed stage's command values, by its job's key (the names pgolf/pipeline/plan.py gives them)."""
    return {n: (lambda wildcards, n=n: PLAN.job(stage, wildcards.key).params[n])
            for n in pgolf.pipeline.plan.PARAMS[stage]}


def keyed_file(stage, name):
    """A file in a keyed stage's folder that is not an output (its log, benchmark, checkpoints)."""
    return f"{STORE}/{stage}/{{key}}/{name}"


def run_of(wildcards):
    return PLAN.runs[f"results/{wildcards.run}"]


def data_cfg(path):
    """The config that builds a data path (every run that shares the path agrees on its keys)."""
    return PLAN.data[path][2]


def threads_of(stage):
    return pgolf.pipeline.cluster.threads(stage, SITE, workflow.cores)


def group_of(stage):
    return pgolf.pipeline.cluster.group(stage, SITE)



# torchrun picks a free rendezvous port with --standalone, so several trainings can share a host.
# `pgolf launch` is torchrun with the same arguments, whose log ends with a stage's one-line error
# instead of torchrun's own traceback (pgolf/runtime/launch.py).
TORCHRUN = "pgolf launch --standalone --nproc-per-node {resources.nproc:q} -m pgolf"


def section(name, without=(), cfg=None):
    """A config section, whole, as canonical JSON: a plain string param Snakemake tracks, so any key
    of it that changes reruns the stage. `without` keeps out keys the stage does not read, where
    passing them would rerun it for nothing; the rule says why beside each."""
    return pgolf.pipeline.plan.section(config if cfg is None else cfg, name, without)


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
    table = Path(f"{STUDY}/comparison.md" if STUDY else f"{RUN}/summary.md")
    if table.exists():
        print("\n" + table.read_text())
