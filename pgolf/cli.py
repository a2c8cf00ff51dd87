"""`pgolf <stage> ...`: one subcommand per pipeline stage (pgolf/pipeline/stages.py), and the tools
beside them. Each stage module owns its arguments."""

from __future__ import annotations

import importlib
import sys

from pgolf import errors
from pgolf.pipeline.stages import commands
from pgolf.runtime import process

# Commands that are no pipeline stage: "module:function" taking argv.
TOOLS = {
    "audit": ("pgolf.eval.audit", "check a run's evaluation is causal: losses before t ignore tokens after t"),
    "check": ("pgolf.report.check", "audit a record folder: bytes, time, seeds, significance, data, score-first"),
    "config": ("pgolf.config_cli", "validate config files and print the resolved config"),
    "params": ("pgolf.config_cli:params_cli", "parameter count of a config (config.yaml plus presets)"),
    "bench-loader": ("pgolf.train.loader:bench_cli", "tokens/s of the training loader alone, per mode"),
    "bench": ("pgolf.train.bench", "ms/step, tokens/s, MFU and peak memory of a config's training step"),
    "launch": ("pgolf.runtime.launch", "torchrun (same arguments) whose log ends with a stage's one-line error"),
}


def table() -> dict[str, tuple[str, str]]:
    """subcommand -> ("module:function", help); imported lazily so `pgolf --help` is fast."""
    return {**{name: (s.entry, s.help) for name, s in commands().items()}, **TOOLS}


def _usage(entries: dict[str, tuple[str, str]]) -> str:
    width = max(map(len, entries))
    lines = ["usage: pgolf <stage> [options]", "", "stages:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in entries.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    entries = table()
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(entries))
        return
    if argv[0] not in entries:
        sys.exit(f"pgolf: unknown stage {argv[0]!r}\n\n{_usage(entries)}")
    module, _, func = entries[argv[0]][0].partition(":")
    if process.under_torchrun():  # armed first thing: torchrun's processes outlive a hard kill of torchrun otherwise
        process.die_with_parent()
    try:
        getattr(importlib.import_module(module), func or "cli")(argv[1:])
    except Exception as e:  # the one place a stage's known error becomes its one line and exit status 1
        message = errors.known_message(e)
        if message is None or errors.show_traceback():
            raise
        errors.report(argv[0], message)
        sys.exit(1)
