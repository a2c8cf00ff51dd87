import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import link_fixtures

from pgolf.config import ConfigError, grad_accum_steps, load, load_schema, read_file, typed_overrides, validate

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_come_from_the_schema():
    cfg = validate({})
    schema = load_schema()["properties"]
    assert cfg["model"]["num_layers"] == schema["model"]["properties"]["num_layers"]["default"]
    assert cfg["tokenizer"]["vocab_size"] == 1024
    assert set(cfg) == set(schema)


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match=r"train: Additional properties .*'iterationz'"):
        validate({"train": {"iterationz": 5}})


def test_bad_value_is_named():
    with pytest.raises(ConfigError, match=r"model\.num_layers"):
        validate({"model": {"num_layers": 0}})
    with pytest.raises(ConfigError, match=r"quant\.method"):
        validate({"quant": {"method": "magic"}})


def test_inconsistent_sizes_are_refused():
    with pytest.raises(ConfigError, match="num_kv_heads"):
        validate({"model": {"num_heads": 6, "num_kv_heads": 4, "model_dim": 96}})
    with pytest.raises(ConfigError, match="batch_tokens"):
        validate({"train": {"seq_len": 100, "batch_tokens": 150}})
    with pytest.raises(ConfigError, match="data.paths"):
        validate({"data": {"source": "local"}})


