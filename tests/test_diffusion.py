"""DDPM / DDIM: samplers, posterior, bound and v-parameterization against closed forms.

The model is the exact epsilon-predictor for Gaussian data x1 ~ N(M, S): on any Gaussian path
x_t ~ N(alpha M, C_t), C_t = alpha^2 S + sigma^2 I, and E[eps | x_t] = sigma C_t^{-1} (x_t - alpha M).
Every C_t commutes with S, so everything is diagonal in S's eigenbasis.
"""

import itertools
import math

import pytest
import torch
from torch import nn

from models.ddpm import decoder_log_likelihood, posterior, variational_bound
from models.objectives import make_objective
from models.parameterization import PARAMETERIZATIONS, Denoiser, convert
from models.paths import CondOTScheduler, DDPMScheduler, VEScheduler, VPScheduler
from models.samplers import get_sampler, sample_with, settings_for, time_grid

D = torch.float64
M = torch.tensor([1.0, -2.0], dtype=D)
S = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=D)
LAM, U = torch.linalg.eigh(S)
EYE = torch.eye(2, dtype=D)


pytestmark = pytest.mark.usefixtures("one_thread")


class ExactEpsilon(nn.Module):
    """forward(x, t) = E[eps | x_t = x] for x1 ~ N(M, S), one time per sample."""

    def __init__(self, scheduler):
        super().__init__()
        self.scheduler = scheduler
        self.anchor = nn.Parameter(torch.zeros(()))  # samplers hook model.net's forward

    def forward(self, x, t):
        s = self.scheduler(t.double())
        a, sg = s.alpha[:, None], s.sigma[:, None]
        return ((x - a * M) @ U * sg / (a * a * LAM + sg * sg)) @ U.T


def exact_model(scheduler=None):
    scheduler = scheduler or DDPMScheduler("linear", 1000)
    return Denoiser(ExactEpsilon(scheduler), scheduler, "epsilon")


def whitened_normal(n, seed=0):
    """Draws with empirical mean 0 and covariance I exactly."""
    x = torch.randn(n, 2, dtype=D, generator=torch.Generator().manual_seed(seed))
    x = x - x.mean(0)
    chol = torch.linalg.cholesky(x.T @ x / n)
    return torch.linalg.solve_triangular(chol, x.T, upper=False).T


def moments(x):
    mean = x.mean(0)
    return mean, (x - mean).T @ (x - mean) / len(x)


def setting(method, nfe, **params):
    (only,) = settings_for(method, nfe and [nfe], params)
    return only


def flow_map(scheduler, x0):
    """Probability-flow ODE from t = 0 to 1: y = x - alpha M obeys y' = C'/2 C^{-1} y, and as the
    C_t commute, y_1 = S^{1/2} C_0^{-1/2} y_0 whatever happens in between."""
    s = scheduler(torch.zeros(1, dtype=D))
    a, sg = float(s.alpha), float(s.sigma)
    gain = U @ torch.diag((LAM / (a * a * LAM + sg * sg)).sqrt()) @ U.T
    return M + (x0 - a * M) @ gain.T


# ------------------------------------------------------------------ 1, 2: samplers


