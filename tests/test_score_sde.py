"""Score SDEs and NCSN against closed forms.

The model is the exact epsilon (hence score) of Gaussian data x1 ~ N(M, S) on each path
(`test_diffusion.exact_model`), so every sampler fed it must land on the data's moments; the
SDE coefficients are checked against Song et al. 2021's formulas and the perturbation kernels
against a simulation of the forward SDE.
"""

import math

import pytest
import torch

from models.ncsn import NoiseConditionalScoreMatching
from models.objectives import make_objective
from models.pairs import Batch
from models.paths import NCSNScheduler, SubVPScheduler, VEScheduler, VPScheduler
from models.samplers import get_sampler, sample_with, settings_for, time_grid
from models.score_sde import TRAIN_EPS, sde_at
from test_diffusion import EYE, D, M, S, exact_model, moments, setting, whitened_normal

PATHS = {"ve": lambda: VEScheduler(0.01, 20.0), "vp": VPScheduler, "subvp": SubVPScheduler}


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the SDEs


@pytest.mark.parametrize("t", [0.0, 0.3, 0.9, 0.999])
def test_drift_and_diffusion_are_song_et_al_s(t):
    """VE: f = 0, g^2 = 2 sigma^2 log(sigma_max / sigma_min) (Eq. 9 / 30); VP: f = -beta / 2,
    g^2 = beta (Eq. 11 / 32); sub-VP: f = -beta / 2, g^2 = beta (1 - exp(-2 B)) (Eq. 29), with
    beta and B in diffusion time s = 1 - t."""
    s = 1 - t
    beta = 0.1 + (20.0 - 0.1) * s
    big_b = 0.1 * s + 0.5 * (20.0 - 0.1) * s**2
    sigma_ve = 0.01 * (20.0 / 0.01) ** s
    expected = {"ve": (0.0, 2 * sigma_ve**2 * math.log(20.0 / 0.01)), "vp": (-beta / 2, beta),
                "subvp": (-beta / 2, beta * -math.expm1(-2 * big_b))}
    for name, make in PATHS.items():
        _, _, f, g2 = sde_at(make(), t)
        assert f == pytest.approx(expected[name][0], rel=1e-9, abs=1e-12), name
        assert g2 == pytest.approx(expected[name][1], rel=1e-6), name


@pytest.mark.parametrize("name", list(PATHS))
def test_perturbation_kernels_match_a_simulation_of_the_forward_sde(name):
    """From a fixed x1, 1000 Euler-Maruyama steps of dx = f x dtau + g dW from t = 1 down to t
    give N(alpha_t x1, sigma_t^2 I) at t = 0.5 and 0.1, within 4 standard errors of the
    simulated mean and variance (plus the O(dt) bias, 1e-2 relative)."""
    scheduler, n, steps = PATHS[name](), 10000, 1000
    start = 1.0 if name == "ve" else 1.0 - 1e-4  # VP's g^2 and f are finite at t = 1; sub-VP's too
    x1 = torch.tensor([1.5, -0.5], dtype=D)
    x = x1.expand(n, 2).clone()
    gen = torch.Generator().manual_seed(0)
    times = torch.linspace(start, 0.1, steps + 1, dtype=D).tolist()
    for t_b, t_a in zip(times[:-1], times[1:]):
        if abs(t_b - 0.5) < 0.5 * (t_b - t_a):
            check_kernel(scheduler, x, x1, t_b, n)
        _, _, f, g2 = sde_at(scheduler, t_b)
        dtau = t_b - t_a
        x = x + f * x * dtau + math.sqrt(g2 * dtau) * torch.randn(x.shape, generator=gen, dtype=D)
    check_kernel(scheduler, x, x1, 0.1, n)


def check_kernel(scheduler, x, x1, t, n):
    out = scheduler(torch.tensor(t, dtype=D))
    alpha, sigma = float(out.alpha), float(out.sigma)
    mean, cov = moments(x)
    assert (mean - alpha * x1).abs().max() <= 4 * sigma / math.sqrt(n) + 1e-2 * (alpha * x1.abs().max() + sigma)
    torch.testing.assert_close(cov, sigma**2 * EYE, atol=4 * sigma**2 * math.sqrt(2 / n) + 1e-2 * sigma**2, rtol=0)


# ------------------------------------------------------------------ samplers fed the exact score


