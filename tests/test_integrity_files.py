"""Every file pgolf writes and later reads is verified where it is read: tensor files (.pgt), the
artifact, training checkpoints and parquet files, each damaged the ways a disk, a copy or a killed job
damages them (a flipped byte in a tensor, a scale, an int code or the header; truncated; appended to;
empty; an older format), and NaN/Inf that a diverged run would carry along. Each refusal is one line
that names the file, and the stage leaves nothing at its output path.

Most cases call the stage functions in-process (fast); a representative few run the stage commands
as the rules do, to check the exit status, the one line and the absence of a traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_files

from pgolf.config import validate
from pgolf.data.documents import read_documents
from pgolf.errors import PgolfError
from pgolf.formats import tensorfile
from pgolf.formats.container import frame, unframe
from pgolf.formats.io import read_parquet, write_parquet
from pgolf.model.gpt import load_weights
from pgolf.quant import artifact
from pgolf.quant.calibrate import calibrate
from pgolf.quant.compress import compress
from pgolf.quant.quantize import quantize
from pgolf.quant.size import check_size
from pgolf.train import checkpoint

COMPRESS = validate({})["compress"]
RTN = validate({"quant": {"method": "rtn", "min_numel": 256}})["quant"]
GPTQ = validate({"quant": {"method": "gptq", "min_numel": 256}})["quant"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------- damage


def flip(data: bytes, i: int) -> bytes:
    """One bit of byte i flipped: the smallest damage there is."""
    b = bytearray(data)
    b[i] ^= 0x01
    return bytes(b)


def tensor_byte(data: bytes, suffix: str) -> int:
    """The position of a byte in the middle of the first tensor whose name ends with `suffix`."""
    header, body = unframe(data, tensorfile.MAGIC, tensorfile.VERSION, 1 << 24, "t", ValueError, "t")
    name = next(n for n in header["tensors"] if n.endswith(suffix))
    entry = header["tensors"][name]
    return len(data) - len(body) + entry["offset"] + entry["nbytes"] // 2


def header_value(data: bytes) -> bytes:
    """The header's `"step": 0` made `"step": 1`: valid JSON, a changed value."""
    i = data.index(b'"step": 0')
    return data[:i] + b'"step": 1' + data[i + 9 :]


def version(data: bytes, v: int) -> bytes:
    return data[:8] + struct.pack("<I", v) + data[12:]


TENSOR_DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "flipped scale byte": (lambda d: flip(d, tensor_byte(d, ".scale")), r"checksum mismatch in tensor '[^']+\.scale'"),
    "flipped int code": (lambda d: flip(d, tensor_byte(d, ".codes")), r"checksum mismatch in tensor '[^']+\.codes'"),
    "flipped header value": (header_value, "checksum mismatch in the header"),
    "flipped header space": (lambda d: d.replace(b", ", b",\t", 1), "checksum mismatch in the header"),
    "truncated": (lambda d: d[:-100], "tensor '[^']+' lies past the end of the file"),
    "appended": (lambda d: d + bytes(16), "16 bytes after the last tensor"),
    "empty": (lambda d: b"", r"truncated \(0 bytes\)"),
    "version 1 (no checksums)": (lambda d: version(d, 1), "unsupported tensor file version 1"),
}
WEIGHT_DAMAGE = {k: v for k, v in TENSOR_DAMAGE.items() if "scale" not in k and "code" not in k}
WEIGHT_DAMAGE["flipped weight byte"] = (lambda d: flip(d, tensor_byte(d, "weight")), "checksum mismatch in tensor")


def refused(path: Path, expect: str) -> pytest.RaisesContext:
    """The one-line error `<path>: <problem>` of a known error."""
    return pytest.raises(PgolfError, match=f"^{re.escape(str(path))}: {expect}")


def damaged_copy(src: Path, dst: Path, damage: Callable[[bytes], bytes]) -> Path:
    dst.write_bytes(damage(src.read_bytes()))
    return dst


