"""How a stage runs its model on a device: the autocast precision and torch.compile.

Device and dtype are data here, never branches: training, the bench, evaluation, TTT and
calibration all enter `autocast(device, precision)`, and a CPU run with `precision: bf16` executes
the same lines a GPU does (CPU autocast supports bf16), so CPU tests cover them.
"""

from __future__ import annotations

import torch
from torch import nn

from pgolf.errors import PgolfError

PRECISIONS = ("auto", "bf16", "fp32")


def bf16(device: torch.device, precision: str) -> bool:
    """Whether matmuls run in bf16: `auto` means on CUDA (the records' setting) and float32 on CPU."""
    if precision not in PRECISIONS:
        raise PgolfError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(device: torch.device, precision: str = "auto") -> torch.autocast:
    """The one mixed-precision context of every stage that runs the model."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16(device, precision))


def compiled(model: nn.Module, setting: str | bool, device: torch.device) -> nn.Module:
    """torch.compile(model) when `setting` is true, or `auto` on CUDA; the model itself otherwise.
    The compiled module shares the model's parameters, so in-place updates reach both."""
    on = device.type == "cuda" if setting == "auto" else bool(setting)
    return torch.compile(model) if on else model