@pytest.mark.parametrize("path,method,params,nfe", [
    ("vp", "euler_maruyama", {}, 500),
    ("vp", "reverse_diffusion", {}, 500),
    ("vp", "pc", {"corrector_steps": 1, "snr": 0.16}, 1000),
    ("subvp", "euler_maruyama", {}, 500),
    ("subvp", "pc", {"corrector_steps": 2, "predictor": "euler_maruyama", "snr": 0.1}, 900),
    ("ve", "euler_maruyama", {}, 500),
    ("ve", "reverse_diffusion", {}, 500),
    ("ve", "pc", {"corrector_steps": 1, "snr": 0.16}, 1000),
    ("ve", "heun", {}, 400),  # the probability-flow ODE (Song et al. Eq. 13) on the same models
    ("vp", "dopri5", {"atol": 1e-6, "rtol": 1e-6}, None),
])
def test_samplers_reach_the_data_moments(path, method, params, nfe):
    """Output mean and covariance equal M and S within 4 standard errors plus 0.03 (the
    discretization bias at these NFE). The SDE samplers start from the model's prior, whose
    mismatch (VE's N(0, sigma_max^2 I) is not N(M, S + sigma_max^2 I)) their noise forgets; the
    deterministic ODE would carry it to the end (by |M| sqrt(S) / sigma_max), so it starts from
    the exact marginal at t = 0, whitened, so only the solver's error remains (below 0.005)."""
    n = 10000
    model = exact_model(PATHS[path]())
    gen = torch.Generator().manual_seed(0)
    if method in ("heun", "dopri5"):
        s0 = model.scheduler(torch.zeros((), dtype=D))
        x = s0.alpha * M + whitened_normal(n) @ torch.linalg.cholesky(s0.alpha**2 * S + s0.sigma**2 * EYE).T
    else:
        x = model.prior((2,), n, gen)
    out = sample_with(setting(method, nfe, **params), model, x, torch.Generator().manual_seed(1))
    assert out.nfe == (nfe or out.nfe)
    mean, cov = moments(out.x)
    var = torch.diagonal(S)
    noisy, bias = (4.0, 0.03) if get_sampler(method).stochastic else (0.0, 0.005)
    assert ((mean - M).abs() <= noisy * (var / n).sqrt() + bias).all(), mean
    assert ((cov - S).abs() <= noisy * ((var[:, None] * var[None] + S**2) / n).sqrt() + bias).all(), cov


