"""Gaussian probability paths between a source distribution and the data.

Time convention (the one of facebookresearch/flow_matching, used everywhere in
``models``):

* ``t`` lies in ``[0, 1]``;
* ``t = 0`` is the SOURCE sample ``x0`` (standard normal noise by default, but
  any distribution works for flow matching);
* ``t = 1`` is the DATA sample ``x1``.

A Gaussian path interpolates ``x_t = alpha_t * x1 + sigma_t * x0`` with
``alpha_0 = 0, sigma_0 = 1`` and ``alpha_1 = 1, sigma_1 = 0``.  The VP and VE
schedulers only meet these endpoints approximately (VP: ``alpha_0`` is tiny but
positive; VE: ``alpha`` is always 1 and ``sigma_1 = sigma_min``).  Diffusion
papers run time the other way; ``VPScheduler`` states its formulas in diffusion
time ``s = 1 - t`` and converts.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
from torch import Tensor


def expand_like(t: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample time ``(B,)`` to ``(B, 1, ..., 1)`` so it broadcasts against ``x``."""
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def time_batch(t: float | Tensor, x: Tensor) -> Tensor:
    """Turn a float, 0-d or ``(B,)`` time into a ``(B,)`` tensor on ``x``'s device and dtype.

    Networks always receive one time per sample; callers may be lazier.
    """
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(-1).expand(x.shape[0])


@dataclass(frozen=True)
class SchedulerOutput:
    """``alpha_t``, ``sigma_t`` and their time derivatives, shaped like the ``t`` given."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor
    d_sigma: Tensor


class Scheduler(abc.ABC):
    """Maps time ``t`` to the coefficients of ``x_t = alpha_t * x1 + sigma_t * x0``."""

    @abc.abstractmethod
    def __call__(self, t: Tensor) -> SchedulerOutput: ...


class CondOTScheduler(Scheduler):
    """Straight line between source and data (rectified flow / conditional OT)."""

    def __call__(self, t: Tensor) -> SchedulerOutput:
        return SchedulerOutput(
            alpha=t, sigma=1 - t, d_alpha=torch.ones_like(t), d_sigma=-torch.ones_like(t)
        )


class VPScheduler(Scheduler):
    """Variance preserving (DDPM / VP-SDE) path with a linear beta schedule.

    In diffusion time ``s = 1 - t``: ``alpha = exp(-B(s) / 2)``, ``sigma = sqrt(1 - alpha^2)``
    with ``B(s) = beta_min * s + (beta_max - beta_min) * s^2 / 2``.  ``d_sigma`` diverges
    at ``t = 1`` (``sigma -> 0`` like a square root), so ``sigma`` is clamped in that division.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-12):
        self.beta_min, self.beta_max, self.eps = beta_min, beta_max, eps

    def __call__(self, t: Tensor) -> SchedulerOutput:
        s = 1 - t
        big_b = self.beta_min * s + 0.5 * (self.beta_max - self.beta_min) * s**2
        beta = self.beta_min + (self.beta_max - self.beta_min) * s
        alpha = torch.exp(-0.5 * big_b)
        sigma = torch.sqrt(-torch.expm1(-big_b))  # 1 - alpha^2, accurate near s = 0
        d_alpha = 0.5 * beta * alpha  # ds/dt = -1 flips the sign of d alpha / ds
        d_sigma = -alpha * d_alpha / sigma.clamp(min=self.eps)
        return SchedulerOutput(alpha=alpha, sigma=sigma, d_alpha=d_alpha, d_sigma=d_sigma)


class VEScheduler(Scheduler):
    """Variance exploding (NCSN / VE-SDE) path: data kept, noise shrinks geometrically."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def __call__(self, t: Tensor) -> SchedulerOutput:
        log_ratio = math.log(self.sigma_max / self.sigma_min)
        sigma = self.sigma_min * torch.exp((1 - t) * log_ratio)
        return SchedulerOutput(
            alpha=torch.ones_like(t),
            sigma=sigma,
            d_alpha=torch.zeros_like(t),
            d_sigma=-log_ratio * sigma,
        )


SCHEDULERS: dict[str, type[Scheduler]] = {
    "cond_ot": CondOTScheduler,
    "vp": VPScheduler,
    "ve": VEScheduler,
}


def make_scheduler(name: str, **kwargs) -> Scheduler:
    """Build a scheduler from its config name."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; valid choices: {sorted(SCHEDULERS)}")
    return SCHEDULERS[name](**kwargs)


@dataclass
class PathSample:
    """A point on the conditional path together with what produced it."""

    x_t: Tensor
    t: Tensor
    x0: Tensor
    x1: Tensor
    dx_t: Tensor  # conditional velocity d_alpha * x1 + d_sigma * x0


class GaussianPath:
    """The conditional path ``x_t = alpha_t x1 + sigma_t x0`` given by a scheduler."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        """Place each pair ``(x0[i], x1[i])`` at its time ``t[i]`` (``t`` of shape ``(B,)``)."""
        s = self.scheduler(expand_like(t, x1))
        x_t = s.alpha * x1 + s.sigma * x0
        dx_t = s.d_alpha * x1 + s.d_sigma * x0
        return PathSample(x_t=x_t, t=t, x0=x0, x1=x1, dx_t=dx_t)
