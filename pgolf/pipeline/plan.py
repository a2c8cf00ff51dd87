"""Every job of a pipeline run, each in a folder named by what it depends on.

A job's folder under results/stages/<stage>/<key>/ is named by a hash of the job's command: its
config sections, its seed, its code hash and the paths of what it reads, which name the jobs before
it the same way. Two runs (a single run and another under a new name, or a study's baseline and its
variants) that agree on everything a stage depends on therefore name the same folder, and Snakemake
runs that job once for both: a variant that changes only quantization trains nothing, one that
changes only evaluation reuses calibration, quantization and compression too.

The data stages keep their readable paths under data/ (a dataset is named by data.name, the
vocabulary and CaseOps); two runs that would build different data under one path are refused.
A run's own folder (results/<run>/, or results/<study>/<variant>/) holds what a person reads: the
summary, the record folder, the plots, and stages.json, where its stage folders are.

Kept free of torch: parsing the Snakefile builds the plan.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from pgolf.errors import ConfigError

STORE = "results/stages"
# The data keys the documents stage does not read: name is in its output's path; hub is
# fetch_fineweb's and shard_tokens the shards stage's, and passed to documents they would rebuild
# documents, the tokenizer and everything after for nothing.
DOCS_WITHOUT = ("name", "hub", "shard_tokens")
SEED_STAGES = ("train", "calibrate", "quantize", "compress", "size", "evaluate")
# Each keyed stage's output files, inside its folder.
OUTPUTS: dict[str, dict[str, str]] = {
    "probe_train": {"ema": "ema.pgt", "raw": "raw.pgt", "metrics": "metrics.parquet", "summary": "train.json"},
    "shard_order": {"order": "shard_order.json"},
    "train": {"ema": "ema.pgt", "raw": "raw.pgt", "metrics": "metrics.parquet", "summary": "train.json"},
    "calibrate": {"hessians": "hessians.pgt"},
    "quantize": {"quant": "quant.pgt"},
    "compress": {"artifact": "artifact.pgz"},
    "size": {"size": "size.json"},
    "evaluate": {"eval": "eval.json"},
}

# Each keyed stage's command values (besides its inputs), in the names its rule uses.
PARAMS: dict[str, tuple[str, ...]] = {
    "probe_train": ("model", "cfg", "loader", "device", "precision", "vocab", "code"),
    "shard_order": ("cfg", "vocab", "code"),
    "train": ("model", "cfg", "loader", "seed", "device", "precision", "vocab", "code"),
    "calibrate": ("cfg", "seed", "device", "precision", "data", "code"),
    "quantize": ("cfg", "hessians", "code"),
    "compress": ("cfg", "hessians", "code"),
    "size": ("cfg", "code_bytes", "code"),
    "evaluate": ("cfg", "device", "precision", "unpruned", "code"),
}


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True)


def section(cfg: dict, name: str, without: tuple[str, ...] = ()) -> str:
    """A config section, whole, as canonical JSON; `without` keeps out keys the stage does not read
    where passing them would rerun it for nothing (each caller says why)."""
    sec = cfg[name]
    missing = [k for k in without if k not in sec]
    if missing:
        raise ConfigError(f"section({name!r}): {missing} are no keys of it")
    return _json({k: v for k, v in sec.items() if k not in without})


def data_keys(cfg: dict) -> dict[str, str]:
    """What the tokenizer and dataset are built from (all but the name they are stored under)."""
    return {"data": section(cfg, "data", ("name",)), "tokenizer": section(cfg, "tokenizer")}


@dataclass
class Job:
    """One stage's job: what it reads (inputs), its command's values (params) and its folder."""

    stage: str
    key: str
    dir: str
    inputs: dict[str, str | list[str]]
    params: dict[str, object]
    cfg: dict = field(repr=False)  # the run's config: resources, GPUs and nproc come from it

    def out(self, name: str) -> str:
        return f"{self.dir}/{OUTPUTS[self.stage][name]}"

    @property
    def log(self) -> str:
        return f"{self.dir}/{self.stage}.log"


@dataclass
class Data:
    """A run's data paths: documents, tokenizer, dataset folder (names, not hashes)."""

    docs: str
    tokenizer: str
    dataset: str
    docs_name: str
    dataset_name: str

    @classmethod
    def of(cls, cfg: dict) -> Data:
        name, vocab = cfg["data"]["name"], cfg["tokenizer"]["vocab_size"]
        # a CaseOps tokenizer and its shards are other files than the plain ones: switching between
        # runs that differ in tokenizer.caseops rebuilds neither
        full = f"{name}_sp{vocab}{'_caseops' if cfg['tokenizer']['caseops'] else ''}"
        return cls(f"data/docs/{name}.parquet", f"data/tokenizers/{full}.model", f"data/datasets/{full}", name, full)


