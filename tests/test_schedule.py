import pytest

from pgolf.config import validate
from pgolf.train.schedule import lr_scale, muon_momentum


def cfg(**train):
    return validate({"train": {"iterations": 100, "warmup_steps": 10, "warmdown_steps": 20, **train}})["train"]


def test_step_schedule_warms_up_holds_and_decays_to_zero():
    c = cfg()
    assert lr_scale(c, 0, 0) == pytest.approx(0.1)
    assert lr_scale(c, 9, 0) == 1.0 and lr_scale(c, 50, 0) == 1.0
    assert lr_scale(c, 90, 0) == pytest.approx(0.5)
    assert lr_scale(c, 99, 0) == pytest.approx(0.05)


def test_wallclock_schedule_reaches_zero_when_the_budget_ends():
    c = cfg(warmup_steps=0, max_wallclock_seconds=100.0)
    # 1 s per step so far: 20 warmdown steps take 20 s, so decay starts with 20 s left
    assert lr_scale(c, 50, 50.0) == 1.0
    assert lr_scale(c, 90, 90.0) == pytest.approx(0.5)
    assert lr_scale(c, 100, 100.0) == 0.0


def test_muon_momentum_warms_up_linearly():
    c = cfg(muon_momentum_warmup_start=0.85, muon_momentum=0.95, muon_momentum_warmup_steps=10)
    assert muon_momentum(c, 0) == pytest.approx(0.85)
    assert muon_momentum(c, 5) == pytest.approx(0.90)
    assert muon_momentum(c, 50) == pytest.approx(0.95)
