"""Every config key reaches a stage that reads it, proved from Snakemake's own plan: for each leaf key
of the schema, a changed valid value changes the shell command of a job whose stage reads that key
(pgolf/pipeline/stages.py, `reads`), or the key applies only under a condition (CONDITIONS) and
does so under it. And every rule is a row of the stage table, named as the table names it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pgolf.config import deep_merge, load_schema, read_layers, validate
from pgolf.errors import ConfigError
from pgolf.pipeline import stages

snakemake_api = pytest.importorskip("snakemake.api")
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BASE = {"extends": str(REPO / "config.yaml"), "seeds": [1]}  # the default run, one seed: a small plan

# Keys that apply only under a condition: the overlay that makes it hold, and why. Each key is
# tested under its condition, so a key that never arrives fails here too.
ORDERED = {"loader": {"mode": "ordered", "order": "hardest"}}
FINEWEB = {"data": {"source": "fineweb"}}
CONDITIONS: dict[str, tuple[dict, str]] = {
    **{f"data.hub.{k}": (FINEWEB, "the Hub's keys: only source fineweb fetches")
       for k in ("repo_id", "variant", "train_shards", "revision", "remote_root", "endpoint")},
    "data.paths": ({"data": {"source": "local", "paths": ["corpus"]}}, "only source local reads files"),
    **{f"order.{k}": (ORDERED, "the shard order: only loader mode ordered trains on it")
       for k in ("probe_checkpoint", "probe_iterations", "sample_tokens", "seq_len")},
    "loader.shard_order": ({"loader": {"mode": "ordered", "order": "given", "shard_order": [0]}},
                           "the shards' order by hand: only with order given"),
    "compress.code_reserve": ({"compress": {"prune": True}},
                              "the code's allowance: only pruning aims below the budget"),
    "compress.zpaq": ({"compress": {"codec": "pergroup"}}, "ZPAQ for each stream: only codec pergroup has streams"),
    "study.level": ({"study": {"variants": {"v": {"eval": {"stride": 32}}}}},
                    "the study's level: only a study compares"),
    "compare.baseline_mean": ({"compare": {"baseline_mean": 1.5, "baseline_std": 0.01}},
                              "a baseline by its figures: mean and std go together"),
    "compare.baseline_std": ({"compare": {"baseline_mean": 1.5, "baseline_std": 0.01}},
                             "a baseline by its figures: mean and std go together"),
}

# Keys with one valid value: the other values break the score-first rule and are refused (a test
# below proves each is), so there is nothing to pass on.
REFUSED = {"eval.ttt.prequant", "eval.ttt.passes", "eval.ttt.rescore"}

# Values for keys whose changed value the schema alone does not give (consistency rules between keys).
VALUES: dict[str, object] = {
    "model.model_dim": 256,
    "model.num_heads": 8,
    "model.num_kv_heads": 4,
    "model.rope_dims": 16,
    "model.recur_layers": [1, 2],
    "model.ve_layers": [0],
    "model.logical_layers": 6,
    "train.batch_tokens": 8192,
    "train.seq_len": 256,
    "train.qat_below": 0.1,
    "data.hub.variant": "sp4096",
    "tokenizer.vocab_size": 2048,
    "compare.baseline_run": "other",
    "order.probe_checkpoint": "probe.pgt",
    "calibrate.source": "generate",
    "study.variants": {"v": {"eval": {"stride": 32}}},
    "quant.clip": {"embed": "search", "attn": "sdclip", "mlp": "sdclip", "other": "sdclip"},
}
# Keys that must change together with the one under test to stay valid.
COMPANIONS: dict[str, dict] = {
    "data.hub.variant": {"tokenizer": {"vocab_size": 4096}},
    "tokenizer.vocab_size": {},
    "model.qat_bits": {},
    "train.qat_below": {"model": {"qat_bits": 6}},
    "model.logical_layers": {"model": {"recur_layers": []}},
    "eval.ttt.train_softcap": {"model": {"asym_softcap": True}},
}


def leaves(schema: dict, prefix: str = "") -> list[tuple[str, dict]]:
    out = []
    for key, sub in schema.get("properties", {}).items():
        if sub.get("type") == "object" and "properties" in sub:
            out += leaves(sub, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", sub))
    return out


def nested(key: str, value: object) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def get(cfg: dict, key: str) -> object:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def candidates(sub: dict, value: object) -> list[object]:
    """Changed values of a key's schema type, most plausible first."""
    if "enum" in sub:
        return [e for e in sub["enum"] if e != value]
    types = sub.get("type")
    types = types if isinstance(types, list) else [types]
    out: list[object] = []
    if isinstance(value, bool) or "boolean" in types:
        out.append(not value)
    if "integer" in types:
        v = value if isinstance(value, int) else 0
        out += [v + 1, v - 1, v * 2, v + 2, 5]
    if "number" in types:
        v = value if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
        out += [v * 2 if v else 0.5, v / 2, v + 0.1, round(v - 0.1, 6), 0.5]
    if "string" in types:
        out += [f"{value}x" if value else "x", "x"]
    if "array" in types:
        item = sub.get("items", {}).get("type")
        v = list(value or [])
        if item == "integer":
            out += [[*v, max(v, default=-1) + 1], [0], [1]]
        elif item == "string":
            out += [[*v, "x"], ["x"]]
        elif item == "number":
            out += [[0.5], v[:-1]]
    return out


