"""Resumable training state: written atomically, refused when it belongs to another config."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pgolf.io import atomic_path

NAME = "latest.pt"


def fingerprint(model_cfg: dict, train_cfg: dict, seed: int, vocab: int, dataset_dir: str | Path) -> str:
    """What a checkpoint must match to be resumed: the configs, the seed and the shards' sizes."""
    shards = sorted((p.name, p.stat().st_size) for p in Path(dataset_dir).glob("fineweb_train_*.bin"))
    # Logging cadence does not change the result; everything else does.
    train = {k: v for k, v in train_cfg.items() if k not in ("log_every", "checkpoint_every")}
    blob = json.dumps([model_cfg, train, seed, vocab, shards], sort_keys=True)
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
    with atomic_path(Path(ckpt_dir) / NAME) as tmp:
        torch.save({**state, "rng": rng_state()}, tmp)


def load(ckpt_dir: str | Path, expected_fingerprint: str) -> dict | None:
    """The saved state, or None (with the reason printed) when there is none to resume."""
    path = Path(ckpt_dir) / NAME
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != expected_fingerprint:
        print(f"checkpoint {path} belongs to another config or dataset; starting fresh", flush=True)
        return None
    set_rng_state(state["rng"])
    return state
