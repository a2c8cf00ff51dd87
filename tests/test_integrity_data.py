"""The data contract end to end, as a user meets it: the dataset's manifest checked by every stage
that reads shards, token ids checked against the vocabulary, a vocabulary too small for the corpus,
run and dataset names that would escape their folders, and shell commands that quote every value.

Stages run as the rules run them (`python -m pgolf <stage> ...`); a refusal is exit status 1, one
line `pgolf <stage>: ...` naming the file or key, no traceback, and nothing at the output path."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from conftest import stage_dir

from pgolf.config import load
from pgolf.data import tokenizer
from pgolf.formats.results import write_result
from pgolf.formats.shards import ShardError, load_shard, open_dataset, read_header, write_shard

REPO = Path(__file__).resolve().parent.parent
SMOKE = load(REPO / "config.yaml", REPO / "configs" / "smoke.yaml")
# What a hostile or careless path may hold: a space, a command substitution, backticks.
HOSTILE = "a b $(touch MARK) `touch MARK`"
BAD_ID = 400  # beyond the tiny dataset's 320-token vocabulary


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def pgolf(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pgolf", *map(str, args)], capture_output=True, text=True,
                          env=env())


def assert_refused(proc: subprocess.CompletedProcess, stage: str, *named: str, outputs: tuple = ()) -> str:
    """Exit 1, one `pgolf <stage>:` line holding every `named` text, no traceback, no output left."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    lines = [line for line in text.splitlines() if line.startswith(f"pgolf {stage}: ")]
    assert len(lines) == 1, text[-3000:]
    for part in named:
        assert part in lines[0], lines[0]
    for out in outputs:
        assert not Path(out).exists(), out
    return lines[0]


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def set_token(shard: Path, pos: int, value: int) -> None:
    """One token changed, and the manifest's sha256 of the shard with it: a dataset built that way
    (its ids are what is checked here, not its checksums)."""
    tokens = np.array(load_shard(shard, mmap=False))
    tokens[pos] = value
    shard.unlink()  # the original may still be memory-mapped by this process
    sha = write_shard(shard, tokens)
    m = json.loads((shard.parent / "manifest.json").read_text())
    for entry in m["splits"].values():
        pairs = zip(entry["shards"], entry["sha256"], strict=True)
        entry["sha256"] = [sha if name == shard.name else h for name, h in pairs]
    (shard.parent / "manifest.json").write_text(json.dumps(m))


def edit_manifest(dataset: Path, **changes) -> None:
    m = json.loads((dataset / "manifest.json").read_text())
    (dataset / "manifest.json").write_text(json.dumps({**m, **changes}))