@pytest.mark.parametrize("method,params,mean_tol,cov_tol", [
    ("ancestral", {"variance": "small"}, 1e-3, 0.02),
    ("ancestral", {"variance": "large"}, 1e-3, 0.005),
    ("ddim", {"eta": 0.0}, 0.012, 0.01),
    ("ddim", {"eta": 1.0}, 1e-3, 0.02),
])
def test_samplers_reach_the_data_moments(method, params, mean_tol, cov_tol):
    """Linear T = 1000, S = 1000: output mean / covariance equal M / S within 4 standard errors
    (sqrt(S_ii / n), sqrt((S_ii S_jj + S_ij^2) / n); zero for deterministic DDIM on whitened draws,
    whose output moments are an affine image of exactly 0 / I) plus the discretization bias
    found by propagating the moments through the same affine-Gaussian steps exactly: covariance
    0.0144 (beta-tilde: small / eta = 1), 0.0029 (large), 0.0066 (eta = 0); mean 5e-5, except
    eta = 0 which keeps the prior mismatch alpha_T M (alpha_T = 0.0064) as an offset of 0.0097."""
    n = 20000
    st = setting(method, 1000, **params)
    out = sample_with(st, exact_model(), whitened_normal(n), torch.Generator().manual_seed(1))
    mean, cov = moments(out.x)
    var = torch.diagonal(S)
    noisy = 4.0 if get_sampler(method).stochastic and params.get("eta", 1.0) > 0 else 0.0
    assert ((mean - M).abs() <= noisy * (var / n).sqrt() + mean_tol).all(), mean
    assert ((cov - S).abs() <= noisy * ((var[:, None] * var[None] + S**2) / n).sqrt() + cov_tol).all(), cov


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_ddim_converges_to_the_probability_flow_map(schedule):
    """DDIM (eta = 0) from the same prior draws approaches the exact flow map as S grows, at
    first order: errors fall monotonically over S = 10, 50, 250, 1000, are below 1e-2 at
    S = 1000, and the observed order between S = 250 and 1000 is 1 +- 0.2."""
    model = exact_model(DDPMScheduler(schedule, 1000))
    x0 = torch.randn(64, 2, dtype=D, generator=torch.Generator().manual_seed(3))
    exact = flow_map(model.scheduler, x0)
    steps = [10, 50, 250, 1000]
    errors = [(sample_with(setting("ddim", s), model, x0).x - exact).abs().max().item() for s in steps]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-2, errors
    assert abs(math.log(errors[-2] / errors[-1]) / math.log(4) - 1) < 0.2, errors


def test_ode_solver_on_the_model_velocity_matches_the_flow_map():
    """rk4 on the 1000 training-step intervals of model.velocity lands on the closed-form map.
    Only to 2e-3: log abar is piecewise linear, its slope jumps at every knot, and the knot
    itself takes the noisier interval's slope (measured 7e-4; nudging the evaluation times
    inside the interval gives 1e-12)."""
    model = exact_model()
    x0 = torch.randn(16, 2, dtype=D, generator=torch.Generator().manual_seed(4))
    out = sample_with(setting("rk4", 4000), model, x0)
    torch.testing.assert_close(out.x, flow_map(model.scheduler, x0), atol=2e-3, rtol=0)


@pytest.mark.parametrize("method,params", [("ddim", {"eta": 0.5}), ("ancestral", {"variance": "small"}),
                                           ("ancestral", {"variance": "large"})])
def test_one_step_has_the_stated_conditional_law(method, params):
    """From one point x_a at t = 0.5 to 0.6 (i = 500 -> 400): N(c_xa x_a + c_x1 x1_hat, var) with
    var = beta~ (small) or 1 - abar_500 / abar_400 (large), and for DDIM the mean
    alpha_b x1_hat + sqrt(sigma_b^2 - c^2) eps_hat, c^2 = eta^2 beta~ (Song et al. Eq. 12, 16);
    checked within 4 standard errors of mean and variance over n draws. A final step onto the
    data (t = 1) adds no noise: it returns x1_hat itself."""
    model, n = exact_model(), 20000
    x_a = torch.tensor([[0.3, -1.2]], dtype=D).expand(n, 2)
    x1_hat, eps_hat = model.pivot(x_a[:1], 0.5)
    q = posterior(model.scheduler, 0.5, 0.6)
    if method == "ddim":
        var = params["eta"] ** 2 * q.var_small
        b = model.scheduler(torch.tensor(0.6, dtype=D))
        mean = b.alpha * x1_hat + (b.sigma**2 - var).sqrt() * eps_hat
    else:
        var = q.var_small if params["variance"] == "small" else q.var_large
        mean = q.c_xa * x_a[:1] + q.c_x1 * x1_hat
    fn = get_sampler(method).fn
    states = []
    fn(model, x_a, torch.tensor([0.5, 0.6, 0.9], dtype=D), torch.Generator().manual_seed(10),
       callback=lambda i, y: states.append(y), **params)
    got_mean, got_cov = moments(states[0])
    assert ((got_mean - mean[0]).abs() < 4 * math.sqrt(var / n)).all(), (got_mean, mean)
    torch.testing.assert_close(got_cov, var * EYE, atol=4 * var * math.sqrt(2 / n), rtol=0)
    last = fn(model, x_a[:4], torch.tensor([0.5, 1.0], dtype=D), torch.Generator().manual_seed(11), **params)
    torch.testing.assert_close(last, x1_hat.expand(4, 2), atol=1e-12, rtol=0)


