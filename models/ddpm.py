"""DDPM: denoising diffusion probabilistic models (Ho, Jain & Abbeel 2020).

- The forward process is ``models.paths.DDPMScheduler`` (linear or cosine betas, T steps;
  step ``i`` at time ``t = 1 - i / T``).
- Training (``ddpm`` objective): the "simple" loss, Eq. 14: ``i ~ U{1..T}``, regress the
  model's parameterization (epsilon in the paper; ``v`` or ``x1`` work the same way).
- Sampling (``ancestral`` sampler): Algorithm 2, a draw from the posterior
  ``q(x_{i-1} | x_i, x_0)`` with ``x_0`` predicted, on any subsequence of the training steps
  ("respacing", Nichol & Dhariwal 2021, Sec. 4). Variance ``small`` is the posterior's own
  (beta-tilde), ``large`` is ``1 - abar_i / abar_prev`` (beta on consecutive steps; the
  "sigma-hat" row of the DDIM paper's Table 1).
- Likelihood (``ddpm_bound``): the variational bound ``L_T + sum_i L_{i-1} + L_0`` (Eq. 5),
  in nats per example, with the discretized Gaussian decoder of Sec. 3.3 on the data's own
  quantization levels.

The posterior is written for any Gaussian path: from ``x_a`` at time ``t_a`` to the less
noisy ``t_b > t_a`` (Kingma et al. 2021, "Variational Diffusion Models", Eq. 27-28), so the
ancestral sampler also runs on continuous paths.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from models.likelihoods import register_likelihood
from models.objectives import PathRegression, register_objective
from models.paths import Scheduler
from models.samplers import SPACINGS, Param, register_sampler

SPACING = Param("trailing", choices=SPACINGS, doc="which training steps an S-step grid visits")


@register_objective("ddpm")
class DDPM(PathRegression):
    """Ho et al. 2020, Eq. 14: uniform diffusion steps ``i`` in 1..T, MSE on the parameterization."""

    def times(self, u: Tensor) -> Tensor:
        big_t = self.model.scheduler.timesteps
        step = (u.double() * big_t).floor().clamp(max=big_t - 1) + 1
        return self.model.scheduler.time_of(step).to(u.dtype)


@dataclass(frozen=True)
class Posterior:
    """``q(x_b | x_a, x1) = N(c_xa x_a + c_x1 x1, var_small)`` for times ``t_a < t_b``, and the
    forward transition's variance ``var_large`` (of ``q(x_a | x_b)``)."""

    c_xa: float
    c_x1: float
    var_small: float
    var_large: float


@functools.lru_cache(maxsize=4096)
def posterior(scheduler: Scheduler, t_a: float, t_b: float) -> Posterior:
    """Coefficients of the Gaussian posterior between two times of a Gaussian path (float64).

    With ``alpha_ab = alpha_a / alpha_b`` and ``sigma_ab^2 = sigma_a^2 - alpha_ab^2 sigma_b^2``
    (the transition ``x_a = alpha_ab x_b + sigma_ab z``): mean coefficients
    ``alpha_ab sigma_b^2 / sigma_a^2`` on ``x_a`` and ``alpha_b sigma_ab^2 / sigma_a^2`` on
    ``x1``, variance ``sigma_ab^2 sigma_b^2 / sigma_a^2``. For consecutive DDPM steps these are
    Ho et al.'s Eq. 7 (beta-tilde).
    """
    (alpha_a, sigma_a), (alpha_b, sigma_b) = scheduler_at(scheduler, t_a), scheduler_at(scheduler, t_b)
    alpha_ab = alpha_a / alpha_b
    var_ab = max(sigma_a**2 - alpha_ab**2 * sigma_b**2, 0.0)
    return Posterior(alpha_ab * sigma_b**2 / sigma_a**2, alpha_b * var_ab / sigma_a**2,
                     var_ab * sigma_b**2 / sigma_a**2, var_ab)


@functools.lru_cache(maxsize=4096)
def scheduler_at(scheduler: Scheduler, t: float) -> tuple[float, float]:
    """``(alpha_t, sigma_t)`` as floats (float64 arithmetic), cached: grids repeat across shards."""
    s = scheduler(torch.tensor(t, dtype=torch.float64))
    return float(s.alpha), float(s.sigma)


VARIANCES = ("small", "large")


@register_sampler("ancestral", {"epsilon", "x1", "gaussian_source"},
                  {"spacing": SPACING, "variance": Param("small", choices=VARIANCES)}, stochastic=True)
def ancestral(model, x: Tensor, grid: Tensor, generator: torch.Generator | None = None, callback=None,
              variance: str = "small") -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2) over the grid's steps."""
    times = grid.tolist()
    for i, (t_a, t_b) in enumerate(zip(times[:-1], times[1:]), start=1):
        q = posterior(model.scheduler, t_a, t_b)
        x1, _ = model.pivot(x, t_a)
        x = q.c_xa * x + q.c_x1 * x1
        var = q.var_small if variance == "small" else (q.var_large if i < len(times) - 1 else 0.0)
        if var > 0:
            x = x + math.sqrt(var) * torch.randn(x.shape, generator=generator).to(x)
        if callback:
            callback(i, x)
    return x


