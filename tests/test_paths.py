"""Schedulers and Gaussian paths."""

import pytest
import torch

from models.paths import (
    SCHEDULERS,
    CondOTScheduler,
    GaussianPath,
    VEScheduler,
    VPScheduler,
    expand_like,
    make_scheduler,
    time_batch,
)

T_INNER = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)


def test_cond_ot_endpoints_exact():
    s = CondOTScheduler()(torch.tensor([0.0, 1.0]))
    assert s.alpha.tolist() == [0.0, 1.0]
    assert s.sigma.tolist() == [1.0, 0.0]
    assert s.d_alpha.tolist() == [1.0, 1.0]
    assert s.d_sigma.tolist() == [-1.0, -1.0]


def test_vp_and_ve_endpoints_approximately_right():
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    vp = VPScheduler()(ends)
    assert vp.alpha[0] < 0.01 and vp.sigma[0] > 0.9999
    assert vp.alpha[1] == 1.0 and vp.sigma[1] == 0.0
    torch.testing.assert_close(vp.alpha**2 + vp.sigma**2, torch.ones_like(ends))
    ve = VEScheduler(sigma_min=0.01, sigma_max=50.0)(ends)
    assert ve.alpha.tolist() == [1.0, 1.0]
    torch.testing.assert_close(ve.sigma, torch.tensor([50.0, 0.01], dtype=torch.float64))


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_derivatives_match_finite_differences(name):
    scheduler = make_scheduler(name)
    h = 1e-6
    # DDPM's schedule is smooth between its steps, with a kink at each: probe midway (NCSN's levels
    # lie on the smooth VE path)
    t = T_INNER + 0.5 / scheduler.timesteps if "discrete_time" in scheduler.provides else T_INNER
    up, down, mid = scheduler(t + h), scheduler(t - h), scheduler(t)
    torch.testing.assert_close(mid.d_alpha, (up.alpha - down.alpha) / (2 * h), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mid.d_sigma, (up.sigma - down.sigma) / (2 * h), rtol=1e-5, atol=1e-6)


def test_vp_keeps_variance_preserved_inside():
    s = VPScheduler()(T_INNER)
    torch.testing.assert_close(s.alpha**2 + s.sigma**2, torch.ones_like(T_INNER))


def test_make_scheduler_rejects_unknown_name_listing_choices():
    with pytest.raises(ValueError, match="cond_ot"):
        make_scheduler("linear")
    assert isinstance(make_scheduler("vp", beta_max=10.0), VPScheduler)


def test_path_sample_interpolates_and_differentiates():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, 4, 4, generator=g), torch.randn(5, 3, 4, 4, generator=g)
    t = torch.rand(5, generator=g)
    sample = GaussianPath(CondOTScheduler()).sample(x0, x1, t)
    tt = expand_like(t, x0)
    assert tt.shape == (5, 1, 1, 1)
    torch.testing.assert_close(sample.x_t, tt * x1 + (1 - tt) * x0)
    torch.testing.assert_close(sample.dx_t, x1 - x0)
    assert sample.t is t and sample.x0 is x0 and sample.x1 is x1


def test_time_batch_broadcasts_scalars():
    x = torch.zeros(4, 2, dtype=torch.float64)
    assert time_batch(0.5, x).tolist() == [0.5] * 4
    assert time_batch(torch.tensor(0.25), x).dtype == torch.float64
    assert time_batch(torch.arange(4.0), x).tolist() == [0.0, 1.0, 2.0, 3.0]