@pytest.fixture(scope="module")
def data(tiny_dataset, setup, tmp_path_factory) -> SimpleNamespace:
    """The tiny dataset, a copy whose manifest claims vocab 400, a copy with id 400 in its first train
    shard and its val shard, one with id 400 in its last train shard only, and a tokenizer trained at
    vocab 400 on the same documents."""
    root = tmp_path_factory.mktemp("integrity")
    wrong_vocab = copy_dataset(tiny_dataset.dataset_dir, root / "wrong_vocab")
    edit_manifest(wrong_vocab, vocab_size=400)
    bad_ids = copy_dataset(tiny_dataset.dataset_dir, root / "bad_ids")
    for shard in ("fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        set_token(bad_ids / shard, 5, BAD_ID)
    bad_last = copy_dataset(tiny_dataset.dataset_dir, root / "bad_last")
    last = sorted(bad_last.glob("fineweb_train_*.bin"))[-1]
    set_token(last, 5, BAD_ID)
    tok400 = root / "tok400.model"
    tokenizer.train(tiny_dataset.docs, {**SMOKE["tokenizer"], "vocab_size": 400}, tok400)
    return SimpleNamespace(good=tiny_dataset.dataset_dir, wrong_vocab=wrong_vocab, bad_ids=bad_ids,
                           bad_last=bad_last, last_train=last.name, tokenizer=tiny_dataset.tokenizer, tok400=tok400,
                           ema=setup.ema, artifact=setup.artifact, out=root / "out")


def stage_command(stage: str, d: SimpleNamespace, dataset: Path, out: Path, tokenizer_path: Path | None = None,
                  vocab: int = 320) -> list:
    """The arguments rules/*.smk give each stage that reads shards."""
    section = lambda name: json.dumps(SMOKE[name])  # noqa: E731
    if stage == "train":
        return ["train", "--data", dataset, "--vocab-size", vocab, "--model-cfg", section("model"),
                "--cfg", section("train"), "--seed", 1, "--device", "cpu", "--out-dir", out, "--ckpt-dir",
                out / "ckpt", "--loader-cfg", section("loader"), "--shard-order="]
    if stage == "calibrate":
        return ["calibrate", "--weights", d.ema, "--data", dataset, "--cfg", section("calibrate"), "--seed", 1,
                "--device", "cpu", "--out", out]
    if stage == "shard-order":
        cfg = json.dumps({"sample_tokens": 512, "seq_len": 16})
        return ["shard-order", "--data", dataset, "--probe", d.ema, "--cfg", cfg, "--vocab-size", vocab, "--out", out]
    return ["evaluate", "--data", dataset, "--tokenizer", tokenizer_path or d.tokenizer, "--ema", d.ema,
            "--artifact", d.artifact, "--cfg", section("eval"), "--device", "cpu", "--out", out]


def final_outputs(stage: str, out: Path) -> tuple:
    return (out / "ema.pgt", out / "train.json") if stage == "train" else (out,)


STAGES = ["train", "calibrate", "shard-order", "evaluate"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_vocabulary_other_than_the_manifests_is_refused(stage, data, tmp_path):
    out = tmp_path / ("seed1" if stage == "train" else "out.json")
    proc = pgolf(*stage_command(stage, data, data.wrong_vocab, out))
    manifest = str(data.wrong_vocab / "manifest.json")
    assert_refused(proc, stage, manifest, "400", "320", outputs=final_outputs(stage, out))


@pytest.mark.parametrize("stage", STAGES)
def test_token_ids_beyond_the_vocabulary_are_refused_naming_the_shard(stage, data, tmp_path):
    out = tmp_path / ("seed1" if stage == "train" else "out.json")
    # calibrate reads 8 windows: its bad id sits in one shard of 8, where they would likely miss it
    shard = {"train": "fineweb_train_000000.bin", "calibrate": data.last_train,
             "shard-order": "fineweb_train_000000.bin", "evaluate": "fineweb_val_000000.bin"}[stage]
    proc = pgolf(*stage_command(stage, data, data.bad_last if stage == "calibrate" else data.bad_ids, out))
    assert_refused(proc, stage, shard, f"token id {BAD_ID}", "320", outputs=final_outputs(stage, out))


def test_train_under_the_launcher_refuses_bad_ids_in_one_line(data, tmp_path):
    out = tmp_path / "seed1"
    cmd = stage_command("train", data, data.bad_ids, out)
    proc = pgolf("launch", "--standalone", "--nproc-per-node", 1, "-m", "pgolf", *cmd)
    assert_refused(proc, "train", "fineweb_train_000000.bin", f"token id {BAD_ID}", outputs=final_outputs("train", out))


def test_evaluate_refuses_a_tokenizer_the_shards_were_not_made_with(data, tmp_path):
    """The issue's case: a vocab-400 tokenizer scored vocab-320 shards at 1.57 BPB instead of 3.03, exit 0."""
    out = tmp_path / "eval.json"
    proc = pgolf(*stage_command("evaluate", data, data.good, out, tokenizer_path=data.tok400))
    assert_refused(proc, "evaluate", str(data.tok400), str(data.good / "manifest.json"), outputs=(out,))


# A damaged manifest, checked where every stage checks it (one case through a stage below).
MANIFEST_DAMAGE = {
    "invalid JSON": (lambda d: (d / "manifest.json").write_text('{"vocab_size": 320,'), "not valid JSON"),
    "missing": (lambda d: (d / "manifest.json").unlink(), "manifest not found"),
    "not an object": (lambda d: (d / "manifest.json").write_text("[]"), "JSON object"),
    "no vocab_size": (lambda d: edit_manifest(d, vocab_size=None), "vocab_size must be a positive integer"),
    "vocab_size a string": (lambda d: edit_manifest(d, vocab_size="320"), "vocab_size must be a positive integer"),
    "vocab_size a bool": (lambda d: edit_manifest(d, vocab_size=True), "vocab_size must be a positive integer"),
    "no tokenizer sha": (lambda d: edit_manifest(d, tokenizer_sha256=None), "tokenizer_sha256"),
    "no splits": (lambda d: edit_manifest(d, splits={}), "splits.train is missing"),
    "tokens a float": (lambda d: edit_manifest(d, splits={**json.loads((d / "manifest.json").read_text())["splits"],
                                                          "val": {"shards": [], "tokens": 1.5}}), "splits.val.tokens"),
    "a shard removed": (lambda d: (d / "fineweb_val_000000.bin").unlink(), "lists val shards"),
    "a shard added": (lambda d: shutil.copyfile(d / "fineweb_train_000000.bin", d / "fineweb_train_000099.bin"),
                      "lists train shards"),
}


@pytest.mark.parametrize("case", MANIFEST_DAMAGE)
def test_a_damaged_manifest_is_refused_naming_it(case, data, tmp_path):
    ds = copy_dataset(data.good, tmp_path / "ds")
    damage, message = MANIFEST_DAMAGE[case]
    damage(ds)
    with pytest.raises(ShardError, match=re.escape(message)) as e:
        open_dataset(ds, 320, "--vocab-size")
    assert str(ds / "manifest.json") in str(e.value)


def test_a_shard_swapped_for_another_of_a_different_length_is_refused(data, tmp_path):
    ds = copy_dataset(data.good, tmp_path / "ds")
    shard = ds / "fineweb_train_000001.bin"
    tokens = np.array(load_shard(shard, mmap=False))
    shard.unlink()
    write_shard(shard, tokens[:-10])
    with pytest.raises(ShardError, match="train tokens, the shards hold"):
        open_dataset(ds, 320, "--vocab-size")


def test_a_damaged_manifest_through_a_stage(data, tmp_path):
    ds = copy_dataset(data.good, tmp_path / "ds")
    (ds / "manifest.json").write_text("{not json")
    out = tmp_path / "order.json"
    assert_refused(pgolf(*stage_command("shard-order", data, ds, out)), "shard-order", str(ds / "manifest.json"),
                   "JSON", outputs=(out,))


def test_id_check_costs_one_pass_per_shard(data):
    """The largest id is cached per file (and its mtime): loaders reopen shards as they wrap around."""
    from pgolf.formats import shards

    path = data.good / "fineweb_train_000000.bin"
    load_shard(path, vocab_size=320)
    key = str(path.resolve())
    assert key in shards._MAX_ID
    shards._MAX_ID[key] = (*shards._MAX_ID[key][:2], 10**6)  # a cached verdict is not recomputed
    with pytest.raises(ShardError, match="token id 1000000"):
        load_shard(path, vocab_size=320)
    del shards._MAX_ID[key]
    assert read_header(path) == len(load_shard(path, vocab_size=320))


# --- the tokenizer stage: a vocabulary the corpus cannot use ---------------------------------------

def test_a_vocabulary_too_small_fails_in_the_tokenizer_stage_naming_the_key(tiny_dataset, tmp_path):
    out = tmp_path / "tok.model"
    cfg = {**SMOKE["tokenizer"], "vocab_size": 260}
    proc = pgolf("tokenizer", "--docs", tiny_dataset.docs, "--cfg", json.dumps(cfg), "--out", out)
    line = assert_refused(proc, "tokenizer", "tokenizer.vocab_size", "260", "raise tokenizer.vocab_size",
                          outputs=(out,))
    assert "at least 306" in line  # SentencePiece's own figure for this corpus ("260 vs 306" in its error)


def test_the_needed_vocabulary_is_exactly_sentencepieces(tiny_dataset, tmp_path, monkeypatch):
    cfg = {**SMOKE["tokenizer"], "vocab_size": 305}
    with pytest.raises(tokenizer.TokenizerError, match="needs at least 306"):
        tokenizer.train(tiny_dataset.docs, cfg, tmp_path / "a.model")
    tokenizer.train(tiny_dataset.docs, {**cfg, "vocab_size": 306}, tmp_path / "b.model")  # enough: not too high
    monkeypatch.setattr(tokenizer, "vocab_needed", lambda sentences, spec: 0)
    with pytest.raises(RuntimeError, match="305 vs 306"):  # and SentencePiece itself refuses one fewer
        tokenizer.train(tiny_dataset.docs, cfg, tmp_path / "c.model")


def test_a_vocabulary_the_corpus_cannot_fill_is_refused(tiny_dataset, tmp_path):
    """SentencePiece (hard_vocab_limit off) stops short on a small corpus: the tokenizer would hold
    fewer pieces than tokenizer.vocab_size, the number every later stage takes as the vocabulary."""
    with pytest.raises(tokenizer.TokenizerError, match=r"yields only \d+ pieces, 2048 asked; lower tokenizer.vocab"):
        tokenizer.train(tiny_dataset.docs, {**SMOKE["tokenizer"], "vocab_size": 2048}, tmp_path / "t.model")
    assert not (tmp_path / "t.model").exists()


# --- Snakemake: config values, names that escape their folder, quoting ------------------------------

def snakemake(workdir: Path, *args: str, configs: tuple = ()) -> subprocess.CompletedProcess:
    files = [str(REPO / "config.yaml"), *map(str, configs)]
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "2",
           *args, "--configfile", *files]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=workdir)


