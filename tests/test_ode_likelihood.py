"""ODE log-likelihood (models/ode_likelihood.py) against closed forms.

The model is the exact predictor for Gaussian data x1 ~ N(M, S) (tests/test_diffusion.py's
pattern, in any parameterization): on every Gaussian path x_t ~ N(alpha M, C_t) with
C_t = alpha^2 S + sigma^2 I, E[eps | x_t] = sigma C_t^{-1} (x_t - alpha M) and
E[x1 | x_t] = M + alpha S C_t^{-1} (x_t - alpha M). The C_t commute, so the probability-flow map
from time b to time a is affine, x_a = alpha_a M + A (x_b - alpha_b M) with
A = C_a^{1/2} C_b^{-1/2}, and its Jacobian's log-determinant is (log det C_a - log det C_b) / 2.
Hence the ODE log-likelihood of x at t_data under a prior pi at t = 0 is
log pi(x_0) + (log det C_0 - log det C_data) / 2, and with pi the true marginal at t = 0 it is
the marginal density log N(x; alpha M, C_data) itself.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from models.toys import _checkerboard, _eight_gaussians, true_log_density
from models.likelihoods import bits_per_dim, get_likelihood
from models.networks import UNet
from models.ode_likelihood import EXACT_DIVERGENCE_MAX_DIMS, ode_log_likelihood, ode_nll
from models.parameterization import Denoiser, coefficients, from_pivot
from models.paths import CondOTScheduler, DDPMScheduler, VEScheduler, VPScheduler

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


class Gaussian:
    """Data x1 ~ N(mean, cov), and what a Gaussian path does to it (in cov's eigenbasis)."""

    def __init__(self, mean: torch.Tensor, cov: torch.Tensor):
        self.mean, self.cov = mean, cov
        self.eigenvalues, self.basis = torch.linalg.eigh(cov)

    def variances(self, scheduler, t: float) -> tuple[float, torch.Tensor]:
        """alpha_t and the eigenvalues of C_t."""
        s = scheduler(torch.tensor(t, dtype=D))
        alpha, sigma = float(s.alpha), float(s.sigma)
        return alpha, alpha**2 * self.eigenvalues + sigma**2

    def marginal(self, scheduler, t: float) -> torch.distributions.MultivariateNormal:
        alpha, var = self.variances(scheduler, t)
        return torch.distributions.MultivariateNormal(alpha * self.mean, self.basis @ torch.diag(var) @ self.basis.T)

    def flow_to_source(self, scheduler, t: float, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The exact probability-flow map from time t to 0, and its log-determinant."""
        (alpha_t, var_t), (alpha_0, var_0) = self.variances(scheduler, t), self.variances(scheduler, 0.0)
        gain = (var_0 / var_t).sqrt()
        x0 = alpha_0 * self.mean + ((x - alpha_t * self.mean) @ self.basis * gain) @ self.basis.T
        return x0, float(gain.log().sum())

    def sample(self, n: int, seed: int) -> torch.Tensor:
        z = torch.randn(n, len(self.mean), dtype=D, generator=torch.Generator().manual_seed(seed)).to(self.mean)
        return self.mean + z @ torch.linalg.cholesky(self.cov).T


class ExactPrediction(nn.Module):
    """forward(x, t): E[x1 | x_t], E[eps | x_t] of Gaussian data, given in ``parameterization``."""

    def __init__(self, data: Gaussian, scheduler, parameterization: str):
        super().__init__()
        self.data, self.scheduler, self.parameterization = data, scheduler, parameterization

    def forward(self, x, t):
        s = coefficients(self.scheduler, t, x)
        data = self.data
        centred = (x - s.alpha * data.mean) @ data.basis / (s.alpha**2 * data.eigenvalues + s.sigma**2)
        x1 = data.mean + (centred * s.alpha * data.eigenvalues) @ data.basis.T
        eps = (centred * s.sigma) @ data.basis.T
        return from_pivot(x1, eps, s, self.parameterization)


def exact_model(data: Gaussian, scheduler, parameterization: str) -> Denoiser:
    return Denoiser(ExactPrediction(data, scheduler, parameterization), scheduler, parameterization)


PLANE = Gaussian(torch.tensor([1.0, -2.0], dtype=D), torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=D))

# each path with a parameterization its models use: every conversion to the velocity is exercised
PATHS = {
    "cond_ot": (CondOTScheduler(), "velocity"),
    "vp": (VPScheduler(), "epsilon"),
    "ve": (VEScheduler(0.01, 50.0), "epsilon"),
    "ddpm": (DDPMScheduler("linear", 1000), "v"),
}


def path_model(name: str, data: Gaussian = PLANE) -> Denoiser:
    scheduler, parameterization = PATHS[name]
    return exact_model(data, scheduler, parameterization)


def model_log_density(model: Denoiser, data: Gaussian, x: torch.Tensor) -> torch.Tensor:
    """log density at ode_end of the model's flow started from its own prior N(0, prior_std^2 I)."""
    x0, log_det = data.flow_to_source(model.scheduler, model.scheduler.ode_end, x)
    return model.prior_log_prob(x0) + log_det


# ------------------------------------------------------------------ exact divergence, every path


@pytest.mark.parametrize("name", ["cond_ot", "vp", "ve"])
def test_ode_log_likelihood_is_the_marginal_density(name):
    """Started from the true marginal at t = 0, the ODE gives the marginal density at t_data =
    ode_end (VP: N(alpha M, alpha^2 S + sigma^2 I) just before the data; CondOT, VE: t = 1,
    N(M, S) and N(M, S + sigma_min^2 I)) within 1e-3 nats at every one of 64 points (measured
    1e-4, 1e-5, 5e-5)."""
    model = path_model(name)
    sched = model.scheduler
    x = PLANE.sample(64, seed=0)
    log_px, nfe = ode_log_likelihood(model.velocity, x, PLANE.marginal(sched, 0.0).log_prob, t_data=sched.ode_end)
    torch.testing.assert_close(log_px, PLANE.marginal(sched, sched.ode_end).log_prob(x), atol=1e-3, rtol=0)
    assert nfe > 10 and not log_px.requires_grad


def test_ddpm_path_needs_its_jump_times_for_exact_points():
    """DDPM (T = 100): log abar is piecewise linear, so the velocity jumps at the T steps, which
    dopri5's error estimate does not see: per point the error reaches 8e-2 (mean -5e-3). Given the steps as jump_times, every point is within 5e-3 (measured 3.4e-3)
    at more than 7 NFE an interval, over 10 times closer. Not within 1e-5: (1 - t) T rounds, so at
    40 of the 99 knots torchdiffeq's one-ulp nudge off the knot does not reach the side being
    integrated and one evaluation there takes the neighbouring interval's slope."""
    model = exact_model(PLANE, DDPMScheduler("linear", 100), "v")
    sched = model.scheduler
    x = PLANE.sample(64, seed=0)
    prior, want = PLANE.marginal(sched, 0.0).log_prob, PLANE.marginal(sched, sched.ode_end).log_prob(x)
    plain, _ = ode_log_likelihood(model.velocity, x, prior, t_data=sched.ode_end)
    knots = sched.time_of(torch.arange(1, sched.timesteps + 1)).tolist()
    jumped, nfe = ode_log_likelihood(model.velocity, x, prior, t_data=sched.ode_end, jump_times=knots)
    torch.testing.assert_close(jumped, want, atol=5e-3, rtol=0)
    assert nfe > 7 * (sched.timesteps - 1)
    assert (plain - want).abs().max() > 10 * (jumped - want).abs().max()


@pytest.mark.parametrize("name", ["cond_ot", "vp", "ve", "ddpm"])
def test_registered_ode_nll_is_the_model_density(name):
    """The registered ``ode`` likelihood (from ode_end onto the model's own prior N(0, prior_std^2 I))
    equals -log pi(x_0) - log det A of the exact flow map within 1e-3 nats a point. That is the
    data density itself on CondOT only: VE's prior N(0, 50^2 I) misses the true t = 0 marginal
    N(M, S + 50^2 I) (and VP's / DDPM's, N(0.0066 M, ~I)), by more than the tolerance for some
    points, checked below. DDPM, without jump times (the registered default: 86 NFE instead of
    7000): per point within 1e-2, on average within 1e-3."""
    model = path_model(name)
    x = PLANE.sample(64, seed=1)
    nll = ode_nll(model, x)
    want = -model_log_density(model, PLANE, x)
    if name == "ddpm":
        torch.testing.assert_close(nll, want, atol=1e-2, rtol=0)
        assert abs((nll - want).mean().item()) < 1e-3
    else:
        torch.testing.assert_close(nll, want, atol=1e-3, rtol=0)
    data_nll = -PLANE.marginal(model.scheduler, model.scheduler.ode_end).log_prob(x)
    if name == "cond_ot":
        torch.testing.assert_close(nll, data_nll, atol=1e-3, rtol=0)
    else:  # the test tells the model's density from the data's
        assert (want - data_nll).abs().max() > 2e-3


def test_the_likelihood_is_registered_with_its_needs():
    spec = get_likelihood("ode")
    assert spec.fn is ode_nll and spec.needs == {"velocity", "gaussian_source"}


def test_prior_log_prob_is_the_density_of_the_prior_draws():
    """N(0, prior_std^2 I) summed over each example, any example shape (VE: std 50)."""
    for scheduler in (VEScheduler(0.01, 50.0), VPScheduler()):
        model = Denoiser(nn.Identity(), scheduler)
        x = model.prior((3, 2), 5, torch.Generator().manual_seed(2)).double()
        std = torch.tensor(scheduler.prior_std, dtype=D)
        want = torch.distributions.Normal(torch.zeros((), dtype=D), std).log_prob(x).flatten(1).sum(1)
        torch.testing.assert_close(model.prior_log_prob(x), want, atol=1e-12, rtol=0)


# ------------------------------------------------------------------ Hutchinson


def test_hutchinson_is_unbiased_with_the_rademacher_variance():
    """Gaussian flows are affine: with one probe eps for the whole path, Hutchinson's value is
    log pi(x_0) + eps^T B eps with B = (log C_0 - log C_data) / 2 (matrix logs; the integral of the
    Jacobian), so over probes its mean is the exact value and its variance 2 sum_{i != j} B_ij^2.
    3-D correlated data on CondOT, 4 points x 1000 probes: the mean of each point within 4 standard
    errors of the exact-divergence value; the variance within 15% of the Rademacher variance (the
    sample variance's standard error is 6% here); distinct seeds give distinct values."""
    cov = torch.tensor([[1.0, 0.6, 0.3], [0.6, 0.8, -0.2], [0.3, -0.2, 0.5]], dtype=D)
    data = Gaussian(torch.tensor([0.5, -0.2, 0.1], dtype=D), cov)
    model = exact_model(data, CondOTScheduler(), "velocity")
    points, copies = data.sample(4, seed=3), 1000
    exact, _ = ode_log_likelihood(model.velocity, points, model.prior_log_prob)
    x = points.repeat_interleave(copies, 0)
    estimate, _ = ode_log_likelihood(model.velocity, x, model.prior_log_prob, divergence="hutchinson",
                                     generator=torch.Generator().manual_seed(4))
    estimate = estimate.view(4, copies)
    se = estimate.std(1) / math.sqrt(copies)
    assert ((estimate.mean(1) - exact).abs() < 4 * se).all(), (estimate.mean(1), exact)
    _, var_1 = data.variances(model.scheduler, 1.0)
    _, var_0 = data.variances(model.scheduler, 0.0)
    b = data.basis @ torch.diag(0.5 * (var_0 / var_1).log()) @ data.basis.T
    rademacher_var = 2 * (b**2).sum() - 2 * (torch.diagonal(b) ** 2).sum()
    assert rademacher_var > 0.1
    torch.testing.assert_close(estimate.var(1), rademacher_var.expand(4), atol=0, rtol=0.15)
    again, _ = ode_log_likelihood(model.velocity, x[:8], model.prior_log_prob, divergence="hutchinson",
                                  generator=torch.Generator().manual_seed(5))
    assert not torch.equal(again, estimate.flatten()[:8])


def test_registered_likelihood_switches_to_hutchinson_above_the_threshold():
    """Up to EXACT_DIVERGENCE_MAX_DIMS dimensions the value does not depend on the generator
    (exact trace); one more and it does (Hutchinson probes), and stays within 4 of its estimated
    standard errors of the exact value (mean of 64 points)."""
    for dims, seeded in ((EXACT_DIVERGENCE_MAX_DIMS, False), (EXACT_DIVERGENCE_MAX_DIMS + 1, True)):
        data = Gaussian(torch.linspace(-1, 1, dims, dtype=D), torch.eye(dims, dtype=D) * 0.5 + 0.2)
        model = exact_model(data, CondOTScheduler(), "velocity")
        x = data.sample(64 if seeded else 2, seed=6)
        a, b = (ode_nll(model, x, torch.Generator().manual_seed(seed)) for seed in (7, 8))
        assert torch.equal(a, b) != seeded, dims
        want = -model_log_density(model, data, x)
        gap = a - want
        assert abs(gap.mean().item()) < 4 * gap.std().item() / math.sqrt(len(x)) + 1e-3, dims


# ------------------------------------------------------------------ dequantization


LEVELS = 17
DELTA = 2 / (LEVELS - 1)


def quantized(x: torch.Tensor) -> torch.Tensor:
    return (torch.round((x + 1) / DELTA) * DELTA - 1).clamp(-1, 1)


def test_dequantized_value_is_the_density_at_the_dequantized_point():
    """levels = 17: the value is -log p(x + u) - D log delta, u = (U[0, 1) - 1/2) delta drawn first
    from the generator (float64); the same seed reproduces it bit for bit, another moves it."""
    model = path_model("cond_ot")
    x = quantized(PLANE.sample(32, seed=9))
    nll = ode_nll(model, x, torch.Generator().manual_seed(10), levels=LEVELS)
    u = (torch.rand(x.shape, generator=torch.Generator().manual_seed(10), dtype=D) - 0.5) * DELTA
    want = -PLANE.marginal(model.scheduler, 1.0).log_prob(x + u) - 2 * math.log(DELTA)
    torch.testing.assert_close(nll, want, atol=1e-3, rtol=0)
    assert torch.equal(nll, ode_nll(model, x, torch.Generator().manual_seed(10), levels=LEVELS))
    assert (nll - ode_nll(model, x, torch.Generator().manual_seed(11), levels=LEVELS)).abs().min() > 0


def test_dequantized_nll_bounds_the_bin_probability():
    """Independent data N(m, diag s^2) on 17 levels: the exact discrete NLL -log P(bin) is a sum of
    normal-CDF differences. The dequantized ODE value (2000 points) is not below it on average
    beyond 4 standard errors (Jensen), exceeds it by less than 0.05 nats (the bins are a third of
    the smallest std), and in bits/dim is positive and under log2(17) (a uniform over the bins)."""
    mean, std = torch.tensor([0.1, -0.3], dtype=D), torch.tensor([0.3, 0.5], dtype=D)
    data = Gaussian(mean, torch.diag(std**2))
    model = exact_model(data, CondOTScheduler(), "velocity")
    x = quantized(data.sample(2000, seed=12))
    nll = ode_nll(model, x, torch.Generator().manual_seed(13), levels=LEVELS)
    normal = torch.distributions.Normal(mean, std)
    bin_nll = -(normal.cdf(x + DELTA / 2) - normal.cdf(x - DELTA / 2)).log().sum(1)
    gap = nll - bin_nll
    assert gap.mean() > -4 * gap.std() / math.sqrt(len(x)), gap.mean()
    assert gap.mean() < 0.05, gap.mean()
    assert 0 < bits_per_dim(nll.mean().item(), 2) < math.log2(LEVELS)


# ------------------------------------------------------------------ solvers, networks, errors


def test_fixed_step_methods_converge_to_dopri5():
    """CondOT, exact velocity: each fixed-step method's error against dopri5 (atol = rtol = 1e-9)
    falls from 4 to 16 to 64 steps at (70% of) its order p at least, error(16) / error(64) >
    0.7 * 4^p (measured: euler 3.7, midpoint 35, heun 19, rk4 420), and is small at 64 steps
    (measured 0.18, 8e-6, 2e-4, 4e-9); NFE is steps x stages."""
    model = path_model("cond_ot")
    x = PLANE.sample(16, seed=14)
    reference, _ = ode_log_likelihood(model.velocity, x, model.prior_log_prob, atol=1e-9, rtol=1e-9)
    for method, stages, order, final in (("euler", 1, 1, 0.3), ("midpoint", 2, 2, 1e-3), ("heun", 2, 2, 1e-3),
                                         ("rk4", 4, 4, 1e-7)):
        errors = []
        for steps in (4, 16, 64):
            log_px, nfe = ode_log_likelihood(model.velocity, x, model.prior_log_prob, method=method, steps=steps)
            assert nfe == steps * stages
            errors.append((log_px - reference).abs().max().item())
        assert errors[0] > errors[1] > 0.7 * 4**order * errors[2], (method, errors)
        assert errors[2] < final, (method, errors)


def float32_gaussian(dims: int) -> Gaussian:
    """Correlated data in float32, the dtype models and data have in production."""
    g = torch.Generator().manual_seed(15)
    mix = torch.randn(dims, dims, generator=g) * 0.3 / math.sqrt(dims)
    return Gaussian(torch.linspace(-0.5, 0.5, dims), 0.2 * torch.eye(dims) + mix @ mix.T)


class OnImages(nn.Module):
    """A flat-vector network applied to (B, 1, 8, 8) images."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, t):
        return self.net(x.flatten(1), t).view(x.shape)


def test_float32_images():
    """The production path: float32 data shaped (B, 1, 8, 8) (64 dimensions). Exact trace: the
    closed-form density within 1e-2 nats (of ~100); the registered likelihood (Hutchinson,
    dequantized on 17 levels): on average over 32 images within 4 standard errors of the closed
    form at the same u, at the float32 Gaussian's own ode_end."""
    data = float32_gaussian(64)
    scheduler = VPScheduler()
    model = Denoiser(OnImages(ExactPrediction(data, scheduler, "epsilon")), scheduler, "epsilon")
    flat = data.sample(32, seed=16).float()
    x = flat.view(32, 1, 8, 8)
    marginal = data.marginal(scheduler, scheduler.ode_end)
    log_px, _ = ode_log_likelihood(model.velocity, x[:4], lambda z: data.marginal(scheduler, 0.0).log_prob(z.flatten(1)),
                                   t_data=scheduler.ode_end)
    assert log_px.dtype == torch.float32 and log_px.shape == (4,)
    torch.testing.assert_close(log_px, marginal.log_prob(flat[:4]), atol=1e-2, rtol=0)
    nll = ode_nll(model, x, torch.Generator().manual_seed(17), levels=LEVELS)
    u = (torch.rand(x.shape, generator=torch.Generator().manual_seed(17), dtype=D) - 0.5) * DELTA
    x0, log_det = data.flow_to_source(scheduler, scheduler.ode_end, (x + u.float()).flatten(1))
    gap = nll + model.prior_log_prob(x0) + log_det + 64 * math.log(DELTA)
    assert gap.abs().mean() > 0  # Hutchinson's noise
    assert abs(gap.mean().item()) < 4 * gap.std().item() / math.sqrt(len(gap)), gap


def test_untrained_unet_leaves_the_prior():
    """A UNet starts from the zero field: the flow does not move, the divergence is 0, and the
    registered value on 8x8 images is -log N(x + u; 0, I) - D log delta exactly (float32)."""
    model = Denoiser(UNet(1, base_channels=8, channel_mults=(1, 2), groups=4), CondOTScheduler())
    x = quantized(torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(18)) * 2 - 1)
    nll = ode_nll(model, x, torch.Generator().manual_seed(19), levels=LEVELS)
    u = (torch.rand(x.shape, generator=torch.Generator().manual_seed(19), dtype=D) - 0.5) * DELTA
    want = -model.prior_log_prob(x + u.float()) - 64 * math.log(DELTA)
    assert nll.dtype == torch.float32
    torch.testing.assert_close(nll, want, atol=1e-4, rtol=0)


def test_bad_arguments_are_named():
    model = path_model("cond_ot")
    x = PLANE.sample(2, seed=18)
    for kwargs, match in (({"divergence": "trace"}, "'trace'"), ({"method": "rk45"}, "'rk45'"),
                          ({"steps": 10}, "steps"), ({"method": "rk4", "jump_times": [0.5]}, "jump_times")):
        with pytest.raises(ValueError, match=match):
            ode_log_likelihood(model.velocity, x, model.prior_log_prob, **kwargs)


# ------------------------------------------------------------------ true toy densities


def test_eight_gaussians_density_is_the_mixture_and_the_samplers_law():
    """Against scipy's normal densities of the 8 modes (log-sum-exp), at samples and at points far
    away (finite); the mean of -log p over 100,000 draws of the dataset's sampler equals the
    entropy log 8 + log(2 pi e 0.1^2) (the modes are 10.8 std apart) within 4 standard errors."""
    from scipy.special import logsumexp
    from scipy.stats import multivariate_normal

    x = np.concatenate([_eight_gaussians(500, 19), [[0.0, 0.0], [30.0, -40.0], [1.0, 1.0]]])
    angles = np.arange(8) * np.pi / 4
    modes = [multivariate_normal(np.sqrt(2) * np.array([np.cos(a), np.sin(a)]), 0.01 * np.eye(2)) for a in angles]
    want = logsumexp(np.stack([m.logpdf(x) for m in modes]), axis=0) - np.log(8)
    got = true_log_density("eight_gaussians", x)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)
    nll = -true_log_density("eight_gaussians", _eight_gaussians(100_000, 20))
    entropy = np.log(8) + np.log(2 * np.pi * np.e * 0.01)
    assert abs(nll.mean() - entropy) < 4 * nll.std() / np.sqrt(len(nll)), (nll.mean(), entropy)