def changed_config(condition: dict, key: str, sub: dict) -> dict | None:
    """A valid overlay on the base config under `condition` that changes `key`'s resolved value, or
    None when no value tried is valid."""
    base = deep_merge(read_layers(BASE["extends"]), deep_merge({"seeds": BASE["seeds"]}, condition))
    before = validate(base)
    tries = [VALUES[key]] if key in VALUES else candidates(sub, get(before, key))
    for value in tries:
        overlay = deep_merge(COMPANIONS.get(key, {}), nested(key, value))
        try:
            after = validate(deep_merge(base, overlay))
        except ConfigError:
            continue
        if get(after, key) != get(before, key):
            return overlay
    return None


def plan(overlay: dict, workdir: Path) -> dict[str, tuple[str, str]]:
    """Snakemake's plan for config.yaml plus overlay, everything forced: job -> (rule, shell command)."""
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(deep_merge(BASE, overlay)))
    with snakemake_api.SnakemakeApi(OutputSettings()) as api:
        wf = api.workflow(resource_settings=ResourceSettings(cores=1),
                          config_settings=ConfigSettings(configfiles=[path]),
                          snakefile=REPO / "Snakefile", workdir=workdir)
        dag_api = wf.dag(DAGSettings(forceall=True))
        workflow = wf._workflow  # the plan itself: the API prints a dry run but returns no jobs
        workflow.dag_settings = dag_api.dag_settings
        workflow._prepare_dag(forceall=True, ignore_incomplete=True, lock_warn_only=True)
        workflow._build_dag()
        return {f"{j.rule.name}{dict(j.wildcards)}": (j.rule.name, j.shellcmd or "") for j in workflow.dag.jobs}


def reads(stage: stages.Stage, key: str) -> bool:
    return any(key == r or key.startswith(f"{r}.") for r in stage.reads)