def smoke_text() -> str:
    """configs/smoke.yaml as written, its relative paths (corpus, and what it extends) made absolute."""
    text = (REPO / "configs" / "smoke.yaml").read_text()
    text = re.sub(r"^extends: (.+)$", lambda m: f"extends: {(REPO / 'configs' / m[1]).resolve()}", text, flags=re.M)
    return text.replace("[tests/fixtures/corpus]", f"[{REPO / 'tests/fixtures/corpus'}]")


def smoke_preset(workdir: Path, **changes) -> Path:
    cfg = yaml.safe_load(smoke_text())
    for key, value in changes.items():
        section, _, sub = key.partition(".")
        if sub:
            cfg.setdefault(section, {})[sub] = value
        else:
            cfg[section] = value
    path = workdir / "preset.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_snakemake_reads_yaml_1_2_numbers_from_a_preset(tmp_path):
    """`3e-4` is a string to YAML 1.1; the config Snakemake runs with must hold the number."""
    preset = tmp_path / "preset.yaml"  # written as a person writes learning rates
    lrs = "  iterations: 20\n  matrix_lr: 3e-4\n  scalar_lr: 1e6\n"
    preset.write_text(smoke_text().replace("  iterations: 20\n", lrs))
    proc = snakemake(tmp_path, "-n", "-p", configs=(preset,))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert '"matrix_lr": 0.0003' in out and '"scalar_lr": 1000000.0' in out