def test_grad_accum_keeps_the_global_batch():
    train = validate({"train": {"seq_len": 16, "batch_tokens": 16 * 8, "micro_batch_seqs": 2}})["train"]
    assert [grad_accum_steps(train, w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ConfigError):
        grad_accum_steps(train, 3)


def test_files_merge_left_to_right(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(yaml.safe_dump({"run": "a", "model": {"num_layers": 3, "model_dim": 64}}))
    b.write_text(yaml.safe_dump({"model": {"num_layers": 5}}))
    cfg = load(a, b)
    assert (cfg["run"], cfg["model"]["num_layers"], cfg["model"]["model_dim"]) == ("a", 5, 64)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load(bad)


def test_a_run_is_not_its_own_baseline():
    with pytest.raises(ConfigError, match="compare.baseline_run: 'x' is this run itself"):
        validate({"run": "x", "compare": {"baseline_run": "x"}})


def test_a_repeated_key_is_refused_not_dropped(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("eval: {seq_len: 2048}\nquant: {method: rtn}\neval:\n  ttt: {enabled: true}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML .*duplicate key 'eval' \(first at line 1\)"):
        load(twice)


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_validate(preset):
    load(ROOT / "config.yaml", ROOT / "configs" / preset)


def test_codec_level_defaults_to_the_strongest_and_is_checked_per_codec():
    assert validate({})["compress"]["level"] == 11  # brotli's strongest quality
    assert validate({"compress": {"codec": "lzma"}})["compress"]["level"] == 9
    assert validate({"compress": {"codec": "zstd", "level": 19}})["compress"]["level"] == 19
    with pytest.raises(ConfigError, match=r"compress\.level: 12 is outside 0\.\.11 for codec brotli"):
        validate({"compress": {"codec": "brotli", "level": 12}})


def test_quant_groups_merge_with_their_defaults():
    q = validate({"quant": {"bits": {"mlp": 5}, "clip_k": {"embed": 14.0}}})["quant"]
    assert q["bits"] == {"embed": 8, "attn": 6, "mlp": 5, "other": 6}
    assert q["clip_k"]["embed"] == 14.0 and q["clip_k"]["attn"] == 12.85
    with pytest.raises(ConfigError, match=r"quant\.bits\.mlp"):
        validate({"quant": {"bits": {"mlp": 9}}})


@pytest.mark.parametrize("written, value", [("3e-4", 3e-4), ("1e6", 1e6), ("1E-3", 1e-3), ("+2.5e2", 250.0),
                                            ("1.0e-3", 1e-3), (".5e1", 5.0), ("0.04", 0.04)])
def test_yaml_1_2_numbers_are_numbers(tmp_path, written, value):
    """PyYAML's YAML 1.1 reads 3e-4 and 1e6 as strings ("not of type 'number'"); learning rates are written so."""
    preset = tmp_path / "lr.yaml"
    preset.write_text(f"train:\n  matrix_lr: {written}\n")
    assert load(ROOT / "config.yaml", preset)["train"]["matrix_lr"] == value


def test_pgolf_config_reads_yaml_1_2_numbers(tmp_path):
    preset = tmp_path / "lr.yaml"
    preset.write_text("train: {matrix_lr: 3e-4, scalar_lr: 1e6}\n")
    proc = subprocess.run([sys.executable, "-m", "pgolf", "config", ROOT / "config.yaml", preset],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    train = yaml.safe_load(proc.stdout)["train"]
    assert train["matrix_lr"] == 3e-4 and train["scalar_lr"] == 1e6


def test_strings_that_only_look_numeric_stay_strings(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("run: 1e6x\nrecord: {name: e5}\n")
    cfg = load(f)
    assert cfg["run"] == "1e6x" and cfg["record"]["name"] == "e5"


@pytest.mark.parametrize("key, value", [("run", ".."), ("run", "."), ("run", ".hidden"), ("data.name", ".."),
                                        ("data.name", "."), ("run", "a/b"), ("compare.baseline_run", ".."),
                                        ("compare.baseline_run", "x$(touch p)"), ("compare.baseline_run", "a b")])
def test_names_that_would_leave_their_folder_are_refused(key, value):
    section, _, sub = key.partition(".")
    cfg = {section: {sub: value}} if sub else {section: value}
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: {re.escape(repr(value))} does not match"):
        validate(cfg)


def test_ordinary_names_pass():
    cfg = validate({"run": "pr1517.seed-2_b", "data": {"name": "fineweb10B_sp1024"},
                    "compare": {"baseline_run": "a.b"}})
    assert cfg["run"] == "pr1517.seed-2_b"


PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def shell_cfg(dry_run: str, stage: str) -> dict:
    """The --cfg JSON a dry run's shell command passes to `pgolf <stage>`."""
    line = next(ln for ln in dry_run.splitlines() if f" {stage} " in ln and "--cfg" in ln and "probe" not in ln)
    words = shlex.split(line[line.index("pgolf"):].split(" > ")[0])
    return json.loads(words[words.index("--cfg") + 1])


@pytest.mark.parametrize("preset", PRESETS)
def test_snakemake_resolves_a_preset_as_pgolf_config_does(preset, tmp_path):
    """`snakemake --configfile configs/X.yaml` and `pgolf config configs/X.yaml` give one config: the
    preset on the schema's defaults (or on what it extends), never config.yaml by accident."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    baseline = tmp_path / "results" / "default" / "summary.json"  # order-ablation compares with the default run
    baseline.parent.mkdir(parents=True)
    baseline.write_text("{}")
    link_fixtures(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
                           "-n", "-p", "--cores", "1", "--configfile", str(ROOT / "configs" / preset)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ours = load(ROOT / "configs" / preset)
    for stage, section in (("train", "train"), ("evaluate", "eval"), ("quantize", "quant")):
        assert shell_cfg(proc.stdout, stage) == ours[section], (stage, preset)


# A record's preset, not a smoke variant: pr1855-smoke.yaml extends pr1855.yaml and shrinks its sizes.
@pytest.mark.parametrize("preset", [p for p in PRESETS if p.startswith("pr") and not p.endswith("-smoke.yaml")])
def test_a_record_preset_owes_every_non_default_value_to_itself(preset):
    """Each value that differs from the schema's default is written in the preset file: nothing is
    inherited from the CPU toy run (a preset that leans on another file says so with `extends`)."""
    written = flatten(read_file(ROOT / "configs" / preset))
    defaults, resolved = flatten(validate({})), flatten(load(ROOT / "configs" / preset))
    changed = {k for k in resolved if resolved[k] != defaults.get(k)}
    assert changed <= set(written), sorted(changed - set(written))
    assert "extends" not in written


def test_extends_builds_on_another_file_and_refuses_a_cycle(tmp_path):
    (tmp_path / "base.yaml").write_text("run: base\ntrain: {iterations: 7}\n")
    (tmp_path / "top.yaml").write_text("extends: base.yaml\ntrain: {seq_len: 64}\n")
    cfg = load(tmp_path / "top.yaml")
    assert cfg["run"] == "base" and cfg["train"]["iterations"] == 7 and cfg["train"]["seq_len"] == 64
    (tmp_path / "base.yaml").write_text("extends: top.yaml\n")
    with pytest.raises(ConfigError, match="leads back to itself"):
        load(tmp_path / "top.yaml")


def test_snakemake_config_overrides_keep_their_types(tmp_path):
    """--config reads lists and mappings with YAML's BaseLoader (all strings); pgolf types them back."""
    assert typed_overrides({"seeds": ["1337", "42"], "train": {"matrix_lr": "3e-4", "compile": "true"},
                            "run": "x1"}) == {"seeds": [1337, 42], "train": {"matrix_lr": 3e-4, "compile": True},
                                              "run": "x1"}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path),
                           "-n", "-p", "--cores", "1", "--configfile", str(ROOT / "config.yaml"),
                           "--config", "seeds=[1337]", "train={iterations: 5, matrix_lr: 3e-4}"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    train = shell_cfg(proc.stdout, "train")
    assert train["iterations"] == 5 and train["matrix_lr"] == 3e-4 and "--seed 1337" in proc.stdout
