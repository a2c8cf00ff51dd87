"""Schedules over training: LR warmup and warmdown (by steps, by fraction, or by the wall-clock
budget) with an optional floor, Muon momentum warmup, and when depth recurrence switches on."""

from __future__ import annotations

from pgolf.errors import ConfigError


def progress(cfg: dict, step: int, elapsed_s: float) -> float:
    """Fraction of training done: of the wall-clock budget when there is one, else of the iterations."""
    if cfg["max_wallclock_seconds"] > 0:
        return min(elapsed_s / cfg["max_wallclock_seconds"], 1.0)
    return min(step / cfg["iterations"], 1.0)


def _warmdown(cfg: dict, step: int, elapsed_s: float) -> float:
    """1 before the warmdown, falling linearly to 0 at the end of training."""
    if cfg["warmdown_frac"] > 0:
        return min(1.0, (1.0 - progress(cfg, step, elapsed_s)) / cfg["warmdown_frac"])
    n = cfg["warmdown_steps"]
    if n <= 0:
        return 1.0
    if cfg["max_wallclock_seconds"] > 0:
        # The warmdown starts when the time left equals warmdown_steps at the average step time so
        # far, so the run ends at the floor exactly when the budget runs out.
        step_s = elapsed_s / max(step, 1)
        left = max(cfg["max_wallclock_seconds"] - elapsed_s, 0.0)
        return min(1.0, left / max(n * step_s, 1e-9))
    return min(1.0, max(cfg["iterations"] - step, 0) / n)


def lr_scale(cfg: dict, step: int, elapsed_s: float) -> float:
    """Multiplier on every group's base LR at `step` (0-based), given the training time so far."""
    warm = min(1.0, (step + 1) / cfg["warmup_steps"]) if cfg["warmup_steps"] else 1.0
    floor, down = cfg["min_lr_scale"], _warmdown(cfg, step, elapsed_s)
    if cfg["min_lr_mode"] == "clamp":  # the full slope, cut off at the floor (PR #1787's MIN_LR)
        return warm * max(down, floor)
    return warm * (floor + (1.0 - floor) * down)


def muon_momentum(cfg: dict, step: int) -> float:
    n = cfg["muon_momentum_warmup_steps"]
    frac = min(step / n, 1.0) if n else 1.0
    return (1 - frac) * cfg["muon_momentum_warmup_start"] + frac * cfg["muon_momentum"]


def recurrence_on(model_cfg: dict, cfg: dict, step: int, elapsed_s: float) -> bool:
    """Whether the looped blocks run their extra passes at `step` (always, once switched on)."""
    if model_cfg["recur_start_frac"] > 0:
        return progress(cfg, step, elapsed_s) >= model_cfg["recur_start_frac"]
    return step >= model_cfg["recur_start_step"]


def grad_accum_steps(train: dict, world_size: int) -> int:
    """Micro-steps per optimizer step so the global batch is the same for any process count."""
    seqs = train["batch_tokens"] // train["seq_len"]
    if seqs % world_size:
        raise ConfigError(f"train: {seqs} sequences per batch do not split over {world_size} processes")
    local = seqs // world_size
    micro = min(train["micro_batch_seqs"], local)
    if local % micro:
        raise ConfigError(f"train: {local} sequences per process are not a multiple of micro_batch_seqs={micro}")
    return local // micro