# --------------------------------------------------------------------------- the bound


def _normal_kl(mean_q: Tensor, var_q: float, var_p: float) -> Tensor:
    """KL(N(mean_q, var_q) || N(0, var_p)) summed over all but the batch dimension."""
    per_dim = 0.5 * (math.log(var_p / var_q) + (var_q + mean_q**2) / var_p - 1.0)
    return per_dim.flatten(1).sum(1)


def _log_normal_cdf(z: Tensor) -> Tensor:
    return torch.special.log_ndtr(z)


def decoder_log_likelihood(x: Tensor, mean: Tensor, std: float, levels: int | None,
                           low: float = -1.0, high: float = 1.0) -> Tensor:
    """log p(x | mean, std) summed per example: a Gaussian density for continuous data, or the
    mass of x's quantization bin for data on ``levels`` evenly spaced values in [low, high]
    (Ho et al. 2020, Eq. 13; the outermost bins reach to -inf / +inf)."""
    if levels is None:
        log_p = -0.5 * (((x - mean) / std) ** 2 + math.log(2 * math.pi * std**2))
        return log_p.flatten(1).sum(1)
    half = (high - low) / (levels - 1) / 2
    upper = torch.where(x >= high - half / 2, torch.full_like(x, math.inf), (x + half - mean) / std)
    lower = torch.where(x <= low + half / 2, torch.full_like(x, -math.inf), (x - half - mean) / std)
    # mass = Phi(upper) - Phi(lower) = Phi(-lower) - Phi(-upper): take the form in the lower tail
    flip = lower > 0
    a, b = torch.where(flip, -lower, upper), torch.where(flip, -upper, lower)
    log_a = _log_normal_cdf(a)
    log_mass = log_a + torch.log(-torch.expm1(_log_normal_cdf(b) - log_a))
    return log_mass.flatten(1).sum(1)


@register_likelihood("ddpm_bound", {"discrete_time"})
@torch.no_grad()
def variational_bound(model, x: Tensor, generator: torch.Generator | None = None, levels: int | None = None,
                      terms: int | None = 64) -> Tensor:
    """Negative ELBO ``L_T + sum_{i=2}^T L_{i-1} + L_0`` in nats, one value per example.

    ``L_T`` and ``L_0`` are exact; the ``T - 1`` middle terms are estimated without bias by
    ``terms`` stratified draws of ``i`` per example (all of them when ``terms`` is None or at
    least T - 1). The reverse process uses the posterior variance (beta-tilde) for
    ``i >= 2`` and ``beta_1`` for the decoder ``p(x_0 | x_1)``, as in Ho et al. 2020.
    """
    sched = model.scheduler
    big_t = sched.timesteps
    alpha_bar = sched.log_alpha_bar.exp()
    n = x.shape[0]
    prior = _normal_kl(math.sqrt(alpha_bar[big_t]) * x, 1 - float(alpha_bar[big_t]), 1.0)

    def noised(step: Tensor) -> Tensor:
        ab = alpha_bar[step].to(x).view(-1, *[1] * (x.ndim - 1))
        return ab.sqrt() * x + (1 - ab).sqrt() * torch.randn(x.shape, generator=generator).to(x)

    # L_0: decode x_0 from x_1
    one = torch.ones(n, dtype=torch.long)
    t1 = sched.time_of(one).to(x)
    x1_hat, _ = model.pivot(noised(one), t1)
    decoder = -decoder_log_likelihood(x, x1_hat, math.sqrt(float(sched.betas[0])), levels)

    # middle terms: KL(q(x_{i-1} | x_i, x_0) || p(x_{i-1} | x_i)) = c_x1^2 |x_0 - x0_hat|^2 / (2 var)
    count = big_t - 1
    if count == 0:
        return prior + decoder
    k = count if terms is None or terms >= count else terms
    middle = torch.zeros(n, dtype=torch.float64)
    for j in range(k):
        if k == count:
            step = torch.full((n,), j + 2, dtype=torch.long)
        else:  # one uniform draw from each of k equal strata of 2..T
            u = (j + torch.rand(n, generator=generator, dtype=torch.float64)) / k
            step = (2 + (u * count).floor().long()).clamp(max=big_t)
        t_a = sched.time_of(step)
        x_a = noised(step)
        x1_hat, _ = model.pivot(x_a, t_a.to(x))
        c_x1, var = _posterior_table(sched, step)
        err = (x - x1_hat).flatten(1).pow(2).sum(1).double()
        middle += c_x1**2 * err / (2 * var)
    return prior + decoder + middle * (count / k)


def _posterior_table(sched, step: Tensor) -> tuple[Tensor, Tensor]:
    """``c_x1`` and beta-tilde of ``q(x_{i-1} | x_i, x_0)`` at integer steps ``i`` (float64)."""
    ab = sched.log_alpha_bar.exp()
    ab_i, ab_prev = ab[step], ab[step - 1]
    beta = 1 - ab_i / ab_prev
    return ab_prev.sqrt() * beta / (1 - ab_i), (1 - ab_prev) / (1 - ab_i) * beta
