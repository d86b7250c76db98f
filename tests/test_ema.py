"""Exponential moving average of weights."""

import pytest
import torch
from torch import nn

from models.ema import EMA


def linear(value: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(value)
        net[1].running_mean.fill_(value)
    return net


def test_update_without_warmup_is_plain_ema():
    model = linear(1.0)
    ema = EMA(model, decay=0.9, warmup=False)
    trained = linear(3.0)
    ema.update(trained)
    ema.update(trained)
    # 1 -> 0.9*1 + 0.1*3 = 1.2 -> 0.9*1.2 + 0.1*3 = 1.38
    for p in ema.shadow.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1.38))
    torch.testing.assert_close(ema.shadow[1].running_mean, torch.full((2,), 3.0))  # buffers copied


def test_warmup_decay_schedule():
    ema = EMA(linear(0.0), decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)
    ema.update(linear(10.0))
    # first update used decay 0.1: 0.1*0 + 0.9*10 = 9
    torch.testing.assert_close(ema.shadow[0].weight, torch.full((2, 2), 9.0))
    assert ema.current_decay() == pytest.approx(2 / 11)
    ema.num_updates = 10**6
    assert ema.current_decay() == 0.999


def test_shadow_is_independent_and_frozen():
    model = linear(1.0)
    ema = EMA(model)
    with torch.no_grad():
        model[0].weight.fill_(5.0)
    assert torch.all(ema.shadow[0].weight == 1.0)
    assert not any(p.requires_grad for p in ema.shadow.parameters())


def test_state_dict_round_trip_and_copy_to():
    ema = EMA(linear(1.0), decay=0.5, warmup=False)
    ema.update(linear(3.0))
    other = EMA(linear(0.0))
    other.load_state_dict(ema.state_dict())
    assert (other.decay, other.warmup, other.num_updates) == (0.5, False, 1)
    target = linear(0.0)
    other.copy_to(target)
    torch.testing.assert_close(target[0].weight, torch.full((2, 2), 2.0))
