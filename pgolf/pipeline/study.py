"""A study: a baseline run and its variants, each an overlay on the baseline, run and compared as
one. Without `study.variants` a config is one run, as always.

    extends: ../../config.yaml        # the baseline
    run: my-study                     # results/my-study/{baseline,<variant>...}/, comparison.*
    study:
      level: 0.05                     # the study's looser level, beside the record bar
      variants:
        lqer: {quant: {lqer: {rank: 4}}}
        pergroup: {compress: {codec: pergroup}}

Every variant is the baseline's config with its overlay merged in, validated on its own. A variant
keeps the baseline's seeds and run name (so seeds pair up and folders stay under the study), and
the data source (one set of data rules serves the study).
"""

from __future__ import annotations

from typing import Any

from pgolf.config import deep_merge, validate
from pgolf.errors import ConfigError

BASELINE = "baseline"
FIXED = ("run", "seeds", "study", "compare")  # what a variant may not change


def runs(merged: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """results folder -> (run name, validated config) of every run the merged config asks for."""
    base = validate(merged)
    variants, run = base["study"]["variants"], base["run"]
    if not variants:
        return {f"results/{run}": (run, base)}
    out = {f"results/{run}/{BASELINE}": (f"{run}/{BASELINE}", base)}
    for name, overlay in variants.items():
        fixed = [k for k in FIXED if k in overlay]
        if fixed:
            raise ConfigError(f"study.variants.{name}: sets {', '.join(fixed)}, which every variant takes from "
                              "the baseline (seeds pair up; folders stay under the study)")
        if "source" in overlay.get("data", {}):
            raise ConfigError(f"study.variants.{name}: sets data.source; a study's runs share one data source")
        try:
            cfg = validate(deep_merge({k: v for k, v in merged.items() if k != "study"}, overlay))
        except ConfigError as e:
            raise ConfigError(f"study.variants.{name}: {e}") from None
        out[f"results/{run}/{name}"] = (f"{run}/{name}", cfg)
    return out
