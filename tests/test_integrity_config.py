"""Config values that would change type or meaning on their way to the stages, refused or read as
the user meant them, through every path a config takes: `pgolf config`, presets and their
`extends`, Snakemake's --configfile and --config; the SLURM site a profile gives, under the executor
that reads it; and `pgolf audit`, which audits the run's own evaluation on a checked dataset.

A refusal is a non-zero exit whose message names the key (or file) and the problem, no traceback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import place_artifact
from test_integrity_data import BAD_ID, assert_refused, copy_dataset, edit_manifest, set_token

from pgolf.config import ConfigError, load, read_file, typed_overrides, validate
from pgolf.errors import PgolfError
from pgolf.pipeline.cluster import SITE_KEYS, read_site

REPO = Path(__file__).resolve().parent.parent


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def pgolf(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgolf", *map(str, args)], capture_output=True, text=True,
                          env=env(), cwd=cwd)


def snakemake_dry_run(workdir: Path, *args: str | Path) -> subprocess.CompletedProcess:
    """`snakemake -n -p` of this repository's Snakefile in `workdir` (config.yaml unless --configfile)."""
    cmd = [sys.executable, "-m", "snakemake", "-s", REPO / "Snakefile", "-d", workdir, "-n", "-p", *args]
    return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env(), cwd=workdir)