def test_annealed_langevin_reaches_the_data_moments():
    """NCSN's Alg. 1 with the exact score on 10 geometric levels (20 -> 0.01), 100 steps each and
    the final denoising step: the data's moments within 4 standard errors plus 0.03. The step
    size makes alpha_i / (2 var_i) = step_size / (2 sigma_L^2) = 1 at the large levels, the edge
    of stability (5e-4 diverges); smaller steps leave the last levels unmixed (2e-5: covariance
    off by 0.2)."""
    n = 20000
    model = exact_model(NCSNScheduler(0.01, 20.0, levels=10))
    st = setting("annealed_langevin", 1000, steps_per_level=100, step_size=2e-4)
    out = sample_with(st, model, model.prior((2,), n, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    assert out.nfe == 1001  # 10 levels x 100 steps + the denoising jump
    mean, cov = moments(out.x)
    var = torch.diagonal(S)
    assert ((mean - M).abs() <= 4 * (var / n).sqrt() + 0.03).all(), mean
    assert ((cov - S).abs() <= 4 * ((var[:, None] * var[None] + S**2) / n).sqrt() + 0.03).all(), cov


def test_too_few_langevin_steps_miss_the_data():
    """The same with one step a level cannot mix: its covariance is clearly off (the sampler is
    not secretly exact)."""
    model = exact_model(NCSNScheduler(0.01, 20.0, levels=10))
    out = sample_with(setting("annealed_langevin", 10, steps_per_level=1, step_size=2e-5, denoise=False), model,
                      model.prior((2,), 5000, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(1))
    assert (moments(out.x)[1] - S).abs().max() > 0.5


def test_one_reverse_diffusion_step_has_the_stated_law():
    """From one point x_a at t = 0.5 to 0.6 on VP: N((2 - alpha_ab) x_a + sigma_ab^2 score,
    sigma_ab^2 I) (Song et al. Eq. 46 / the VP algorithm's lines 3-5), within 4 standard errors."""
    model, n = exact_model(VPScheduler()), 20000
    x_a = torch.tensor([[0.3, -1.2]], dtype=D).expand(n, 2)
    a, b = (model.scheduler(torch.tensor(t, dtype=D)) for t in (0.5, 0.6))
    alpha_ab = float(a.alpha / b.alpha)
    var = float(a.sigma**2 - alpha_ab**2 * b.sigma**2)
    mean = (2 - alpha_ab) * x_a[:1] + var * model.score(x_a[:1], 0.5)
    states = []
    get_sampler("reverse_diffusion").fn(model, x_a, torch.tensor([0.5, 0.6, 0.9], dtype=D),
                                       torch.Generator().manual_seed(3), callback=lambda i, y: states.append(y))
    got_mean, got_cov = moments(states[0])
    assert ((got_mean - mean[0]).abs() < 4 * math.sqrt(var / n)).all()
    torch.testing.assert_close(got_cov, var * EYE, atol=4 * var * math.sqrt(2 / n), rtol=0)


# ------------------------------------------------------------------ grids, costs, labels


def test_pc_costs_one_plus_corrector_steps_per_step():
    """NFE counts every network evaluation: a PC step with M corrector steps costs 1 + M; an NFE
    that is not a multiple is refused naming the parameter values."""
    model = exact_model(VEScheduler(0.01, 20.0))
    x = model.prior((2,), 8, torch.Generator().manual_seed(0))
    for m, nfe in [(1, 20), (2, 30)]:
        out = sample_with(setting("pc", nfe, corrector_steps=m), model, x, torch.Generator().manual_seed(0))
        assert out.nfe == nfe
    with pytest.raises(ValueError, match="nfe: sampler 'pc' uses 3 evaluations per step with .*corrector_steps=2.*; 10"):
        settings_for("pc", [10], {"corrector_steps": 2})
    with pytest.raises(ValueError, match="corrector_steps: got 1.5; expected an integer"):
        settings_for("pc", [10], {"corrector_steps": 1.5})
    with pytest.raises(ValueError, match="denoise: got 1; expected one of True, False"):
        settings_for("annealed_langevin", [10], {"denoise": 1})


def test_labels_carry_every_parameter():
    labels = {s.label for s in settings_for("pc", [20, 40], {"snr": [0.1, 0.16], "corrector_steps": 1})}
    assert labels == {f"pc,nfe={n},predictor=reverse_diffusion,corrector_steps=1,snr={r}"
                      for n in (20, 40) for r in (0.1, 0.16)}


def test_ncsn_levels_are_geometric_and_the_grid_visits_them():
    """L levels sigma_max (sigma_min / sigma_max)^(j / L), j = 1..L, at t = j / L; a grid of L steps
    is the prior (t = 0) and every level; the objective trains on the levels only."""
    sched = NCSNScheduler(0.01, 10.0, levels=5)
    sigmas = sched(sched.level_times()).sigma
    torch.testing.assert_close(sigmas, 10.0 * (0.001 ** (torch.arange(1, 6, dtype=D) / 5)))
    torch.testing.assert_close(time_grid(sched, 5), torch.linspace(0, 1, 6, dtype=D))
    objective = make_objective("ncsn", exact_model(sched))
    assert isinstance(objective, NoiseConditionalScoreMatching)
    times = objective.times(torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=D))
    assert set(times.tolist()) == set(sched.level_times().tolist())


@pytest.mark.parametrize("name", ["ncsn", "score_sde"])
def test_dsm_is_the_epsilon_error_and_the_exact_score_minimises_it(name):
    """The loss is |eps_hat - eps|^2 (lambda = sigma^2 DSM); the exact model scores lower than a
    perturbed one on the same batch, and score_sde's times stay below 1 - TRAIN_EPS."""
    sched = NCSNScheduler(0.01, 20.0, levels=10) if name == "ncsn" else VPScheduler()
    gen = torch.Generator().manual_seed(0)
    x1 = M + torch.randn(4096, 2, generator=gen, dtype=D) @ torch.linalg.cholesky(S).T
    batch = Batch(step=0, x0=torch.randn(4096, 2, generator=gen, dtype=D), x1=x1,
                      t=torch.rand(4096, generator=gen, dtype=D))
    model = exact_model(sched)
    objective = make_objective(name, model)
    exact = objective.loss(model, batch)
    off = objective.loss(lambda x, t: model(x, t) + 0.1, batch)
    assert exact < off
    sample = objective.path.sample(batch.x0, batch.x1, objective.times(batch.t))
    torch.testing.assert_close(exact, ((model(sample.x_t, sample.t) - batch.x0) ** 2).mean())
    if name == "score_sde":
        assert objective.times(torch.ones(1, dtype=D)).item() == pytest.approx(1 - TRAIN_EPS)
