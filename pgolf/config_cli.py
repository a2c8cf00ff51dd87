"""`pgolf config FILE...`: merge and validate config files, print the resolved config."""

from __future__ import annotations

import argparse

import yaml

from pgolf.config import ConfigError, load


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf config", description=__doc__)
    ap.add_argument("files", nargs="+", help="config.yaml, then presets (later files win)")
    args = ap.parse_args(argv)
    try:
        cfg = load(*args.files)
    except ConfigError as e:
        raise SystemExit(f"pgolf config: {e}") from None
    print(yaml.safe_dump(cfg, sort_keys=False), end="")