def preset(tmp_path: Path, text: str, name: str = "preset.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def refused_config(proc: subprocess.CompletedProcess, *named: str) -> None:
    """`pgolf config` refused the config: exit 1, one line naming every `named` text, no traceback."""
    line = assert_refused(proc, "config")
    for part in named:
        assert part in line, line


def refused_by_snakemake(proc: subprocess.CompletedProcess, *named: str) -> None:
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    for part in named:
        assert part in text, text[-3000:]


# --- 1. an integer key holds an int, or is refused by name --------------------------------------

FLOAT_INTEGERS = [  # (YAML, the message's key and value)
    ("seeds: [1e0, 3e0]\n", "seeds[0]: 1.0 is a float; an integer key takes a whole number like 1"),
    ("eval: {max_tokens: 2e3}\n", "eval.max_tokens: 2000.0 is a float; an integer key takes a whole number like 2000"),
    ("train: {iterations: 100.0}\n", "train.iterations: 100.0 is a float"),
    ("model: {ve_layers: [1, 2.0]}\n", "model.ve_layers[1]: 2.0 is a float"),
    ("compress: {codec: zstd, level: 3.0}\n", "compress.level: 3.0 is a float"),  # type [integer, null]
    ("quant: {bits: {mlp: 6.0}}\n", "quant.bits.mlp: 6.0 is a float"),
]


@pytest.mark.parametrize("text, message", FLOAT_INTEGERS)
def test_a_float_under_an_integer_key_is_refused_by_pgolf_config(tmp_path, text, message):
    """jsonschema's "integer" takes 1.0: seeds [1e0, 3e0] planned seed1.0/, and eval.max_tokens 2e3 passed
    the check and died in evaluate with a TypeError traceback."""
    refused_config(pgolf("config", REPO / "config.yaml", preset(tmp_path, text)), message)


def test_a_float_in_a_layer_a_preset_extends_is_refused(tmp_path):
    preset(tmp_path, "train: {iterations: 5e1}\n", "base.yaml")
    top = preset(tmp_path, "extends: base.yaml\nrun: top\n", "top.yaml")
    refused_config(pgolf("config", top), "train.iterations: 50.0 is a float")


def test_a_float_from_snakemake_config_overrides_is_refused(tmp_path):
    """--config reads a list with YAML's BaseLoader (['1e0']); pgolf types it back to 1.0, then refuses it."""
    with pytest.raises(ConfigError, match=r"seeds\[0\]: 1\.0 is a float"):
        validate(typed_overrides({"seeds": ["1e0"]}))
    shutil.copy(REPO / "config.yaml", tmp_path)
    proc = snakemake_dry_run(tmp_path, "--cores", "1", "--config", "seeds=[1e0, 2]", "eval={max_tokens: 2e3}")
    refused_by_snakemake(proc, "seeds[0]: 1.0 is a float", "eval.max_tokens: 2000.0 is a float")


def test_a_float_under_an_integer_key_stops_snakemake_before_any_job(tmp_path):
    """A fresh run died in MissingInputException on seed1.0/, naming no key; a finished run of seeds 1
    and 3 said nothing to do. The config is refused while the rules are read, whatever is on disk."""
    overlay = preset(tmp_path, "seeds: [1e0, 3e0]\n")
    proc = snakemake_dry_run(tmp_path, "--cores", "1", "--configfile", REPO / "config.yaml", overlay)
    refused_by_snakemake(proc, "seeds[0]: 1.0 is a float; an integer key takes a whole number like 1")
    assert "seed1.0" not in proc.stdout + proc.stderr


def test_numbers_and_whole_integers_still_pass(tmp_path):
    """A number key takes 6e2 as 600.0, and integer keys take their ints: the check refuses only floats."""
    cfg = load(REPO / "config.yaml", preset(tmp_path, "train: {max_wallclock_seconds: 6e2, iterations: 7}\n"
                                                   "seeds: [1, 3]\ncompress: {codec: zstd, level: 3}\n"))
    assert cfg["train"]["max_wallclock_seconds"] == 600.0 and cfg["train"]["iterations"] == 7
    assert cfg["seeds"] == [1, 3] and all(type(s) is int for s in cfg["seeds"])
    with pytest.raises(ConfigError, match="seeds.*is not of type 'integer'"):
        validate({"seeds": [True]})  # a bool is no integer either


# --- 2. YAML 1.2 scalars, in pgolf and in Snakemake alike ----------------------------------------

def test_yaml_1_1_integers_are_read_as_yaml_1_2_by_pgolf_config(tmp_path):
    """YAML 1.1 read 010 as octal 8 and 1:30 as 90 seconds (base 60); YAML 1.2 reads 10 and the text '1:30'."""
    proc = pgolf("config", REPO / "config.yaml", preset(tmp_path, "seeds: [010, 0x10, 0o10]\n"))
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["seeds"] == [10, 16, 8]
    refused_config(pgolf("config", REPO / "config.yaml", preset(tmp_path, "train: {max_wallclock_seconds: 1:30}\n")),
                   "train.max_wallclock_seconds: '1:30' is not of type 'number'")
    refused_config(pgolf("config", REPO / "config.yaml", preset(tmp_path, "train: {iterations: 1_000}\n")),
                   "train.iterations: '1_000' is not of type 'integer'")


def test_yaml_1_1_booleans_are_text_and_a_boolean_key_says_so(tmp_path):
    refused_config(pgolf("config", REPO / "config.yaml", preset(tmp_path, "eval: {ttt: {enabled: yes}}\n")),
                   "eval.ttt.enabled: 'yes' is a string, not a boolean: write true or false")
    # where text is wanted, 1.1's booleans and dates are the text they look like
    cfg = load(REPO / "config.yaml", preset(tmp_path, "run: '2024-05-01'\nrecord: {name: on}\n"))
    cfg2 = load(REPO / "config.yaml", preset(tmp_path, "run: 2024-05-01\nrecord: {name: on}\n"))
    assert cfg["run"] == cfg2["run"] == "2024-05-01" and cfg2["record"]["name"] == "on"


def test_snakemake_reads_yaml_1_2_integers_as_pgolf_does(tmp_path):
    """Snakemake's own loader reads 010 as 8; the Snakefile re-reads its config files with pgolf's reader."""
    proc = snakemake_dry_run(tmp_path, "--cores", "1", "--configfile", REPO / "config.yaml",
                             preset(tmp_path, "seeds: [010]\n"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "--seed 10 " in out and "seed8" not in out and "--seed 8 " not in out


@pytest.mark.parametrize("how", ["configfile", "config"])
def test_snakemake_refuses_sexagesimal_seconds_by_name(tmp_path, how):
    shutil.copy(REPO / "config.yaml", tmp_path)
    args = (["--configfile", REPO / "config.yaml", preset(tmp_path, "train: {max_wallclock_seconds: 1:30}\n")]
            if how == "configfile" else ["--config", "train={max_wallclock_seconds: 1:30}"])
    proc = snakemake_dry_run(tmp_path, "--cores", "1", *args)
    refused_by_snakemake(proc, "train.max_wallclock_seconds: '1:30' is not of type 'number'")


SHIPPED = sorted([REPO / "config.yaml", *(REPO / "configs").glob("*.yaml"), *(REPO / "profiles").glob("*/*.yaml")])


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_files_read_the_same_under_yaml_1_1_and_1_2(path):
    """No shipped config, preset or profile holds a value whose meaning depends on the YAML version
    (Snakemake reads profiles, and its own copy of each config file, with YAML 1.1)."""
    assert read_file(path) == (yaml.safe_load(path.read_text()) or {})


def test_pgolf_config_output_reads_back_as_the_same_config(tmp_path):
    """`pgolf config` prints the resolved config; saved and given back, to pgolf or to Snakemake's own
    YAML 1.1 loader, it is the same config: text that looks like a number or a boolean is quoted."""
    proc = pgolf("config", REPO / "config.yaml", preset(tmp_path, "run: '1e3'\nrecord: {name: 'yes'}\n"))
    assert proc.returncode == 0, proc.stderr
    saved = preset(tmp_path, proc.stdout, "resolved.yaml")
    expected = load(REPO / "config.yaml", tmp_path / "preset.yaml")
    assert expected["run"] == "1e3" and expected["record"]["name"] == "yes"
    assert load(saved) == expected
    assert yaml.safe_load(saved.read_text()) == read_file(saved)


# --- 3. the SLURM site, under the executor that reads it -----------------------------------------

SITE = {"slurm_partition": "cpu", "slurm_account": "none", "gpu_partition": "gpu", "gpus_per_node": 4,
        "cpus_per_task": 6, "mem_mb": 16000, "mem_mb_per_gpu": 30000, "runtime": 60}


def site_args(**over) -> list[str]:
    values = {k: v for k, v in {**SITE, **over}.items() if v is not None}
    return ["tmpdir=system_tmpdir", *(f"{k}={v}" for k, v in values.items())]


def site_profile(tmp_path: Path, **over) -> Path:
    """A profile holding only a site's default-resources (a key set to None is left out)."""
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    values = {k: v for k, v in {**SITE, **over}.items() if v is not None}
    (folder / "profile.yaml").write_text(yaml.safe_dump({"default-resources": values}))
    return folder


def test_under_slurm_a_misspelt_site_key_is_refused_by_name():
    """`slurm_partiton` left slurm_partition out, and the run was taken for a local one under executor slurm."""
    with pytest.raises(PgolfError, match="site.yaml: default-resources slurm_partiton is no site key "
                                         r"\(did you mean slurm_partition\?\)"):
        read_site(site_args(slurm_partition=None, slurm_partiton="cpu"), "site.yaml", "slurm")


def test_under_slurm_every_site_key_is_required():
    with pytest.raises(PgolfError, match=f"lacks {', '.join(SITE_KEYS)}"):
        read_site(["tmpdir=system_tmpdir"], "site.yaml", "slurm")
    with pytest.raises(PgolfError, match="lacks slurm_partition "):
        read_site(site_args(slurm_partition=None), "site.yaml", "slurm")
    assert read_site(site_args(), "site.yaml", "slurm").partition == "cpu"
    assert read_site(site_args(), "site.yaml", "slurm-jobstep").partition == "cpu"  # inside a SLURM job


def test_a_site_without_slurm_is_refused_and_a_plain_local_run_is_local():
    with pytest.raises(PgolfError, match="sets slurm_partition, .*a SLURM site, but the executor is local"):
        read_site(site_args(), "site.yaml", "local")
    assert read_site(["tmpdir=system_tmpdir", "mem_mb=1000", "runtime=30"], "site.yaml", "local") is None
    # executor unknown (a job's own Snakemake, the Python API): a SLURM-only key makes it a SLURM site
    assert read_site(["tmpdir=system_tmpdir"], "site.yaml", None) is None
    with pytest.raises(PgolfError, match="slurm_partiton is no site key"):
        read_site(site_args(slurm_partition=None, slurm_partiton="cpu"), "site.yaml", None)


def test_snakemake_under_slurm_refuses_a_misspelt_partition(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    profile = site_profile(tmp_path, slurm_partition=None, slurm_partiton="cpu")
    proc = snakemake_dry_run(tmp_path, "--profile", REPO / "profiles" / "slurm", "--profile", profile,
                             "--configfile", REPO / "config.yaml")
    refused_by_snakemake(proc, "default-resources slurm_partiton is no site key (did you mean slurm_partition?)",
                         str(profile))


def test_snakemake_under_slurm_refuses_a_run_without_a_site(tmp_path):
    """`--executor slurm` with no site at all planned every job with no partition, group or cores."""
    pytest.importorskip("snakemake_executor_plugin_slurm")
    proc = snakemake_dry_run(tmp_path, "--executor", "slurm", "--jobs", "1", "--configfile", REPO / "config.yaml")
    refused_by_snakemake(proc, "default-resources lacks slurm_partition")


def test_snakemake_under_slurm_with_the_whole_site_plans_its_jobs(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    proc = snakemake_dry_run(tmp_path, "--profile", REPO / "profiles" / "slurm", "--profile", site_profile(tmp_path),
                             "--configfile", REPO / "config.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "slurm_partition=cpu" in out and "cpus_per_task=6" in out and "Group job seed" in out


def test_snakemake_without_slurm_refuses_a_site(tmp_path):
    """A site profile given without profiles/slurm would run every job, training too, on this host."""
    profile = site_profile(tmp_path)
    proc = snakemake_dry_run(tmp_path, "--profile", profile, "--configfile", REPO / "config.yaml")
    refused_by_snakemake(proc, "a SLURM site, but the executor is local", "--profile profiles/slurm", str(profile))


# --- 4. pgolf audit: the run's own eval config, and a checked dataset ----------------------------

# Small enough for seconds on the tiny val split (11 documents of about 1,500 tokens): one phase
# wants three documents, and chunks as long as a window keep the windows few.
PHASED = {"enabled": True, "mode": "phased_lora", "lora_rank": 4, "lora_alpha": 8, "lora_lr": 0.03,
          "lora_chunk_tokens": 64, "lora_docs": 2, "phases": 1, "phase_docs": 2, "lr": 0.05, "epochs": 1,
          "chunk_tokens": 64, "batch_seqs": 2}


def finished_run(root: Path, artifact: Path, ttt: dict | None) -> Path:
    """A run folder as the pipeline leaves it: seed0's artifact and, unless `ttt` is None, the
    resolved config its record stage writes (JSON, as pgolf record writes it)."""
    run = root / "results" / "r"
    place_artifact(run, 0, artifact)
    if ttt is not None:
        cfg = validate({"run": "r", "eval": {"seq_len": 64, "stride": 32, "batch_seqs": 8, "ttt": ttt}})
        (run / "record").mkdir()
        (run / "record" / "config.yaml").write_text(json.dumps(cfg, indent=2))
    return run


def audit_args(run: Path, data: Path, tokenizer: Path, *extra: str | Path) -> list:
    return ["audit", "--run", run, "--seed", 0, "--data", data, "--tokenizer", tokenizer, *extra]


def test_audit_without_the_runs_config_refuses_to_guess(setup, tmp_path):
    """It audited config.yaml's chunk TTT for a phased run and printed "passed"."""
    run = finished_run(tmp_path, setup.artifact, None)
    proc = pgolf(*audit_args(run, setup.data, setup.tokenizer))  # from the repository, where config.yaml is
    assert_refused(proc, "audit", str(run / "record" / "config.yaml"), "--config")


def test_audit_refuses_config_files_other_than_the_runs(setup, tmp_path):
    """The run's phased TTT, audited with chunk TTT from config files that leave eval.ttt.mode out."""
    run = finished_run(tmp_path, setup.artifact, PHASED)
    chunk = {k: v for k, v in PHASED.items() if k != "mode"}
    given = preset(tmp_path, json.dumps({"eval": {"seq_len": 64, "stride": 32, "batch_seqs": 8, "ttt": chunk}}))
    proc = pgolf(*audit_args(run, setup.data, setup.tokenizer, "--config", given))
    assert_refused(proc, "audit", f"--config {given}: eval.ttt.mode is 'chunk'", "'phased_lora'",
                   str(run / "record" / "config.yaml"))


def test_audit_reads_the_runs_own_phased_config(setup, tmp_path):
    run = finished_run(tmp_path, setup.artifact, PHASED)
    proc = pgolf(*audit_args(run, setup.data, setup.tokenizer))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "audit: phased TTT over" in proc.stdout and "pgolf audit: passed" in proc.stdout


def test_audit_of_no_target_is_no_pass(setup, tmp_path):
    """Chunk TTT of 32,768 targets on a val split of 16,107: the audit found no target to check and
    printed "passed"."""
    run = finished_run(tmp_path, setup.artifact, {"enabled": True, "mode": "chunk", "chunk_tokens": 32768})
    proc = pgolf(*audit_args(run, setup.data, setup.tokenizer))
    assert_refused(proc, "audit", "too few to audit", "eval.ttt.chunk_tokens=32,768")


@pytest.fixture(scope="module")
def broken_datasets(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("audit_data")
    wrong_vocab = copy_dataset(tiny_dataset.dataset_dir, root / "wrong_vocab")
    edit_manifest(wrong_vocab, vocab_size=400)
    bad_ids = copy_dataset(tiny_dataset.dataset_dir, root / "bad_ids")
    set_token(bad_ids / "fineweb_val_000000.bin", 5, BAD_ID)
    return wrong_vocab, bad_ids


def test_audit_checks_the_dataset_as_evaluate_does(setup, broken_datasets, tmp_path):
    """Token ids beyond the artifact's vocabulary died in the embedding with a traceback."""
    wrong_vocab, bad_ids = broken_datasets
    run = finished_run(tmp_path, setup.artifact, PHASED)
    assert_refused(pgolf(*audit_args(run, bad_ids, setup.tokenizer)), "audit", "fineweb_val_000000.bin",
                   f"token id {BAD_ID}", "320")
    assert_refused(pgolf(*audit_args(run, wrong_vocab, setup.tokenizer)), "audit",
                   str(wrong_vocab / "manifest.json"), "400", "320")
    other = tmp_path / "other.model"
    other.write_bytes(setup.tokenizer.read_bytes() + b"\0")
    assert_refused(pgolf(*audit_args(run, setup.data, other)), "audit", str(other), "not the tokenizer")