def changed_stages(before: dict, after: dict) -> set[str]:
    jobs = before.keys() | after.keys()
    return {(before.get(j) or after.get(j))[0] for j in jobs if before.get(j) != after.get(j)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("flow")
    # compare.baseline_run needs the baseline's finished summary before the plan is built
    (work / "results" / "other").mkdir(parents=True)
    (work / "results" / "other" / "summary.json").write_text("{}")
    (work / "probe.pgt").write_bytes(b"")  # order.probe_checkpoint: an input, so it must exist
    # data.paths (["corpus"], then ["corpus", "x"]): the files in them are the documents rule's inputs
    for folder in ("corpus", "x"):
        (work / folder).mkdir()
        (work / folder / "doc.txt").write_text("a document")
    return work


def test_every_key_changes_the_command_of_a_stage_that_reads_it(workdir):
    base_plans: dict[str, dict] = {}
    lost = []
    for key, sub in leaves(load_schema()):
        if key in REFUSED:
            continue
        condition = CONDITIONS.get(key, ({}, ""))[0]
        cond_id = repr(condition)
        if cond_id not in base_plans:
            base_plans[cond_id] = plan(condition, workdir)
        change = changed_config(condition, key, sub)
        if change is None:
            lost.append(f"{key}: no changed value tried is valid; give one in VALUES")
            continue
        overlay = deep_merge(condition, change)
        moved = changed_stages(base_plans[cond_id], plan(overlay, workdir))
        if not any(reads(stages.stage(s), key) for s in moved if s not in stages.TARGET_RULES):
            lost.append(f"{key} (changed {overlay}): commands changed only in {sorted(moved) or 'no stage'}")
    assert not lost, "keys that reach no stage that reads them:\n" + "\n".join(lost)


def test_conditions_name_schema_keys():
    keys = {k for k, _ in leaves(load_schema())}
    assert set(CONDITIONS) <= keys and set(VALUES) <= keys and set(COMPANIONS) <= keys and REFUSED <= keys


def test_refused_keys_have_no_other_valid_value():
    schema = dict(leaves(load_schema()))
    for key in REFUSED:
        assert changed_config({}, key, schema[key]) is None, key


def rule_blocks() -> dict[str, str]:
    """Each rule's text, by name, from the Snakefile and rules/*.smk."""
    text = "\n".join(p.read_text() for p in [REPO / "Snakefile", *sorted((REPO / "rules").glob("*.smk"))])
    parts = re.split(r"^\s*rule (\w+):\n", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_every_rule_is_a_stage_and_names_itself():
    blocks = rule_blocks()
    assert set(blocks) == {s.name for s in stages.STAGES} | set(stages.TARGET_RULES)
    for name, block in blocks.items():
        if name in stages.TARGET_RULES:
            continue
        row = stages.stage(name)
        # every stage-table lookup in the rule names the rule itself
        lookups = r"\b(?:code|slurm|threads_of|group_of|is_local|gpus|nproc|keyed_\w+)\(\"(\w+)\""
        called = set(re.findall(lookups, block))
        assert called == {name}, f"rule {name} looks up {called}"
        # its code hash: in its params, or in its job's key and params (pgolf/pipeline/plan.py)
        hashed = f"code(\"{name}\")" in block or f"keyed_params(\"{name}\")" in block
        assert hashed and ("localrule: is_local" in block) == row.local, name
        assert ("slurm(" in block) == (not row.local), name
        runs = rf"(?:\"pgolf |TORCHRUN \+ \" ){re.escape(row.cli)} "  # TORCHRUN ends in `-m pgolf`
        assert re.search(runs, block), f"rule {name} runs no `pgolf {row.cli}`"
        assert ("TORCHRUN" in block) == row.torchrun, name
        assert ("threads_of(" in block) == row.threaded, name
        assert ("gpus(" in block) == row.device, name
        assert ("group_of(" in block) == (row.group is not None), name


def test_cli_commands_are_the_table():
    from pgolf import cli

    table = cli.table()
    assert {s.cli for s in stages.STAGES} <= set(table)
    assert table["shard-order"][0] == "pgolf.data.shard_order" and "order" not in table
    for s in stages.STAGES:
        assert table[s.cli][0] == stages.commands()[s.cli].entry


def test_stage_entries_have_a_cli():
    import importlib

    for s in stages.STAGES:
        assert callable(importlib.import_module(s.entry).cli), s.entry