def stage(*args: object) -> subprocess.CompletedProcess:
    """`pgolf <stage> ...` as the rules call it."""
    return subprocess.run([sys.executable, "-m", "pgolf", *map(str, args)], capture_output=True, text=True, env=ENV)


def assert_one_line(proc: subprocess.CompletedProcess, name: str, path: Path, expect: str) -> None:
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.startswith("pgolf ")]
    assert len(lines) == 1 and re.match(f"pgolf {name}: {re.escape(str(path))}: {expect}", lines[0]), proc.stderr


# ---------------------------------------------------------------- tensor files


def test_every_single_byte_flip_of_a_tensor_file_is_refused_and_round_trips_hold():
    tensors = {"w": torch.randn(4, 3), "b": torch.randn(3).bfloat16(), "c": torch.arange(5).to(torch.int8)}
    data = tensorfile.dumps(tensors, {"step": 3, "model": {"dim": 4}})
    assert tensorfile.dumps(*tensorfile.loads(data, "t.pgt")) == data
    for i in range(len(data)):
        with pytest.raises(tensorfile.TensorFileError, match="^t.pgt: "):
            tensorfile.loads(flip(data, i), "t.pgt")


@pytest.mark.parametrize("damage", TENSOR_DAMAGE)
def test_compress_refuses_a_damaged_quant_file(setup, tmp_path, damage):
    fn, expect = TENSOR_DAMAGE[damage]
    quant = damaged_copy(setup.artifact.parent / "q.pgt", tmp_path / "quant.pgt", fn)
    with refused(quant, expect):
        compress(quant, COMPRESS, tmp_path / "artifact.pgz")
    assert not (tmp_path / "artifact.pgz").exists()


@pytest.mark.parametrize("damage", [*WEIGHT_DAMAGE, "NaN weight"])
def test_quantize_and_every_weights_reader_refuse_damaged_or_nonfinite_weights(setup, tmp_path, damage):
    ema = tmp_path / "ema.pgt"
    if damage == "NaN weight":  # a diverged run's weights: intact file, checksums right
        tensors, meta = tensorfile.load(setup.ema)
        name = next(n for n in tensors if n.endswith("weight"))
        tensors[name] = tensors[name].clone().fill_(float("nan"))
        tensorfile.save(ema, tensors, meta)
        expect = f"tensor '{re.escape(name)}' holds NaN/Inf"
    else:
        fn, expect = WEIGHT_DAMAGE[damage]
        damaged_copy(setup.ema, ema, fn)
    with refused(ema, expect):
        quantize(ema, RTN, tmp_path / "quant.pgt")
    assert not (tmp_path / "quant.pgt").exists()
    with refused(ema, expect):  # what calibrate, order and evaluate read the weights with
        load_weights(ema)


def identity_hessians(ema: Path) -> dict[str, torch.Tensor]:
    tensors, _ = tensorfile.load(ema)
    return {n: torch.eye(t.shape[1]) for n, t in tensors.items() if t.ndim == 2 and n.endswith("weight")}


@pytest.mark.parametrize("damage", ["flipped byte", "NaN Hessian"])
def test_gptq_refuses_damaged_or_nonfinite_hessians(setup, tmp_path, damage):
    hessians, path = identity_hessians(setup.ema), tmp_path / "hessians.pgt"
    name = next(iter(hessians))
    if damage == "NaN Hessian":
        hessians[name][0, 0] = float("nan")
        tensorfile.save(path, hessians, {})
        expect = f"tensor '{re.escape(name)}' holds NaN/Inf"
    else:
        tensorfile.save(path, hessians, {})
        damaged_copy(path, path, lambda d: flip(d, tensor_byte(d, name)))
        expect = f"checksum mismatch in tensor '{re.escape(name)}'"
    with refused(path, expect):
        quantize(setup.ema, GPTQ, tmp_path / "quant.pgt", path)
    assert not (tmp_path / "quant.pgt").exists()


