"""What the network predicts, and how to translate between the possible choices.

Every parameterization, together with ``x_t`` and the scheduler, pins down the pair
``(x1_hat, eps_hat)`` (data and source estimates), because

    x_t = alpha * x1 + sigma * eps,   velocity = d_alpha * x1 + d_sigma * eps,   score = -eps / sigma,
    v = alpha * eps - sigma * x1   (Salimans & Ho 2022, Sec. 4: "v-prediction").

So conversions go through that pair.  ``score`` assumes a standard normal source.
``velocity`` is the flow's dx/dt; ``v`` is the rotated target of progressive distillation.

Divisions that can hit zero at the ends of the path are clamped by ``EPS``:
``sigma`` (zero at ``t = 1``) when recovering ``eps`` from ``x1`` or forming the score,
``alpha`` (zero at ``t = 0``) when recovering ``x1`` from ``eps``/``score``, and the
determinant ``alpha * d_sigma - sigma * d_alpha`` of the velocity system (sign kept).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor, nn

from models.paths import Scheduler, SchedulerOutput, expand_like, time_batch

PARAMETERIZATIONS = ("velocity", "epsilon", "x1", "score", "v")
EPS = 1e-5


def _check(name: str) -> None:
    if name not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterization {name!r}; valid choices: {PARAMETERIZATIONS}")


def _safe(d: Tensor) -> Tensor:
    """Keep a denominator at least ``EPS`` away from zero without changing its sign."""
    return torch.where(d >= 0, d.clamp(min=EPS), d.clamp(max=-EPS))


def to_pivot(pred: Tensor, x_t: Tensor, s: SchedulerOutput, source: str) -> tuple[Tensor, Tensor]:
    """Recover ``(x1_hat, eps_hat)`` from a prediction in the ``source`` parameterization."""
    _check(source)
    if source == "x1":
        return pred, (x_t - s.alpha * pred) / _safe(s.sigma)
    if source == "velocity":
        det = _safe(s.alpha * s.d_sigma - s.sigma * s.d_alpha)
        return (s.d_sigma * x_t - s.sigma * pred) / det, (s.alpha * pred - s.d_alpha * x_t) / det
    if source == "v":  # [x_t; v] = [[alpha, sigma], [-sigma, alpha]] [x1; eps]
        norm = s.alpha**2 + s.sigma**2
        return (s.alpha * x_t - s.sigma * pred) / norm, (s.sigma * x_t + s.alpha * pred) / norm
    eps = pred if source == "epsilon" else -s.sigma * pred
    return (x_t - s.sigma * eps) / _safe(s.alpha), eps


def from_pivot(x1: Tensor, eps: Tensor, s: SchedulerOutput, target: str) -> Tensor:
    """Express the pair ``(x1, eps)`` in the ``target`` parameterization."""
    _check(target)
    if target == "x1":
        return x1
    if target == "epsilon":
        return eps
    if target == "velocity":
        return s.d_alpha * x1 + s.d_sigma * eps
    if target == "v":
        return s.alpha * eps - s.sigma * x1
    return -eps / _safe(s.sigma)


def coefficients(scheduler: Scheduler, t: float | Tensor, x: Tensor) -> SchedulerOutput:
    """The scheduler at ``t``, shaped to broadcast against ``x``. A time shared by the whole batch
    (a float, or a batch expanded from one value, as samplers pass) is evaluated once."""
    t = time_batch(t, x)
    if len(t) > 1 and t.stride(0) == 0:  # samplers revisit the same grid times shard after shard
        return _shared_coefficients(scheduler, float(t[0]), x.dtype, x.device, x.ndim)
    return scheduler(expand_like(t, x))


@functools.lru_cache(maxsize=4096)
def _shared_coefficients(scheduler: Scheduler, t: float, dtype, device, ndim: int) -> SchedulerOutput:
    return scheduler(torch.full((1,) * ndim, t, dtype=dtype, device=device))


def convert(
    pred: Tensor, x_t: Tensor, t: Tensor, scheduler: Scheduler, source: str, target: str
) -> Tensor:
    """Translate a network output at ``(x_t, t)`` from ``source`` to ``target`` parameterization."""
    _check(source)
    _check(target)
    if source == target:
        return pred
    s = coefficients(scheduler, t, x_t)
    return from_pivot(*to_pivot(pred, x_t, s, source), s, target)


class Denoiser(nn.Module):
    """A network ``net(x, t)`` together with what it predicts and on which path.

    Samplers ask for the quantity they need (velocity for ODEs, score for SDEs, the pair
    ``(x1, epsilon)`` for DDIM and ancestral steps) and need not know how it was trained.
    """

    #: What samplers may ask of it (see ``models.samplers``); a run whose source is N(0, I)
    #: adds "gaussian_source" (what ancestral and DDIM steps assume).
    provides = frozenset({"velocity", "epsilon", "x1", "score", "v"})

    def __init__(self, net: nn.Module, scheduler: Scheduler, parameterization: str = "velocity"):
        super().__init__()
        _check(parameterization)
        self.net = net
        self.scheduler = scheduler
        self.parameterization = parameterization

    def forward(self, x: Tensor, t: float | Tensor) -> Tensor:
        """Raw network output, in ``self.parameterization``."""
        return self.net(x, time_batch(t, x))

    def predict(self, x: Tensor, t: float | Tensor, target: str) -> Tensor:
        """Network output converted to ``target``."""
        t = time_batch(t, x)
        return convert(self(x, t), x, t, self.scheduler, self.parameterization, target)

    def pivot(self, x: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """``(x1_hat, eps_hat)`` from one network evaluation."""
        return to_pivot(self(x, t), x, coefficients(self.scheduler, t, x), self.parameterization)

    def prior(self, shape: tuple[int, ...], n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of where sampling starts (t = 0): ``N(0, prior_std^2 I)`` of the scheduler."""
        x = torch.randn((n, *shape), generator=generator)
        std = self.scheduler.prior_std
        return x if std == 1.0 else x * std

    def prior_log_prob(self, x: Tensor) -> Tensor:
        """log density of ``prior``'s draws, N(0, prior_std^2 I), summed over each example."""
        std = self.scheduler.prior_std
        per_dim = -0.5 * (x / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)
        return per_dim.flatten(1).sum(1)

    def velocity(self, x: Tensor, t: float | Tensor) -> Tensor:
        return self.predict(x, t, "velocity")

    def epsilon(self, x: Tensor, t: float | Tensor) -> Tensor:
        return self.predict(x, t, "epsilon")

    def x1(self, x: Tensor, t: float | Tensor) -> Tensor:
        return self.predict(x, t, "x1")

    def score(self, x: Tensor, t: float | Tensor) -> Tensor:
        return self.predict(x, t, "score")
