"""Score-based generative modelling through SDEs (Song et al. 2021, "Score-Based Generative
Modeling through Stochastic Differential Equations").

Every Gaussian path ``x_t = alpha_t x1 + sigma_t eps`` of ``models.paths`` is the marginal of a
linear SDE. Written in the noising direction ``tau = -t`` (diffusion papers' time):

    dx = f(t) x dtau + g(t) dW,   f = -alpha' / alpha,   g^2 = 2 sigma (sigma alpha' / alpha - sigma')

(primes are d/dt in this repo's time, t = 0 noise, t = 1 data). For the VE, VP and sub-VP paths
these are Eq. 9, 11 and 29 of the paper (``g^2 = d sigma^2 / dtau``, ``beta``,
``beta (1 - e^{-2 B})``), so one set of samplers serves all three, and DDPM's schedule too:

- ``euler_maruyama``: the reverse-time SDE (Eq. 6), ``dx = [f x - g^2 score] dtau + g dW``, one
  Euler-Maruyama step per grid interval;
- ``reverse_diffusion``: the reverse-diffusion predictor (App. E, Eq. 46) built from the forward
  transition of each interval, ``x_a = alpha_ab x_b + sigma_ab z``:
  ``x_b = (2 - alpha_ab) x_a + sigma_ab^2 score + sigma_ab z`` (the seeds' Alg. 3, line 3-5);
- ``pc``: predictor-corrector (Alg. 1): at each grid time ``corrector_steps`` Langevin steps
  whose size follows the signal-to-noise rule (Alg. 4-5), then one predictor step;
- the probability-flow ODE (Eq. 13) is the path's velocity: the ODE samplers of
  ``models.solvers`` integrate it, fixed-step or adaptive, and ``models.ode_likelihood`` gives its
  exact likelihood.

The last step of each stochastic sampler adds no noise (the paper's samplers return the mean of
the last step). Training is denoising score matching (Eq. 7) with ``lambda(t) = sigma_t^2``,
i.e. the squared error of the implied epsilon: the ``score_sde`` objective.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.objectives import PathRegression, register_objective
from models.parameterization import coefficients, to_pivot
from models.paths import Scheduler, time_batch
from models.samplers import Param, register_sampler

#: Training times stop this far from the data end (Song et al. train on t in [1e-5, 1] of their time).
TRAIN_EPS = 1e-5


@register_objective("score_sde")
class DenoisingScoreMatching(PathRegression):
    """Continuous-time denoising score matching (Song et al. 2021, Eq. 7), lambda(t) = sigma_t^2.

    ``sigma_t^2 |s_hat - grad log p(x_t | x1)|^2 = |eps_hat - eps|^2`` whatever the network
    predicts (epsilon or score), so the loss is written on the epsilon it implies;
    t ~ U[0, 1 - TRAIN_EPS].
    """

    def times(self, u: Tensor) -> Tensor:
        return u * (1 - TRAIN_EPS)

    def loss(self, net: nn.Module, batch) -> Tensor:
        sample = self.path.sample(batch.x0, batch.x1, self.times(batch.t))
        s = coefficients(self.path.scheduler, sample.t, sample.x_t)
        _, eps = to_pivot(net(sample.x_t, sample.t), sample.x_t, s, self.model.parameterization)
        return F.mse_loss(eps, batch.x0)


@functools.lru_cache(maxsize=4096)
def sde_at(scheduler: Scheduler, t: float) -> tuple[float, float, float, float]:
    """``(alpha, sigma, f, g^2)`` at time ``t`` (float64 arithmetic, cached: grids repeat)."""
    s = scheduler(torch.tensor(t, dtype=torch.float64))
    alpha, sigma, d_alpha, d_sigma = (float(v) for v in (s.alpha, s.sigma, s.d_alpha, s.d_sigma))
    return alpha, sigma, -d_alpha / alpha, 2 * sigma * (sigma * d_alpha / alpha - d_sigma)


def transition(scheduler: Scheduler, t_a: float, t_b: float) -> tuple[float, float]:
    """``(alpha_ab, sigma_ab^2)`` of the forward step from ``t_b`` (less noisy) to ``t_a < t_b``:
    ``x_a = alpha_ab x_b + sigma_ab z``."""
    alpha_a, sigma_a, _, _ = sde_at(scheduler, t_a)
    alpha_b, sigma_b, _, _ = sde_at(scheduler, t_b)
    alpha_ab = alpha_a / alpha_b
    return alpha_ab, max(sigma_a**2 - alpha_ab**2 * sigma_b**2, 0.0)


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator).to(x)


def _score(model, x: Tensor, t: float) -> Tensor:
    return model.score(x, time_batch(t, x))


def euler_maruyama_step(model, x: Tensor, t_a: float, t_b: float, generator, last: bool) -> Tensor:
    """One Euler-Maruyama step of the reverse-time SDE from ``t_a`` to ``t_b > t_a``."""
    _, _, f, g2 = sde_at(model.scheduler, t_a)
    dt = t_b - t_a
    x = x - dt * f * x + dt * g2 * _score(model, x, t_a)
    return x if last else x + math.sqrt(g2 * dt) * _noise(x, generator)


def reverse_diffusion_step(model, x: Tensor, t_a: float, t_b: float, generator, last: bool) -> Tensor:
    """One reverse-diffusion step (Song et al. 2021, Eq. 46) from ``t_a`` to ``t_b > t_a``."""
    alpha_ab, var = transition(model.scheduler, t_a, t_b)
    x = (2 - alpha_ab) * x + var * _score(model, x, t_a)
    return x if last else x + math.sqrt(var) * _noise(x, generator)


PREDICTORS = {"euler_maruyama": euler_maruyama_step, "reverse_diffusion": reverse_diffusion_step}


def langevin_step(model, x: Tensor, t: float, snr: float, alpha: float, generator) -> Tensor:
    """One Langevin corrector step at time ``t`` (Song et al. 2021, Alg. 4-5):
    ``x + eps score + sqrt(2 eps) z`` with ``eps = 2 alpha (snr |z| / |score|)^2``, the norms
    averaged over the batch as in the paper's code (per example, a point where the score
    vanishes would take an unbounded step; in low dimension that happens). A shard's samples
    still depend only on its own draws, never on which worker made it."""
    score = _score(model, x, t)
    z = _noise(x, generator)
    mean_norm = lambda v: v.flatten(1).norm(dim=1).mean()  # noqa: E731
    eps = 2 * alpha * (snr * mean_norm(z) / mean_norm(score).clamp(min=1e-12)) ** 2
    return x + eps * score + (2 * eps).sqrt() * z


def _walk(model, x: Tensor, grid: Tensor, generator, callback, step, corrector_steps: int = 0,
          snr: float = 0.0) -> Tensor:
    times = grid.tolist()
    for i, (t_a, t_b) in enumerate(zip(times[:-1], times[1:]), start=1):
        if corrector_steps:
            alpha = transition(model.scheduler, t_a, t_b)[0] ** 2  # 1 on VE, 1 - beta_i on VP
            for _ in range(corrector_steps):
                x = langevin_step(model, x, t_a, snr, alpha, generator)
        x = step(model, x, t_a, t_b, generator, last=i == len(times) - 1)
        if callback:
            callback(i, x)
    return x


NEEDS = {"score", "gaussian_source", "sde"}


@register_sampler("euler_maruyama", NEEDS, stochastic=True)
def euler_maruyama(model, x: Tensor, grid: Tensor, generator=None, callback=None) -> Tensor:
    """Reverse-time SDE, Euler-Maruyama (Song et al. 2021, Eq. 6); the last step adds no noise."""
    return _walk(model, x, grid, generator, callback, euler_maruyama_step)


@register_sampler("reverse_diffusion", NEEDS, stochastic=True)
def reverse_diffusion(model, x: Tensor, grid: Tensor, generator=None, callback=None) -> Tensor:
    """Reverse-diffusion predictor (Song et al. 2021, Eq. 46); the last step adds no noise."""
    return _walk(model, x, grid, generator, callback, reverse_diffusion_step)


@register_sampler("pc", NEEDS, {
    "predictor": Param("reverse_diffusion", choices=tuple(PREDICTORS)),
    "corrector_steps": Param(1, low=1, high=100, integer=True, doc="Langevin steps per grid time"),
    "snr": Param(0.16, low=0.0, high=10.0, doc="signal-to-noise ratio of the Langevin step size"),
}, evals_per_step=lambda p: 1 + p["corrector_steps"], stochastic=True)
def predictor_corrector(model, x: Tensor, grid: Tensor, generator=None, callback=None,
                        predictor: str = "reverse_diffusion", corrector_steps: int = 1, snr: float = 0.16) -> Tensor:
    """Predictor-corrector (Song et al. 2021, Alg. 1): Langevin corrector steps, then a predictor step."""
    return _walk(model, x, grid, generator, callback, PREDICTORS[predictor], corrector_steps, snr)