# ------------------------------------------------------------------ 3: the bound


def expected_bound(scheduler):
    """E over x ~ N(M, S) and the noise of L_T + sum_{i>=2} L_{i-1} + L_0 for the exact model:
    L_{i-1} averages to (SNR_{i-1} - SNR_i) mmse_i / 2 (Kingma et al. 2021, Eq. 13), with
    mmse_i = tr Cov(x | x_i) = tr(S - abar_i S C_i^{-1} S); L_0 to log(2 pi beta_1) + mmse_1 / (2 beta_1)."""
    ab = scheduler.log_alpha_bar.exp()
    snr = ab / (1 - ab)
    mmse = [float(torch.trace(S - a * S @ torch.linalg.solve(a * S + (1 - a) * EYE, S))) for a in ab.tolist()]
    ab_t = float(ab[-1])
    prior = float((0.5 * (-math.log1p(-ab_t) - ab_t + ab_t * (torch.diagonal(S) + M**2))).sum())
    beta1 = float(scheduler.betas[0])
    decoder = math.log(2 * math.pi * beta1) + mmse[1] / (2 * beta1)
    middle = sum(0.5 * float(snr[i - 1] - snr[i]) * mmse[i] for i in range(2, len(ab)))
    return prior + decoder + middle


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_variational_bound_matches_its_expectation_and_exceeds_the_entropy(schedule):
    """T = 100, continuous data: the closed-form expected bound exceeds the entropy
    E[-log N(x; M, S)] = log det(2 pi e S) / 2 (cross-entropy >= entropy); the all-terms and the
    stratified (terms = 32) estimates each match it within 4 standard errors, so they agree;
    and the mean of bound(x) + log N(x; M, S) is not below 0 beyond 4 standard errors."""
    model = exact_model(DDPMScheduler(schedule, 100))
    n = 20000
    x = M + torch.randn(n, 2, dtype=D, generator=torch.Generator().manual_seed(5)) @ torch.linalg.cholesky(S).T
    nll = -torch.distributions.MultivariateNormal(M, S).log_prob(x)
    expected = expected_bound(model.scheduler)
    assert expected > 0.5 * float(torch.logdet(2 * math.pi * math.e * S)) + 1.0
    for seed, terms in [(1, None), (2, 32)]:
        bound = variational_bound(model, x, torch.Generator().manual_seed(seed), None, terms)
        assert abs(bound.mean().item() - expected) < 4 * bound.std().item() / math.sqrt(n), (terms, expected)
        gap = bound - nll
        assert gap.mean().item() > -4 * gap.std().item() / math.sqrt(n), terms


@pytest.mark.parametrize("mean", [-50.0, -1.3, -0.2, 0.0, 0.37, 1.0, 3.0, 1e4])
@pytest.mark.parametrize("std", [1e-3, 0.05, 2.0])
def test_decoder_bin_masses_sum_to_one(mean, std):
    """Discretized decoder over all 17 levels of [-1, 1]: the bin masses are Phi differences
    (edges at the midpoints, outer bins open), sum to 1, and stay finite (no log 0) far out."""
    levels = torch.linspace(-1, 1, 17, dtype=D)[:, None]
    log_mass = decoder_log_likelihood(levels, torch.full_like(levels, mean), std, 17)
    assert torch.isfinite(log_mass).all()
    assert abs(log_mass.exp().sum().item() - 1) < 1e-12
    edges = torch.cat([torch.tensor([-math.inf], dtype=D), (levels[1:, 0] + levels[:-1, 0]) / 2,
                       torch.tensor([math.inf], dtype=D)])
    cdf = torch.special.ndtr((edges - mean) / std)
    torch.testing.assert_close(log_mass.exp(), cdf[1:] - cdf[:-1], atol=1e-13, rtol=1e-10)