@dataclass
class Run:
    """One run: its folder, config, data and, per seed, the job of each seed stage."""

    name: str  # as the summary names it: the run, or <study>/<variant>
    folder: str
    cfg: dict
    data: Data
    seeds: dict[int, dict[str, Job]]

    def files(self, stage: str, name: str) -> list[str]:
        """One output per seed, in the order of the config's seeds."""
        return [self.seeds[s][stage].out(name) for s in self.cfg["seeds"]]

    def logs(self, stage: str) -> list[str]:
        return [self.seeds[s][stage].log for s in self.cfg["seeds"]]

    def stage_dirs(self) -> dict[str, dict[str, str]]:
        """seed -> stage -> folder, relative to the run's folder: where its stage files are (stages.json)."""
        return {str(s): {st: os.path.relpath(job.dir, self.folder) for st, job in jobs.items()}
                for s, jobs in self.seeds.items()}


class Plan:
    """The jobs of every run, shared where their folders agree."""

    def __init__(self, runs: dict[str, tuple[str, dict]], code: Callable[[str], str], code_bytes: int):
        # one code hash per stage for the whole plan: a study asks for each once per job (216 for the
        # pr1855-parts study), and each call rereads the stage's modules
        self.code, self.code_bytes = functools.cache(code), code_bytes
        self.jobs: dict[str, dict[str, Job]] = {}
        self.data: dict[str, tuple[str, dict, dict]] = {}  # data path -> (run, its keys, the run's config)
        self.runs = {folder: self._run(name, folder, cfg) for folder, (name, cfg) in runs.items()}

    def job(self, stage: str, key: str) -> Job:
        """The job of a keyed stage by the key in its folder's name."""
        return self.jobs[stage][key]

    def _add(self, stage: str, cfg: dict, inputs: dict, params: dict) -> Job:
        params = {**params, "code": self.code(stage)}
        if sorted(params) != sorted(PARAMS[stage]):  # a rule would pass params its key never saw (not an assert: -O)
            raise RuntimeError(f"plan: {stage} is keyed by {sorted(params)}, its rule passes {sorted(PARAMS[stage])}")
        # The dataset is named by data.name, not by what built it: the data keys join every key, so a
        # run that rebuilt data/<name> with other settings gets jobs of its own, not another run's.
        key = hashlib.sha256(_json([stage, inputs, params, data_keys(cfg)]).encode()).hexdigest()[:16]
        job = self.jobs.setdefault(stage, {}).setdefault(key, Job(stage, key, f"{STORE}/{stage}/{key}", inputs,
                                                                   params, cfg))
        return job

    def _claim(self, path: str, what: dict, run: str, cfg: dict) -> None:
        """Two runs may share a data path only if they build it from the same keys."""
        seen = self.data.setdefault(path, (run, what, cfg))
        if seen[1] != what:
            diff = sorted(k for k in {**seen[1], **what} if seen[1].get(k) != what.get(k))
            raise ConfigError(f"runs {seen[0]!r} and {run!r} build {path} from different {', '.join(diff)}: "
                              "give one of them a data.name of its own")

    def _run(self, name: str, folder: str, cfg: dict) -> Run:
        data = Data.of(cfg)
        docs = {"data": section(cfg, "data", DOCS_WITHOUT)}
        self._claim(data.docs, docs, name, cfg)
        full = data_keys(cfg)
        self._claim(data.tokenizer, full, name, cfg)
        self._claim(data.dataset, full, name, cfg)
        order = self._order(cfg, data)
        seeds = {s: self._seed(cfg, data, order, s) for s in cfg["seeds"]}
        return Run(name, folder, cfg, data, seeds)

    def _device(self, cfg: dict) -> dict:
        return {"device": cfg["device"], "precision": cfg["precision"], "vocab": cfg["tokenizer"]["vocab_size"]}

    def _order(self, cfg: dict, data: Data) -> dict[str, Job]:
        """The shard order's jobs (and its probe's) when training reads the shards hardest or easiest
        first, else none."""
        loader, order, jobs = cfg["loader"], cfg["order"], {}
        if loader["mode"] != "ordered" or loader["order"] == "given":
            return jobs
        probe = order["probe_checkpoint"]
        if not probe:
            iters = order["probe_iterations"]
            train = {**cfg["train"], "iterations": iters, "warmdown_steps": min(cfg["train"]["warmdown_steps"], iters),
                     "max_wallclock_seconds": 0, "swa": False, "qat_below": 0}
            jobs["probe_train"] = self._add("probe_train", cfg, {"data": data.dataset}, {
                "model": section(cfg, "model"), "cfg": _json(train),
                # shuffled windows from every shard: a probe that read the shards in order would find
                # the ones it trained on easy
                "loader": _json({"mode": "shuffled"}), **self._device(cfg)})
            probe = jobs["probe_train"].out("ema")
        jobs["shard_order"] = self._add("shard_order", cfg, {"data": data.dataset, "probe": probe}, {
            # the probe's keys reach this stage through the probe's weights, its input
            "cfg": section(cfg, "order", ("probe_checkpoint", "probe_iterations")),
            "vocab": cfg["tokenizer"]["vocab_size"]})
        return jobs

    def _seed(self, cfg: dict, data: Data, order: dict[str, Job], seed: int) -> dict[str, Job]:
        dev = self._device(cfg)
        shard_order = [order["shard_order"].out("order")] if order else []
        train = self._add("train", cfg, {"data": data.dataset, "order": shard_order}, {
            "model": section(cfg, "model"), "cfg": section(cfg, "train"), "loader": section(cfg, "loader"),
            "seed": seed, **dev})
        ema, jobs = train.out("ema"), {**order, "train": train}  # the order's jobs are every seed's
        gptq, prune = cfg["quant"]["method"] == "gptq", cfg["compress"]["prune"]
        hessians: list[str] = []
        if gptq:
            from_train = cfg["calibrate"]["source"] == "train"
            jobs["calibrate"] = self._add("calibrate", cfg, {"ema": ema, "data": data.dataset if from_train else []}, {
                "cfg": section(cfg, "calibrate"), "seed": seed, "device": cfg["device"],
                "precision": cfg["precision"], "data": ["--data", data.dataset] if from_train else []})
            hessians = [jobs["calibrate"].out("hessians")]
        jobs["quantize"] = self._add("quantize", cfg, {"ema": ema, "hessians": hessians}, {
            "cfg": section(cfg, "quant"), "hessians": ["--hessians", *hessians] if hessians else []})
        quant = jobs["quantize"].out("quant")
        # With pruning on, compress aims at the budget minus a fixed code reserve (a code edit reruns
        # only the size check), and with GPTQ it weights each code's error by the Hessians; without
        # pruning it reads no budget (size checks it): a new budget reruns size alone.
        prune_h = hessians if prune else []
        jobs["compress"] = self._add("compress", cfg, {"quant": quant, "hessians": prune_h}, {
            "cfg": section(cfg, "compress", () if prune else ("budget_bytes", "code_reserve")),
            "hessians": ["--hessians", *prune_h] if prune_h else []})
        artifact = jobs["compress"].out("artifact")
        # its own job so that editing code reruns only this check, not compression and evaluation
        jobs["size"] = self._add("size", cfg, {"artifact": artifact}, {
            "cfg": section(cfg, "compress"), "code_bytes": self.code_bytes})
        jobs["evaluate"] = self._add("evaluate", cfg, {
            "data": data.dataset, "tokenizer": data.tokenizer, "ema": ema, "artifact": artifact,
            "quant": quant if prune else []}, {
            "cfg": section(cfg, "eval"), "device": cfg["device"], "precision": cfg["precision"],
            # with pruning on it also scores the quantized tensors before pruning: what pruning cost
            "unpruned": ["--unpruned", quant] if prune else []})
        return jobs


STAGES_FILE = "stages.json"


def stage_dir(run_dir: str | os.PathLike, seed: int, stage: str) -> str:
    """The folder of a finished run's seed stage, from the run folder's stages.json."""
    from pgolf.formats.results import read_result  # its checksum checked, as every result's

    path = os.path.join(run_dir, STAGES_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{path}: not found; is {run_dir} a finished run's folder (results/<run>)?")
    dirs = read_result(path)
    try:
        return os.path.normpath(os.path.join(run_dir, dirs[str(seed)][stage]))
    except (KeyError, TypeError):
        raise ConfigError(f"{path}: no {stage} folder for seed {seed}") from None
