"""Resumable training state: written atomically with a checksum, the one before it kept; refused when
it belongs to another config, and never resumed from when damaged.

A checkpoint file is torch.save's bytes framed like every pgolf binary file (pgolf.formats.container):
b"PGOLFCKP" | u32 version | u64 header length | JSON header {sha256, bytes} | torch.save body; the
header must be exactly as written (a flipped bit anywhere before the body is refused), and its two
values are checked against the body.
Saving renames latest.pt to previous.pt, then the new file to latest.pt: a kill between the two
renames leaves previous.pt alone, which is resumed. Loading refuses a file that is truncated, fails
its checksum, lacks a key or holds NaN/Inf weights; it then resumes from previous.pt with a warning
if that one is good, and fails naming the file otherwise.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import torch
import torch.distributed as dist

from pgolf.errors import PgolfError
from pgolf.formats.container import frame, read_file, unframe
from pgolf.formats.io import atomic_path
from pgolf.formats.shards import read_manifest
from pgolf.formats.tensorfile import first_nonfinite

MAGIC = b"PGOLFCKP"
VERSION = 1
LATEST, PREVIOUS = "latest.pt", "previous.pt"
KEYS = ("fingerprint", "model", "ema", "swa", "optimizers", "loader", "step", "elapsed", "rows", "rng")


class CheckpointError(PgolfError):
    """A checkpoint that is damaged, truncated or not ours: `<path>: <problem>`."""


def fingerprint(model_cfg: dict, train_cfg: dict, seed: int, vocab: int, dataset_dir: str | Path) -> str:
    """What a checkpoint must match to be resumed: the configs, the seed, and the data by content: each
    train shard's sha256 and the tokenizer's, as the dataset's manifest records them (the loader checks
    every shard against it before using it). Names and sizes alone let a rebuilt dataset of the same
    shape resume a run trained on the old one."""
    m = read_manifest(dataset_dir)
    train_split = m["splits"]["train"]
    data = {"tokenizer_sha256": m["tokenizer_sha256"],
            "train": sorted(zip(train_split["shards"], train_split["sha256"], strict=True))}
    # Logging cadence and compile priming do not change the result; everything else does.
    train = {k: v for k, v in train_cfg.items() if k not in ("log_every", "checkpoint_every", "prime_steps")}
    blob = json.dumps([model_cfg, train, seed, vocab, data], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def rng_state() -> dict:
    # Training draws randomness only from torch (numpy and random are unused), so only torch's is kept.
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(ckpt_dir: str | Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save({**state, "rng": rng_state()}, buf)
    body = buf.getbuffer()
    head = frame(MAGIC, VERSION, {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)})
    latest = Path(ckpt_dir) / LATEST
    with atomic_path(latest) as tmp:
        with open(tmp, "wb") as f:
            f.write(head)
            f.write(body)
        if latest.exists():
            os.replace(latest, latest.with_name(PREVIOUS))


def read(path: Path) -> dict:
    """The state saved in `path`; CheckpointError naming it unless framing, checksum and contents are sound."""
    data = read_file(path, CheckpointError)
    # canonical: the header's two values are checked below, and no other byte of it may differ
    header, body = unframe(data, MAGIC, VERSION, 1 << 16, str(path), CheckpointError, "checkpoint", canonical=True)
    if header.get("bytes") != len(body):
        raise CheckpointError(f"{path}: the body is {len(body):,} bytes, the header says {header.get('bytes')!r} "
                              "(truncated, or bytes appended)")
    if hashlib.sha256(body).hexdigest() != header.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch; the checkpoint is damaged")
    try:
        state = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:  # intact bytes this torch cannot read
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None
    _check_contents(state, path)
    return state


def _check_contents(state: object, path: Path) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds {type(state).__name__}, not a training state")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: incomplete, lacks {', '.join(map(repr, missing))}")
    for part in ("model", "ema"):
        bad = first_nonfinite(state[part]) if isinstance(state[part], dict) else "<not a tensor dict>"
        if bad is not None:
            raise CheckpointError(f"{path}: {part} tensor {bad!r} holds NaN/Inf")


def _note(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def _good_state(ckpt_dir: Path, fingerprint: str) -> tuple[dict, Path] | None:
    """(state, its file): latest.pt, or previous.pt of the same config, with a warning, when latest.pt
    is damaged or gone."""
    latest, previous = ckpt_dir / LATEST, ckpt_dir / PREVIOUS
    if not latest.exists():
        if not previous.exists():
            return None
        _note(f"{latest} is missing (killed while saving?); resuming from {previous}")
        return read(previous), previous
    try:
        return read(latest), latest
    except CheckpointError as bad:
        fresh = f"delete {ckpt_dir} to start fresh"
        if not previous.exists():
            raise CheckpointError(f"{bad}; no previous checkpoint to fall back on ({fresh})") from None
        try:
            state = read(previous)
        except CheckpointError as also:
            raise CheckpointError(f"{bad}; and {also} ({fresh})") from None
        if state["fingerprint"] != fingerprint:
            raise CheckpointError(f"{bad}; {previous} belongs to another config ({fresh})") from None
        _note(f"warning: {bad}; resuming from {previous}")
        return state, previous


def load(ckpt_dir: str | Path, expected_fingerprint: str) -> dict | None:
    """The saved state, or None (with the reason printed) when there is none to resume.
    Raises CheckpointError when the checkpoint is damaged and no good one is left to resume."""
    found = _good_state(Path(ckpt_dir), expected_fingerprint)
    if found is None:
        return None
    state, path = found
    if state["fingerprint"] != expected_fingerprint:
        _note(f"checkpoint {path} belongs to another config or dataset; starting fresh")
        return None
    set_rng_state(state["rng"])
    return state
