"""NCSN: noise-conditional score networks and annealed Langevin dynamics (Song & Ermon 2019,
"Generative Modeling by Estimating Gradients of the Data Distribution"; NCSNv2, Song & Ermon
2020, "Improved Techniques for Training Score-Based Generative Models").

- The noise levels are ``models.paths.NCSNScheduler``: L geometric sigmas of the VE path.
- Training (``ncsn`` objective): denoising score matching at a level drawn uniformly from the
  L levels, weighted by ``lambda(sigma) = sigma^2`` (Eq. 6): the squared error of the implied
  epsilon, as in ``models.score_sde``.
- Sampling (``annealed_langevin``): Alg. 1. At each level ``sigma_i`` of the grid, from the
  largest to the smallest, ``steps_per_level`` Langevin steps
  ``x + alpha_i / 2 score(x, sigma_i) + sqrt(alpha_i) z`` with ``alpha_i = step_size
  sigma_i^2 / sigma_L^2``; optionally a final denoising step to the predicted data
  (Tweedie's formula ``x + sigma_L^2 score``, NCSNv2 Sec. 3 / Jolicoeur-Martineau et al. 2021).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from models.objectives import register_objective
from models.paths import time_batch
from models.samplers import Param, register_sampler
from models.score_sde import DenoisingScoreMatching


@register_objective("ncsn")
class NoiseConditionalScoreMatching(DenoisingScoreMatching):
    """Song & Ermon 2019, Eq. 6: DSM at one of the L noise levels, uniformly, lambda = sigma^2."""

    def times(self, u: Tensor) -> Tensor:
        levels = self.model.scheduler.timesteps
        return ((u.double() * levels).floor().clamp(max=levels - 1) + 1).div(levels).to(u.dtype)


@register_sampler("annealed_langevin", {"score", "gaussian_source", "noise_levels"}, {
    "steps_per_level": Param(5, low=1, high=10_000, integer=True, doc="Langevin steps T at each level"),
    "step_size": Param(2e-5, low=0.0, high=1.0, doc="epsilon: the step at the smallest level"),
    "denoise": Param(True, choices=(True, False), doc="end with a jump to the predicted data (1 NFE)"),
}, evals_per_step=lambda p: p["steps_per_level"], stochastic=True)
def annealed_langevin(model, x: Tensor, grid: Tensor, generator=None, callback=None, steps_per_level: int = 5,
                      step_size: float = 2e-5, denoise: bool = True) -> Tensor:
    """Annealed Langevin dynamics (Song & Ermon 2019, Alg. 1) at the grid's levels after the prior."""
    times = grid.tolist()[1:]
    sigma = lambda t: float(model.scheduler(torch.tensor(t, dtype=torch.float64)).sigma)  # noqa: E731
    smallest = sigma(times[-1])
    for i, t in enumerate(times, start=1):
        alpha = step_size * (sigma(t) / smallest) ** 2
        for _ in range(steps_per_level):
            z = torch.randn(x.shape, generator=generator).to(x)
            x = x + 0.5 * alpha * model.score(x, time_batch(t, x)) + math.sqrt(alpha) * z
        if callback and not (denoise and i == len(times)):
            callback(i, x)
    if denoise:
        x = model.pivot(x, times[-1])[0]
        if callback:
            callback(len(times), x)
    return x
