"""`pgolf config FILE...`: merge and validate config files, print the resolved config;
`pgolf params FILE...`: the parameter count of the model they describe."""

from __future__ import annotations

import argparse

from pgolf.config import dump, load


def cli(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="pgolf config", description=__doc__)
    ap.add_argument("files", nargs="+", help="config.yaml, then presets (later files win)")
    args = ap.parse_args(argv)
    cfg = load(*args.files)
    print(dump(cfg), end="")  # reads back, through pgolf or Snakemake, as the same values


def params_cli(argv: list[str]) -> None:
    from pgolf.model.gpt import GPT, count_parameters, layer_order

    ap = argparse.ArgumentParser(prog="pgolf params", description="Parameter count of a config's model.")
    ap.add_argument("files", nargs="+", help="config.yaml, then presets (later files win)")
    args = ap.parse_args(argv)
    cfg = load(*args.files)
    counts = count_parameters(GPT(cfg["tokenizer"]["vocab_size"], cfg["model"]))
    total = counts.pop("total")
    for name, n in counts.items():
        print(f"  {name:<14}{n:>14,}")
    layers = f"{cfg['model']['num_layers']} blocks, {len(layer_order(cfg['model']))} virtual layers"
    print(f"{cfg['run']}: {total:,} parameters ({layers}, vocab {cfg['tokenizer']['vocab_size']})")