ESCAPES = {
    "run ..": ({"run": ".."}, "run: '..'"),
    "run .": ({"run": "."}, "run: '.'"),
    "data.name ..": ({"data.name": ".."}, "data.name: '..'"),
    "baseline with a command": ({"compare.baseline_run": "x$(touch MARK)"}, "compare.baseline_run"),
}


@pytest.mark.parametrize("case", ESCAPES)
def test_snakemake_refuses_names_that_escape_their_folder(case, tmp_path):
    changes, named = ESCAPES[case]
    workdir = tmp_path / "w"
    workdir.mkdir()
    proc = snakemake(workdir, "-n", configs=(smoke_preset(workdir, **changes),))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert named in out and "Traceback" not in out
    # nothing written: not in results/ or data/, nor in the folder above (where run ".." would write)
    assert not (workdir / "results").exists() and not (workdir / "data").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"] and not list(tmp_path.rglob("MARK"))


def shell_fields(rules_text: str) -> list[str]:
    """Every {field} inside the shell: strings of a rules file."""
    fields = []
    for block in re.findall(r"^\s+shell:\n((?:\s+.*\n?)+?)(?=^\S|^\s*$|\Z)", rules_text, re.M):
        fields += re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", block)
    return fields


def test_every_value_reaching_a_shell_is_quoted():
    for smk in sorted((REPO / "rules").glob("*.smk")):
        fields = shell_fields(smk.read_text())
        unquoted = [f for f in fields if not f.endswith(":q")]
        assert not unquoted, f"{smk.name}: {unquoted} reach the shell unquoted; write {{...:q}}"
    common = (REPO / "rules" / "common.smk").read_text()
    assert "{resources.nproc:q}" in common  # TORCHRUN, a string the rules prepend


def test_paths_with_spaces_and_commands_run_and_execute_nothing(tmp_path, setup):
    """The smoke pipeline, one seed, in a folder, with a corpus, a probe checkpoint and a baseline
    whose paths hold spaces, `$(...)` and backticks: every rule runs, and no command runs."""
    workdir = tmp_path / HOSTILE
    corpus = workdir / f"corpus {HOSTILE}"
    shutil.copytree(REPO / "tests" / "fixtures" / "corpus", corpus)
    probe = workdir / f"probe {HOSTILE}.pgt"
    shutil.copyfile(setup.ema, probe)
    baseline = workdir / "results" / "base-1" / "summary.json"
    baseline.parent.mkdir(parents=True)
    write_result(baseline, {"mean": {"sliding_bpb": 9.0}, "std": {"sliding_bpb": 0.1}, "n_seeds": 3})
    preset = smoke_preset(workdir, seeds=[1, 2], **{
        "data.paths": [str(corpus)], "order.probe_checkpoint": str(probe), "compare.baseline_run": "base-1",
        "loader.mode": "ordered", "loader.order": "hardest"})
    cfg = yaml.safe_load(preset.read_text())
    cfg["train"].update(iterations=6, warmdown_steps=2, log_every=2, checkpoint_every=100)
    preset.write_text(yaml.safe_dump(cfg))
    proc = snakemake(workdir, configs=(preset,))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    run = workdir / "results" / "smoke"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["compare"]["baseline"]["source"] == "base-1"
    order = json.loads((Path(stage_dir(run, 1, "shard_order")) / "shard_order.json").read_text())
    assert order["probe"] == str(probe)
    assert (run / "record").is_dir() and (run / "plots" / "loss.png").exists()
    assert not list(tmp_path.rglob("MARK")) and not Path("MARK").exists()
