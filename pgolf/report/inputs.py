"""The per-seed files a report stage reads, as its rule declares them: one path per seed for each
kind, in the order of --seeds (never rebuilt from a run folder, so Snakemake sees every file read)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pgolf.errors import PgolfError


def add_seed_files(ap: argparse.ArgumentParser, *kinds: str) -> None:
    """--seeds and one --<kind> option per kind, each taking a path per seed."""
    ap.add_argument("--seeds", type=int, nargs="+", required=True)
    for kind in kinds:
        ap.add_argument(f"--{kind}", type=Path, nargs="+", required=True, help=f"one {kind} file per seed, as --seeds")


def seed_files(seeds: list[int], **files: list[Path]) -> dict[int, dict[str, Path]]:
    """seed -> kind -> path; every kind must give one path per seed."""
    for kind, paths in files.items():
        if len(paths) != len(seeds):
            raise PgolfError(f"--{kind}: {len(paths)} files for {len(seeds)} seeds ({seeds})")
    if len(set(seeds)) != len(seeds):
        raise PgolfError(f"--seeds: {seeds} repeats a seed")
    return {s: {kind: paths[i] for kind, paths in files.items()} for i, s in enumerate(seeds)}
