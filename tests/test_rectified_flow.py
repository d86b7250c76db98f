"""Rectified flow: straightness, reflow on a Gaussian -> Gaussian task whose straight map is
known, and one-step distillation (models.rectified_flow, models.pairs paired rows)."""

from __future__ import annotations

import math

import pytest
import torch

from models.ema import EMA
from models.networks import MLP
from models.objectives import make_objective
from models.pairs import PairSampler
from models.parameterization import Denoiser
from models.paths import CondOTScheduler
from models.rectified_flow import straightness
from models.solvers import solve_ode
from models.training import optimizer_step

MEAN = torch.tensor([2.0, -1.0])
SCALE = torch.tensor([0.25, 2.0])  # far from 1: 1-RF's paths bend (its marginals' std is not linear in t)


class Field(torch.nn.Module):
    """A closed-form velocity field net(x, t) (a Denoiser's network)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x, t):
        return self.fn(x, t)


def flow(fn) -> Denoiser:
    return Denoiser(Field(fn), CondOTScheduler(), "velocity")


def test_a_constant_field_is_straight_and_a_turning_one_is_not() -> None:
    x0 = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    shift = torch.tensor([1.0, 3.0])
    s, x1 = straightness(flow(lambda x, t: shift.expand_as(x)), x0, steps=20)
    assert s == pytest.approx(0.0, abs=1e-9) and torch.allclose(x1, x0 + shift, atol=1e-5)
    # a rotation: the chord is shorter than the path it follows
    rotate = flow(lambda x, t: torch.stack([-x[:, 1], x[:, 0]], dim=1))
    assert straightness(rotate, x0, steps=200)[0] > 0.1


def train_flow(pairs: PairSampler, steps: int, objective: str = "flow_matching", start: Denoiser | None = None,
               seed: int = 0) -> Denoiser:
    torch.manual_seed(seed)
    model = Denoiser(MLP(2, hidden=64, layers=3, time_dim=16), CondOTScheduler(), "velocity")
    if start is not None:
        model.load_state_dict(start.state_dict())
    loss_of = make_objective(objective, model)
    ema = EMA(model, decay=0.99)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for batch in pairs.stream(0, steps, prefetch=0):
        optimizer_step(loss_of.loss(model, batch), model, optimizer, ema, 3e-3, 1.0)
    ema.copy_to(model)
    return model.eval()


def ode_pairs(model: Denoiser, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return z, solve_ode(model.velocity, z, "rk4", steps=50).x


def one_step_error(model: Denoiser, n: int = 2000) -> float:
    """Mean squared distance of one Euler step from z to the straight map's image MEAN + SCALE z."""
    z = torch.randn(n, 2, generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        return float((z + model.velocity(z, 0.0) - (MEAN + SCALE * z)).pow(2).sum(1).mean())


def test_reflow_on_gaussians_straightens_the_flow_and_distillation_fits_one_step() -> None:
    data = MEAN + SCALE * torch.randn(4000, 2, generator=torch.Generator().manual_seed(1))
    first = train_flow(PairSampler(data, 256, seed=0), 600)
    z, x = ode_pairs(first, 4000, seed=2)
    second = train_flow(PairSampler(x, 256, source=z, paired=True, seed=1), 400, start=first)
    draws = torch.randn(1000, 2, generator=torch.Generator().manual_seed(3))
    s1, s2 = straightness(first, draws)[0], straightness(second, draws)[0]
    e1, e2 = one_step_error(first), one_step_error(second)
    assert s2 < 0.2 * s1, (s1, s2)  # 2-RF's paths are nearly straight
    assert e2 < 0.2 * e1, (e1, e2)  # so one Euler step nearly lands on the straight map
    # one-step distillation on 2-RF's own couplings fits z + v(z, 0) to where 2-RF's ODE goes
    z2, x2 = ode_pairs(second, 4000, seed=4)
    student = train_flow(PairSampler(x2, 256, source=z2, paired=True, seed=2), 300, "one_step_distillation", second)
    assert one_step_error(student) < e2, (one_step_error(student), e2)


def test_one_step_distillation_regresses_the_velocity_at_time_zero_only() -> None:
    z = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    x = MEAN + SCALE * z
    batch = PairSampler(x, 64, source=z, paired=True).batch(0)
    exact = flow(lambda y, t: torch.where(t[:, None] == 0, MEAN + (SCALE - 1) * y, torch.full_like(y, math.nan)))
    assert make_objective("one_step_distillation", exact).loss(exact.net, batch).item() == pytest.approx(0, abs=1e-10)


def test_paired_rows_share_one_index() -> None:
    x0, x1 = torch.arange(10.0)[:, None], 100 + torch.arange(10.0)[:, None]
    batch = PairSampler(x1, 32, source=x0, paired=True, seed=5).batch(3)
    assert torch.equal(batch.x1 - batch.x0, torch.full_like(batch.x0, 100.0))
    with pytest.raises(ValueError, match="as many rows"):
        PairSampler(x1, 4, source=x0[:5], paired=True)