def test_calibrate_refuses_the_nan_hessians_it_computed(setup, tmp_path, monkeypatch):
    import pgolf.quant.calibrate as cal

    monkeypatch.setattr(cal, "calibration_tokens", lambda *a, **k: torch.zeros(2, 8, dtype=torch.long))
    inf = {"blocks.0.mlp.fc.weight": torch.full((4, 4), torch.inf)}
    monkeypatch.setattr(cal, "collect_hessians", lambda *a, **k: inf)
    with refused(setup.ema, "the Hessian of 'blocks.0.mlp.fc.weight' computed from these weights holds NaN/Inf"):
        calibrate(setup.ema, None, validate({})["calibrate"], 0, tmp_path / "hessians.pgt", torch.device("cpu"))
    assert not (tmp_path / "hessians.pgt").exists()


def test_quantize_refuses_weights_that_overflow_float16_scales(tmp_path):
    tensorfile.save(tmp_path / "ema.pgt", {"blocks.0.mlp.fc.weight": 1e9 * torch.randn(32, 32)}, {})
    with refused(tmp_path / "ema.pgt", "quantized tensor 'blocks.0.mlp.fc.weight.scale' holds NaN/Inf"):
        quantize(tmp_path / "ema.pgt", RTN, tmp_path / "quant.pgt")
    assert not (tmp_path / "quant.pgt").exists()


# ---------------------------------------------------------------- artifact and `pgolf size`


def reframed(data: bytes, **changes: object) -> bytes:
    header, body = unframe(data, artifact.MAGIC, artifact.VERSION, 1 << 20, "a", ValueError, "a")
    return frame(artifact.MAGIC, artifact.VERSION, {**header, **changes}) + bytes(body)


def damaged_payload(quant: bytes) -> bytes:
    """An artifact whose header and sha256 are consistent with the tensors it packs, one of which has a
    flipped byte: what compress made of a damaged quant.pgt before tensor files had checksums."""
    raw = flip(quant, tensor_byte(quant, ".scale"))
    body = artifact.CODECS["zstd"][0](raw, 3)
    header = {"codec": "zstd", "level": 3, "shuffle": 0, "packed": {}, "body_bytes": len(body),
              "payload_bytes": len(raw), "raw_bytes": len(raw), "params": 0, "pruned_codes": 0}
    return frame(artifact.MAGIC, artifact.VERSION, {**header, "sha256": artifact.digest(header, raw)}) + body


ARTIFACT_DAMAGE: dict[str, tuple[Callable[[bytes, bytes], bytes], str]] = {
    "truncated": (lambda a, q: a[:-10], "the body is .* bytes, the header says"),
    "flipped body byte": (lambda a, q: flip(a, len(a) - 20), ""),
    "appended": (lambda a, q: a + b"x", "the body is .* bytes, the header says"),
    "empty": (lambda a, q: b"", r"truncated \(0 bytes\)"),
    "wrong sha256": (lambda a, q: reframed(a, sha256="0" * 64), "checksum mismatch; the artifact is corrupt"),
    "unknown codec": (lambda a, q: reframed(a, codec="zip"), "unknown codec 'zip'"),
    # compress verifies quant.pgt before packing it without digests, so this artifact cannot be made
    # any more; a payload still carrying them (and a damaged tensor) is refused as corrupt
    "damaged tensor, consistent sha256": (lambda a, q: damaged_payload(q), r"payload is corrupt .*checksum mismatch"),
    "older artifact version": (lambda a, q: version(a, 2), "unsupported artifact version 2"),
}