# ------------------------------------------------------------------ 4: the posterior


def test_posterior_of_consecutive_steps_is_ho_eq7():
    """q(x_{i-1} | x_i, x_0): sqrt(abar_{i-1}) beta_i / (1 - abar_i) on x_0,
    sqrt(alpha_i) (1 - abar_{i-1}) / (1 - abar_i) on x_i, beta-tilde; var_large = beta_i."""
    for schedule in ["linear", "cosine"]:
        sched = DDPMScheduler(schedule, 1000)
        ab = sched.log_alpha_bar.exp()
        for i in [1, 2, 3, 10, 500, 999, 1000]:
            q = posterior(sched, 1 - i / 1000, 1 - (i - 1) / 1000)
            beta = float(sched.betas[i - 1])
            want = (math.sqrt(1 - beta) * (1 - ab[i - 1]) / (1 - ab[i]), math.sqrt(ab[i - 1]) * beta / (1 - ab[i]),
                    (1 - ab[i - 1]) / (1 - ab[i]) * beta, beta)
            got = (q.c_xa, q.c_x1, q.var_small, q.var_large)
            assert got == pytest.approx([float(w) for w in want], rel=1e-9, abs=1e-15), (schedule, i)


@pytest.mark.parametrize("scheduler", [VPScheduler(), CondOTScheduler(), VEScheduler(0.01, 50.0)],
                         ids=["vp", "cond_ot", "ve"])
