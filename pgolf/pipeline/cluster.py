"""What each stage asks a SLURM cluster for, from the site's settings and the run's config.

The site (partitions, account, cores, memory, GPUs per node) is filled in once, in the
`default-resources` of a profile (profiles/slurm/profile.yaml, or a profile of your own layered
after it). Everything else follows from the config: a stage runs where its device is (the preset's
`device`, not the profile's), torchrun jobs stay on one node, and threads, memory and runtime come
from here, never from the cores of the host that submits (`threads: workflow.cores` there asked an
8-core login node's 8 CPUs of 2-core compute nodes: PENDING forever).

A plain local run has no site: every stage keeps its local resources (threads = all cores). Which
of the two a run is follows from Snakemake's executor (`executor: slurm` in profiles/slurm), not from
what default-resources happens to hold: under SLURM every site key is required and a key nobody
reads (`slurm_partiton`) is refused by name; under any other executor a SLURM site key is refused,
since the run would put its jobs on this host and drop the site without a word.
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
from dataclasses import dataclass

from pgolf.errors import PgolfError
from pgolf.pipeline.stages import stage as stage_row

# Site keys a user fills in; anything else under default-resources stays Snakemake's own.
SITE_KEYS = ("slurm_partition", "slurm_account", "gpu_partition", "gpus_per_node", "cpus_per_task", "mem_mb",
             "mem_mb_per_gpu", "runtime")
PLACEHOLDER = re.compile(r"^<.*>$|^your[-_]")

@dataclass(frozen=True)
class Site:
    partition: str
    account: str | None  # None: the cluster has no accounting (sbatch without -A)
    gpu_partition: str
    gpus_per_node: int
    cpus_per_task: int
    mem_mb: int
    mem_mb_per_gpu: int
    runtime: int  # minutes, for any stage without a figure of its own


def _parse(args: list[str]) -> dict[str, str]:
    """`key=value` strings, as Snakemake keeps --default-resources, into a dict of raw values."""
    pairs = (a.split("=", 1) for a in args if "=" in a)
    return {k.strip(): v.strip().strip("'\"") for k, v in pairs}


def _int(raw: dict[str, str], key: str, where: str) -> int:
    try:
        value = int(raw[key])
    except ValueError:
        raise PgolfError(f"{where}: default-resources {key}={raw[key]!r} is not a whole number") from None
    if value < 1:
        raise PgolfError(f"{where}: default-resources {key}={value} must be at least 1")
    return value


# Site keys that mean SLURM and nothing else (mem_mb, cpus_per_task and runtime are Snakemake's too).
SLURM_ONLY_KEYS = ("slurm_partition", "slurm_account", "gpu_partition", "gpus_per_node", "mem_mb_per_gpu")
# The executors of a SLURM run: the submitting host's, and the one Snakemake runs inside each job.
SLURM_EXECUTORS = ("slurm", "slurm-jobstep")
# default-resources keys that someone reads besides the site's: Snakemake's own (it adds tmpdir and
# turns mem/disk into *_mb), those snakemake-executor-plugin-slurm 2.x reads, and pgolf's rules' own.
OTHER_RESOURCE_KEYS = frozenset({
    "tmpdir", "runtime", "mem", "mem_mb", "mem_mib", "disk", "disk_mb", "disk_mib", "threads", "_cores", "_nodes",
    "slurm_extra", "slurm_cluster", "clusters", "cluster", "constraint", "qos", "nodes", "tasks", "tasks_per_node",
    "tasks_per_gpu", "cpus_per_gpu", "mem_mb_per_cpu", "gpu", "gres", "gpu_model", "mpi", "nproc"})


def snakemake_cli_args() -> argparse.Namespace | None:
    """The arguments of the `snakemake` command that is reading the rules (its profiles applied), or
    None where rules are read some other way (Snakemake's Python API).

    Snakemake 9 reads the Snakefile before it picks the executor: `workflow.executor_plugin` is None
    while the rules are read, and a dry run then swaps in its `dryrun` plugin. Its parsed command
    line, a local of snakemake.cli.args_to_api further up the stack, is the one place that names
    the executor while the rules are read."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "args_to_api" and frame.f_globals.get("__name__") == "snakemake.cli":
            args = frame.f_locals.get("args")
            return args if isinstance(args, argparse.Namespace) else None
        frame = frame.f_back
    return None


def _unknown(raw: dict[str, str], where: str) -> None:
    """Under SLURM a default-resources key that neither the site, Snakemake nor the plugin reads is a
    misspelling: `slurm_partiton` would leave the real key missing, or its own value unused."""
    for key in raw:
        if key not in SITE_KEYS and key not in OTHER_RESOURCE_KEYS:
            near = difflib.get_close_matches(key, [*SITE_KEYS, *sorted(OTHER_RESOURCE_KEYS)], n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise PgolfError(f"{where}: default-resources {key} is no site key{hint}; a SLURM site takes "
                             f"{', '.join(SITE_KEYS)} (profiles/README.md)")


def read_site(default_resources: list[str], where: str = "the SLURM profile",
              executor: str | None = None) -> Site | None:
    """The site from a profile's default-resources, or None for a run without SLURM.

    `executor` is Snakemake's (snakemake_cli_args): under SLURM every site key must be there, spelt
    right and filled in, so a missing, misspelt or placeholder key fails here, before any job is
    submitted; under another executor a SLURM site key is refused (the jobs would run on this host).
    Where the executor is not known (None: a job's own Snakemake, the Python API), a SLURM-only key
    makes it a SLURM run."""
    raw = _parse(default_resources)
    given = [k for k in SLURM_ONLY_KEYS if k in raw]
    if executor is not None and executor not in SLURM_EXECUTORS:
        if given:
            raise PgolfError(f"{where}: default-resources sets {', '.join(given)}, a SLURM site, but the executor "
                             f"is {executor}: its jobs would run on this host; add --profile profiles/slurm "
                             "(executor: slurm), or drop the site's keys for a local run")
        return None
    if executor is None and not given:
        return None
    _unknown(raw, where)
    missing = [k for k in SITE_KEYS if k not in raw]
    if missing:
        raise PgolfError(f"{where}: default-resources lacks {', '.join(missing)} (see profiles/README.md)")
    for key in SITE_KEYS:
        if PLACEHOLDER.search(raw[key]) or not raw[key]:
            raise PgolfError(f"{where}: default-resources {key}={raw[key]!r} is a placeholder; "
                             "set it to your cluster's value (profiles/README.md)")
    account = raw["slurm_account"]
    return Site(partition=raw["slurm_partition"], account=None if account.lower() == "none" else account,
                gpu_partition=raw["gpu_partition"], gpus_per_node=_int(raw, "gpus_per_node", where),
                cpus_per_task=_int(raw, "cpus_per_task", where), mem_mb=_int(raw, "mem_mb", where),
                mem_mb_per_gpu=_int(raw, "mem_mb_per_gpu", where), runtime=_int(raw, "runtime", where))


def threads(stage: str, site: Site | None, cores: int) -> int:
    """Threads of a stage: the site's cores per task on SLURM, this host's cores locally."""
    if not stage_row(stage).threaded:
        return 1
    return site.cpus_per_task if site is not None else cores


def _on_gpu(stage: str, config: dict) -> bool:
    """Whether a stage holds GPUs: the device stages of a CUDA run, and the others of the seed's
    job (quantization, compression), which share its node."""
    row = stage_row(stage)
    return config["device"] == "cuda" and (row.device or row.group == "seed")


def _train_minutes(config: dict, site: Site) -> int:
    """Training's time limit: twice its wall-clock budget plus compile and checkpoint slack, or the
    site's runtime when training runs by steps alone."""
    budget = config["train"]["max_wallclock_seconds"]
    return max(site.runtime, math.ceil(2 * budget / 60) + 20) if budget > 0 else site.runtime


def resources(stage: str, config: dict, site: Site | None) -> dict:
    """The SLURM resources of a stage (nothing for a local run, or a stage run locally)."""
    row = stage_row(stage)
    if site is None or row.local:
        return {}
    nproc = config["train"]["nproc"]
    gpu = _on_gpu(stage, config)
    gpus = (nproc if row.torchrun else 1) if gpu else 0
    if gpus > site.gpus_per_node:
        raise PgolfError(f"train.nproc={nproc}: {stage} would ask for {gpus} GPUs on one node, and the "
                         f"profile's gpus_per_node is {site.gpus_per_node}")
    res = {
        "slurm_partition": site.gpu_partition if gpu else site.partition,
        # a GPU job gets the site's cores per GPU: each torchrun process has its own loader and threads
        "cpus_per_task": site.cpus_per_task * max(gpus, 1) if gpu else threads(stage, site, site.cpus_per_task),
        "mem_mb": gpus * site.mem_mb_per_gpu if gpus else min(row.cpu_mem_mb or site.mem_mb, site.mem_mb),
        "runtime": _train_minutes(config, site) if row.cli == "train" else site.runtime,
    }
    # the GPUs themselves are the rules' own `gpu` resource (the local GPU profiles schedule on it too)
    if row.torchrun:
        res["nodes"] = 1  # torchrun --standalone uses only the batch host's GPUs
    # "" overrides the profile's "none": the plugin then submits without -A
    res["slurm_account"] = site.account or ""
    return res


def group(stage: str, site: Site | None) -> str | None:
    """The Snakemake group of a stage on SLURM (one job per group and seed), None otherwise."""
    return None if site is None else stage_row(stage).group
