"""DDIM: denoising diffusion implicit models (Song, Meng & Ermon 2021).

One step from ``x_a`` at time ``t_a`` to ``t_b > t_a`` (Eq. 12, written for any Gaussian path
``x_t = alpha_t x1 + sigma_t eps``):

    x_b = alpha_b x1_hat + sqrt(sigma_b^2 - c^2) eps_hat + c z,
    c = eta * sqrt(var of q(x_b | x_a, x1))                 (Eq. 16)

``eta = 0`` is deterministic (one latent, one sample; it is a first-order integrator of the
probability-flow ODE in the log-SNR), ``eta = 1`` is DDPM's ancestral step. The grid is any
S-step subsequence of a DDPM model's training steps (``spacing``: trailing, leading,
quadratic; see ``models.samplers.time_grid``) or any time grid of a continuous path. The
DDIM paper's "sigma-hat" row is the ``ancestral`` sampler with ``variance: large``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.ddpm import SPACING, posterior, scheduler_at
from models.samplers import Param, register_sampler


@register_sampler("ddim", {"epsilon", "x1", "gaussian_source"},
                  {"eta": Param(0.0, low=0.0, high=1.0, doc="0: deterministic, 1: DDPM"), "spacing": SPACING},
                  stochastic=True)
def ddim(model, x: Tensor, grid: Tensor, generator: torch.Generator | None = None, callback=None,
         eta: float = 0.0) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12): deterministic at eta = 0, DDPM-like at eta = 1."""
    times = grid.tolist()
    sched = model.scheduler
    for i, (t_a, t_b) in enumerate(zip(times[:-1], times[1:]), start=1):
        x1, eps = model.pivot(x, t_a)
        alpha_b, sigma_b = scheduler_at(sched, t_b)
        c2 = eta**2 * posterior(sched, t_a, t_b).var_small if eta else 0.0
        x = alpha_b * x1 + math.sqrt(max(sigma_b**2 - c2, 0.0)) * eps
        if c2 > 0:
            x = x + math.sqrt(c2) * torch.randn(x.shape, generator=generator).to(x)
        if callback:
            callback(i, x)
    return x
