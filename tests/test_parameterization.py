"""Conversions between velocity / epsilon / x1 / score predictions."""

import itertools

import pytest
import torch
from torch import nn

from models.parameterization import PARAMETERIZATIONS, Denoiser, convert
from models.paths import SCHEDULERS, CondOTScheduler, GaussianPath, make_scheduler

T_INNER = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("source,target", list(itertools.permutations(PARAMETERIZATIONS, 2)))
def test_round_trip(name, source, target):
    scheduler = make_scheduler(name)
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(len(T_INNER), 3, dtype=torch.float64, generator=g)
    pred = torch.randn(len(T_INNER), 3, dtype=torch.float64, generator=g)
    there = convert(pred, x_t, T_INNER, scheduler, source, target)
    back = convert(there, x_t, T_INNER, scheduler, target, source)
    torch.testing.assert_close(back, pred, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_true_velocity_recovers_the_pair(name):
    scheduler = make_scheduler(name)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(len(T_INNER), 2, 3, dtype=torch.float64, generator=g)
    x1 = torch.randn(len(T_INNER), 2, 3, dtype=torch.float64, generator=g)
    sample = GaussianPath(scheduler).sample(x0, x1, T_INNER)
    args = (sample.dx_t, sample.x_t, T_INNER, scheduler, "velocity")
    torch.testing.assert_close(convert(*args, "epsilon"), x0)
    torch.testing.assert_close(convert(*args, "x1"), x1)
    sigma = scheduler(T_INNER).sigma.reshape(-1, 1, 1)
    torch.testing.assert_close(convert(*args, "score"), -x0 / sigma)


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_endpoints_stay_finite(t):
    x = torch.randn(4, 2)
    for source, target in itertools.permutations(PARAMETERIZATIONS, 2):
        out = convert(torch.randn(4, 2), x, torch.full((4,), t), CondOTScheduler(), source, target)
        assert torch.isfinite(out).all(), (source, target)


class _Affine(nn.Module):
    """net(x, t) = x * t, easy to check by hand."""

    def forward(self, x, t):
        return x * t[:, None]


def test_denoiser_accepts_float_time_and_converts():
    model = Denoiser(_Affine(), CondOTScheduler(), "x1")
    x = torch.randn(3, 2)
    torch.testing.assert_close(model(x, 0.5), 0.5 * x)
    # x1_hat = x/2 at t=1/2 -> eps = (x - x/4) / (1/2) = 1.5 x ; v = x1 - eps = -x
    torch.testing.assert_close(model.epsilon(x, 0.5), 1.5 * x)
    torch.testing.assert_close(model.velocity(x, torch.tensor(0.5)), -x)
    torch.testing.assert_close(model.score(x, 0.5), -3.0 * x)
    torch.testing.assert_close(model.x1(x, 0.5), 0.5 * x)


def test_unknown_parameterization_rejected():
    with pytest.raises(ValueError, match="velocity"):
        Denoiser(_Affine(), CondOTScheduler(), "noise")