def test_posterior_is_gaussian_conditioning(scheduler):
    """Markov chain x_b = alpha_b x1 + sigma_b e1, x_a = (alpha_a / alpha_b) x_b + sigma_ab e2 with
    the marginals of the path: regressing x_b on (x1, x_a) through the numerical 3x3 joint
    covariance (Schur complement) gives the posterior's coefficients and variance."""
    for t_a, t_b in [(0.1, 0.3), (0.45, 0.5), (0.2, 0.9), (0.7, 0.95)]:
        s = scheduler(torch.tensor([t_a, t_b], dtype=D))
        (al_a, al_b), (sg_a, sg_b) = s.alpha.tolist(), s.sigma.tolist()
        ratio = al_a / al_b
        # rows: x1, x_a, x_b as linear maps of independent (x1, e1, e2), all unit variance
        mix = torch.tensor([[1.0, 0.0, 0.0], [al_a, ratio * sg_b, math.sqrt(sg_a**2 - (ratio * sg_b) ** 2)],
                            [al_b, sg_b, 0.0]], dtype=D)
        joint = mix @ mix.T
        coef = torch.linalg.solve(joint[:2, :2], joint[:2, 2])
        var = joint[2, 2] - joint[2, :2] @ coef
        q = posterior(scheduler, t_a, t_b)
        assert (q.c_x1, q.c_xa, q.var_small) == pytest.approx([*coef.tolist(), var.item()], rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------ 5: v and the ddpm objective


@pytest.mark.parametrize("scheduler", [CondOTScheduler(), VPScheduler(), DDPMScheduler("cosine", 1000)],
                         ids=["cond_ot", "vp", "ddpm"])
def test_v_parameterization(scheduler):
    """From v = alpha eps - sigma x1 at x_t = alpha x1 + sigma eps, convert recovers x1, eps, the
    velocity d_alpha x1 + d_sigma eps and the score -eps / sigma, and every target converts back
    to v. On variance-preserving paths (alpha = cos phi) the velocity is phi'(t) v with
    phi' = alpha d_sigma - sigma d_alpha (Salimans & Ho 2022: v = dx / dphi)."""
    g = torch.Generator().manual_seed(6)
    t = torch.linspace(0.05, 0.95, 10, dtype=D)
    x1, eps = (torch.randn(10, 3, dtype=D, generator=g) for _ in range(2))
    s = scheduler(t[:, None])
    x_t, v = s.alpha * x1 + s.sigma * eps, s.alpha * eps - s.sigma * x1
    want = {"x1": x1, "epsilon": eps, "velocity": s.d_alpha * x1 + s.d_sigma * eps, "score": -eps / s.sigma, "v": v}
    assert set(want) == set(PARAMETERIZATIONS)
    for target in PARAMETERIZATIONS:
        there = convert(v, x_t, t, scheduler, "v", target)
        torch.testing.assert_close(there, want[target], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(convert(there, x_t, t, scheduler, target, "v"), v, rtol=1e-9, atol=1e-9)
    if not isinstance(scheduler, CondOTScheduler):
        torch.testing.assert_close(want["velocity"], (s.alpha * s.d_sigma - s.sigma * s.d_alpha) * v)


def test_ddpm_objective_times_are_the_training_steps():
    """u on a uniform grid of 7 T points (float64) and float32 draws up to 1 - 2^-24: every time is
    exactly 1 - i / T for some i in 1..T (never the data, t = 1), and each step gets 7 of them."""
    big_t = 50
    objective = make_objective("ddpm", exact_model(DDPMScheduler("linear", big_t)))
    grid = set(objective.model.scheduler.time_of(torch.arange(1, big_t + 1)).tolist())
    times = objective.times((torch.arange(7 * big_t, dtype=D) + 0.5) / (7 * big_t))
    values, counts = torch.unique(times, return_counts=True)
    assert set(values.tolist()) == grid and (counts == 7).all()
    u32 = torch.cat([torch.rand(1000, generator=torch.Generator().manual_seed(7)), torch.tensor([0.0, 1 - 2**-24])])
    assert set(objective.times(u32).double().tolist()) <= set(torch.tensor(sorted(grid)).float().double().tolist())


# ------------------------------------------------------------------ 6: grids, labels, NFE


@pytest.mark.parametrize("spacing,steps", [*itertools.product(["trailing", "leading"], [1, 7, 10, 50, 300, 999, 1000]),
                                           ("quadratic", 10), ("quadratic", 29)])
def test_time_grid(spacing, steps):
    """S + 1 strictly increasing times ending at the data (1.0), all on training steps; trailing
    starts at pure noise (t = 0) with index gaps floor/ceil(T / S); leading at step T - T/S + 1."""
    big_t = 1000
    grid = time_grid(DDPMScheduler("linear", big_t), steps, spacing)
    index = torch.round((1 - grid) * big_t)
    assert len(grid) == steps + 1 and grid[-1] == 1.0 and (grid.diff() > 0).all()
    torch.testing.assert_close(grid, 1 - index / big_t, atol=1e-15, rtol=0)
    if spacing == "trailing":
        assert grid[0] == 0.0
        assert set((-index.diff()).tolist()) <= {big_t // steps, -(-big_t // steps)}
    if spacing == "leading" and big_t % steps == 0:
        assert grid[0].item() == pytest.approx(1 - (big_t - big_t / steps + 1) / big_t, abs=1e-15)


def test_continuous_time_grid_is_uniform_and_bad_grids_raise():
    """Continuous paths: linspace(0, 1, S + 1); spacings other than trailing need discrete steps.
    Quadratic would repeat a step beyond S = 29 of T = 1000: its steps stay distinct instead."""
    torch.testing.assert_close(time_grid(CondOTScheduler(), 8), torch.linspace(0, 1, 9, dtype=D))
    with pytest.raises(ValueError, match="^spacing:"):
        time_grid(CondOTScheduler(), 8, "leading")
    for steps in (30, 100, 1000):
        grid = time_grid(DDPMScheduler(), steps, "quadratic")
        assert len(grid) == steps + 1 and (grid.diff() > 0).all() and grid[-1] == 1.0


def test_setting_labels_are_unique_and_track_every_parameter():
    grid = (settings_for("ddim", [10, 50], {"eta": [0.0, 0.5, 1.0], "spacing": ["trailing", "leading"]})
            + settings_for("ancestral", [10, 50], {"variance": ["small", "large"]})
            + settings_for("euler", [10, 50], {}) + settings_for("heun", [10], {})
            + settings_for("dopri5", None, {"atol": [1e-5, 2e-5], "rtol": [1e-5, 1e-7]}))
    labels = [s.label for s in grid]
    assert len(grid) == 12 + 4 + 2 + 1 + 4 and len(set(labels)) == len(labels)
    assert setting("ddim", 10).label == "ddim,nfe=10,eta=0,spacing=trailing"
    assert setting("dopri5", None, atol=1e-5).label != setting("dopri5", None, atol=1e-6).label


@pytest.mark.parametrize("method,nfe,params,key", [
    ("ddim", [10], {"etaa": 0.5}, "etaa"), ("ddim", [10], {"eta": 1.5}, "eta"),
    ("ddim", [10], {"eta": [0.0, -0.1]}, "eta"), ("ddim", [10], {"spacing": "middle"}, "spacing"),
    ("ancestral", [10], {"variance": "medium"}, "variance"), ("ancestral", [10], {"eta": 0.0}, "eta"),
    ("dopri5", [10], {}, "nfe"), ("heun", [7], {}, "nfe"), ("dopri5", None, {"atol": 0.0}, "atol"),
])
def test_bad_settings_name_the_key(method, nfe, params, key):
    with pytest.raises(ValueError, match=f"^{key}:"):
        settings_for(method, nfe, params)


def test_unknown_sampler_is_named():
    with pytest.raises(ValueError, match="'ddpm_fast'"):
        get_sampler("ddpm_fast")


@pytest.mark.parametrize("method", ["ddim", "ancestral", "euler", "heun"])
def test_sample_with_counts_network_calls(method):
    """One call per step for ddim / ancestral (NFE = S), nfe calls for euler / heun, except that on a
    DDPM path (singular at the data end) Heun's last step is a 1-NFE jump to the predicted data;
    the trajectory holds the S + 1 grid states and ends at the output."""
    out = sample_with(setting(method, 10), exact_model(), torch.zeros(4, 2, dtype=D),
                      torch.Generator().manual_seed(0), trajectory=True)
    assert out.nfe == 10 - (method == "heun")
    assert out.trajectory.shape == (11 - 5 * (method == "heun"), 4, 2) and torch.equal(out.trajectory[-1], out.x)


# ------------------------------------------------------------------ 7, 8: prior, determinism


def test_ve_prior_has_std_sigma_max():
    """Denoiser.prior on a VE path is sigma_max times the generator's standard normal draws."""
    model = Denoiser(ExactEpsilon(CondOTScheduler()), VEScheduler(0.01, 50.0))
    assert model.scheduler.prior_std == pytest.approx(50.0, rel=1e-12)
    x = model.prior((2,), 50000, torch.Generator().manual_seed(8))
    torch.testing.assert_close(x, 50.0 * torch.randn(50000, 2, generator=torch.Generator().manual_seed(8)))
    assert x.std().item() == pytest.approx(50.0, rel=4 / math.sqrt(2 * x.numel()))
    assert [sched.prior_std for sched in (VPScheduler(), DDPMScheduler(), CondOTScheduler())] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("method,params", [("ancestral", {"variance": "small"}), ("ancestral", {"variance": "large"}),
                                           ("ddim", {"eta": 0.5}), ("ddim", {"eta": 1.0}), ("ddim", {"eta": 0.0})])
def test_samplers_follow_the_generator(method, params):
    """Same seed: bitwise the same samples; another seed: different samples, except eta = 0,
    which draws nothing (all from one x)."""
    x = whitened_normal(32)

    def run(seed):
        return sample_with(setting(method, 20, **params), exact_model(), x, torch.Generator().manual_seed(seed)).x

    assert torch.equal(run(0), run(0))
    assert torch.equal(run(0), run(1)) if params.get("eta") == 0.0 else (run(0) - run(1)).abs().min() > 0


def test_ddim_with_eta_one_is_ancestral():
    """Eta = 1: alpha_b x1 + sqrt(sigma_b^2 - beta~) eps + sqrt(beta~) z equals the ancestral
    step c_xa x_a + c_x1 x1 + sqrt(beta~) z, with the same draws."""
    x = whitened_normal(32)
    ddim, anc = (sample_with(setting(m, 20, **p), exact_model(), x, torch.Generator().manual_seed(9)).x
                 for m, p in [("ddim", {"eta": 1.0}), ("ancestral", {})])
    torch.testing.assert_close(ddim, anc, atol=1e-10, rtol=0)