def test_checkerboard_density_and_the_toys_without_one():
    """Checkerboard: log(1/8) at every sample, -inf on a light square and outside the board, and a
    Monte-Carlo integral over [-3, 3]^2 of 1 (within 4 standard errors). Moons, s_curve and
    two_spirals have no closed form: None."""
    assert np.all(true_log_density("checkerboard", _checkerboard(10_000, 21)) == -np.log(8))
    assert np.all(true_log_density("checkerboard", np.array([[0.5, -0.5], [2.5, 0.5], [-1.5, 1.5]])) == -np.inf)
    u = np.random.default_rng(22).uniform(-3, 3, (100_000, 2))
    mass = 36 * np.exp(true_log_density("checkerboard", u))
    assert abs(mass.mean() - 1) < 4 * mass.std() / np.sqrt(len(mass))
    for name in ("moons", "s_curve", "two_spirals"):
        assert true_log_density(name, u) is None


def test_the_gap_to_the_true_nll_is_paired_on_the_same_points():
    """`nll_gap@<name>` is the mean of model NLL - true NLL point by point, its error that of the
    differences: a model off by a constant 0.1 nats has gap 0.1 with error 0, although either NLL
    alone has an error of ~0.02 on 2000 points; noise of sd 0.5 on the differences gives the
    error 0.5 / sqrt(n). Data without a closed-form density get no floor and no gap."""
    from tasks.evaluate import true_nll_metrics

    x = _eight_gaussians(2000, 23)
    true = -true_log_density("eight_gaussians", x)
    noise = np.random.default_rng(24).standard_normal(len(x)) * 0.5
    m = true_nll_metrics("eight_gaussians", x, {"exact": (true + 0.1).tolist(), "ode": list(true + noise)})
    assert m["nll_floor"] == pytest.approx(true.mean()) and m["nll_se_floor"] > 0.01
    assert m["nll_gap@exact"] == pytest.approx(0.1) and m["nll_gap_se@exact"] == pytest.approx(0.0, abs=1e-12)
    assert m["nll_gap@ode"] == pytest.approx(noise.mean())
    assert m["nll_gap_se@ode"] == pytest.approx(noise.std(ddof=1) / np.sqrt(len(x)))
    assert true_nll_metrics("moons", x, {"exact": list(true)}) == {}