@pytest.mark.parametrize("damage", ARTIFACT_DAMAGE)
def test_size_verifies_the_artifact_before_it_certifies_it(setup, tmp_path, damage):
    fn, expect = ARTIFACT_DAMAGE[damage]
    art = tmp_path / "artifact.pgz"
    art.write_bytes(fn(setup.artifact.read_bytes(), (setup.artifact.parent / "q.pgt").read_bytes()))
    with refused(art, expect):
        check_size(art, COMPRESS, tmp_path / "size.json")
    assert not (tmp_path / "size.json").exists()
    with refused(art, expect):  # the reader evaluate uses says the same
        artifact.read_tensors(art)


def test_size_certifies_a_good_artifact(setup, tmp_path):
    assert check_size(setup.artifact, COMPRESS, tmp_path / "size.json")["fits"]


# ---------------------------------------------------------------- the stage commands


def test_stage_commands_refuse_damaged_files_in_one_line(setup, tmp_path):
    flipped_scale = TENSOR_DAMAGE["flipped scale byte"][0]
    quant = damaged_copy(setup.artifact.parent / "q.pgt", tmp_path / "quant.pgt", flipped_scale)
    proc = stage("compress", "--quant", quant, "--cfg", json.dumps(COMPRESS), "--out", tmp_path / "artifact.pgz")
    assert_one_line(proc, "compress", quant, "checksum mismatch in tensor")
    assert not (tmp_path / "artifact.pgz").exists()

    art = damaged_copy(setup.artifact, tmp_path / "bad.pgz", lambda d: d[:-10])
    proc = stage("size", "--artifact", art, "--cfg", json.dumps(COMPRESS), "--features", "", "--out",
                 tmp_path / "size.json")
    assert_one_line(proc, "size", art, "the body is")
    assert not (tmp_path / "size.json").exists()


# ---------------------------------------------------------------- checkpoints


def ckpt_state(step: int, fp: str = "fp", **over: object) -> dict:
    torch.manual_seed(step)
    w = {"w": torch.randn(4, 4)}
    return {"fingerprint": fp, "model": w, "ema": {k: v + 1 for k, v in w.items()}, "swa": None, "optimizers": [],
            "loader": {"pos": step}, "step": step, "elapsed": float(step), "rows": [], **over}


def nan_ema(ckpt: Path) -> None:
    (ckpt / "latest.pt").unlink()
    checkpoint.save(ckpt, ckpt_state(8, ema={"w": torch.full((4, 4), float("nan"))}))


def no_ema(ckpt: Path) -> None:
    (ckpt / "latest.pt").unlink()
    state = ckpt_state(8)
    del state["ema"]
    checkpoint.save(ckpt, state)


