"""Learning-rate and momentum schedules of the baseline: warmup, then a linear warmdown to zero."""

from __future__ import annotations


def lr_scale(cfg: dict, step: int, elapsed_s: float) -> float:
    """Multiplier on every group's base LR at `step` (0-based), given the training time so far.

    With a wall-clock budget the warmdown starts when the time left equals warmdown_steps at the
    average step time measured so far, so the run ends at zero LR exactly when the budget runs out.
    """
    warm = min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else 1.0
    n = cfg["warmdown_steps"]
    if n <= 0:
        return warm
    if cfg["max_wallclock_seconds"] > 0:
        step_s = elapsed_s / max(step, 1)
        left = max(cfg["max_wallclock_seconds"] - elapsed_s, 0.0)
        return warm * min(1.0, left / max(n * step_s, 1e-9))
    return warm * min(1.0, max(cfg["iterations"] - step, 0) / n)


def muon_momentum(cfg: dict, step: int) -> float:
    n = cfg["muon_momentum_warmup_steps"]
    frac = min(step / n, 1.0) if n else 1.0
    return (1 - frac) * cfg["muon_momentum_warmup_start"] + frac * cfg["muon_momentum"]