def edit(fn: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def damage(ckpt: Path) -> None:
        path = ckpt / "latest.pt"
        path.write_bytes(fn(path.read_bytes()))
    return damage


CKPT_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "flipped tensor byte": (edit(lambda d: flip(d, len(d) // 2)), "checksum mismatch"),
    "truncated": (edit(lambda d: d[: len(d) // 2]), r"the body is .* \(truncated, or bytes appended\)"),
    "appended": (edit(lambda d: d + b"\0"), r"the body is .* \(truncated, or bytes appended\)"),
    "empty": (edit(lambda d: b""), r"truncated \(0 bytes\)"),
    "NaN EMA": (nan_ema, "ema tensor 'w' holds NaN/Inf"),
    "no 'ema' key": (no_ema, "incomplete, lacks 'ema'"),
    "plain torch.save file": (lambda c: torch.save(ckpt_state(8), c / "latest.pt"), "bad magic"),
}


@pytest.fixture
def ckpt(tmp_path) -> Path:
    """latest.pt at step 8, previous.pt at step 4, both good."""
    checkpoint.save(tmp_path / "ckpt", ckpt_state(4))
    checkpoint.save(tmp_path / "ckpt", ckpt_state(8))
    return tmp_path / "ckpt"


def test_checkpoints_rotate_and_resume_the_latest(ckpt):
    assert checkpoint.load(ckpt, "fp")["step"] == 8
    assert checkpoint.read(ckpt / "previous.pt")["step"] == 4


@pytest.mark.parametrize("damage", CKPT_DAMAGE)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_with_a_warning(ckpt, capsys, damage):
    fn, expect = CKPT_DAMAGE[damage]
    fn(ckpt)
    state = checkpoint.load(ckpt, "fp")
    assert state is not None and state["step"] == 4 and torch.equal(state["model"]["w"], ckpt_state(4)["model"]["w"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and re.match(f"warning: {re.escape(str(ckpt / 'latest.pt'))}: {expect}.*; "
                                      f"resuming from {re.escape(str(ckpt / 'previous.pt'))}$", out[0]), out


@pytest.mark.parametrize("damage", CKPT_DAMAGE)
def test_a_damaged_checkpoint_with_no_good_previous_fails_naming_the_file(ckpt, damage):
    fn, expect = CKPT_DAMAGE[damage]
    fn(ckpt)
    previous = ckpt / "previous.pt"
    previous.write_bytes(previous.read_bytes()[:-1])
    with pytest.raises(checkpoint.CheckpointError, match=f"^{re.escape(str(ckpt / 'latest.pt'))}: {expect}") as e:
        checkpoint.load(ckpt, "fp")
    assert "\n" not in str(e.value) and f"{previous}: the body is" in str(e.value)
    previous.unlink()
    with pytest.raises(checkpoint.CheckpointError, match="no previous checkpoint to fall back on"):
        checkpoint.load(ckpt, "fp")


def test_checkpoint_of_another_config_starts_fresh_but_never_from_a_damaged_one(ckpt, tmp_path, capsys):
    assert checkpoint.load(ckpt, "other") is None
    assert "belongs to another config or dataset; starting fresh" in capsys.readouterr().out
    edit(lambda d: flip(d, len(d) // 2))(ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="previous.pt belongs to another config"):
        checkpoint.load(ckpt, "other")


def test_a_kill_between_the_two_renames_resumes_the_previous(ckpt, capsys):
    (ckpt / "latest.pt").unlink()
    assert checkpoint.load(ckpt, "fp")["step"] == 4
    assert "latest.pt is missing" in capsys.readouterr().out
    assert checkpoint.load(ckpt.parent / "none", "fp") is None


def train_cmd(ds, out: Path, stop_after: int = 0) -> list[str]:
    cfg = validate({"model": {"num_layers": 1, "model_dim": 16, "num_heads": 2, "num_kv_heads": 1},
                    "train": {"seq_len": 16, "batch_tokens": 64, "micro_batch_seqs": 4, "iterations": 10,
                              "warmup_steps": 1, "warmdown_steps": 2, "checkpoint_every": 4, "log_every": 4}})
    cmd = ["train", "--data", ds.dataset_dir, "--vocab-size", ds.vocab_size, "--model-cfg", json.dumps(cfg["model"]),
           "--cfg", json.dumps(cfg["train"]), "--seed", 1, "--device", "cpu", "--out-dir", out,
           "--ckpt-dir", out / "ckpt", "--loader-cfg", json.dumps(cfg["loader"])]
    return cmd + (["--stop-after-step", stop_after] if stop_after else [])


@pytest.fixture(scope="module")
def killed_run(tiny_dataset, tmp_path_factory) -> Path:
    """A training killed after step 9: latest.pt at step 8, previous.pt at step 4."""
    out = tmp_path_factory.mktemp("killed")
    assert stage(*train_cmd(tiny_dataset, out, stop_after=9)).returncode == 3
    return out


def test_train_resumes_from_the_previous_checkpoint_when_the_latest_is_damaged(tiny_dataset, killed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed_run, out)
    edit(lambda d: flip(d, len(d) // 2))(out / "ckpt")
    proc = stage(*train_cmd(tiny_dataset, out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warning: {out / 'ckpt' / 'latest.pt'}: checksum mismatch" in proc.stdout
    assert "at step 4" in proc.stdout and (out / "ema.pgt").exists()


def test_train_refuses_to_resume_when_no_checkpoint_is_good(tiny_dataset, killed_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed_run, out)
    for name in ("latest.pt", "previous.pt"):
        data = (out / "ckpt" / name).read_bytes()
        (out / "ckpt" / name).write_bytes(data[: len(data) // 2])
    proc = stage("launch", "--standalone", "--nproc-per-node", 1, "-m", "pgolf", *train_cmd(tiny_dataset, out))
    assert_one_line(proc, "train", out / "ckpt" / "latest.pt", "the body is")
    assert not (out / "ema.pgt").exists() and not (out / "metrics.parquet").exists()


# ---------------------------------------------------------------- parquet


def metrics_table(n: int = 12) -> pa.Table:
    return pa.Table.from_pylist([{"step": i, "loss": 5.0 - 0.1 * i, "lr_scale": 1.0, "tokens": 256 * i,
                                  "elapsed_s": 0.01 * i, "tokens_per_s": 25600.0} for i in range(1, n + 1)])


def footer_name_byte(d: bytes) -> int:
    """A byte of the column name `loss` in the footer's schema (its first mention in the footer)."""
    footer = len(d) - 8 - struct.unpack("<I", d[-8:-4])[0]
    return d.index(b"loss", footer)


PARQUET_DAMAGE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "flipped value byte": (lambda d: flip(d, 40), "damaged or not a parquet file"),
    "renamed column": (lambda d: flip(d, footer_name_byte(d)), "checksum mismatch in its schema"),
    "truncated": (lambda d: d[:-10], "damaged or not a parquet file"),
    "empty": (lambda d: b"", "damaged or not a parquet file"),
}


@pytest.mark.parametrize("damage", [*PARQUET_DAMAGE, "written without checksums"])
def test_damaged_parquet_is_refused_naming_the_file(tmp_path, damage):
    path = tmp_path / "metrics.parquet"
    if damage == "written without checksums":
        pq.write_table(metrics_table(), path)
        expect = "carries no pgolf checksum"
    else:
        write_parquet(path, metrics_table())
        fn, expect = PARQUET_DAMAGE[damage]
        damaged_copy(path, path, fn)
    with refused(path, expect):
        read_parquet(path)


def test_no_single_byte_flip_of_metrics_changes_values_silently(tmp_path):
    path, bad = tmp_path / "metrics.parquet", tmp_path / "flipped.parquet"
    write_parquet(path, metrics_table())
    data, rows = path.read_bytes(), metrics_table().to_pylist()
    silent = []
    for i in range(len(data)):
        bad.write_bytes(flip(data, i))
        try:
            table = read_parquet(bad)
        except PgolfError:
            continue
        if table.to_pylist() != rows or table.schema.names != metrics_table().schema.names:
            silent.append(i)
    assert silent == []


def test_plots_and_tokenizer_readers_refuse_damaged_parquet(tmp_path):
    from pgolf.report.plots import loss_figure

    metrics = tmp_path / "seed1" / "metrics.parquet"
    metrics.parent.mkdir()
    write_parquet(metrics, metrics_table())
    damaged_copy(metrics, metrics, lambda d: flip(d, 40))
    with refused(metrics, "damaged"):
        loss_figure(run_files(tmp_path, [1], ("metrics",)), tmp_path / "loss.png")
    assert not (tmp_path / "loss.png").exists()
    docs = tmp_path / "docs.parquet"
    write_parquet(docs, pa.table({"doc_id": ["a", "b"], "text": ["one doc", "another"], "split": ["train", "val"]}))
    assert read_documents(docs, "train") == ["one doc"]
    damaged_copy(docs, docs, lambda d: flip(d, 30))
    with refused(docs, "damaged"):
        read_documents(docs)
