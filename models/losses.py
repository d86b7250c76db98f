"""Training objectives.

The regression target is written once, for any parameterization, from the pair
``(x1, x0)`` that generated the path sample; diffusion-style losses can reuse
``target_for`` and only change how ``t`` is drawn or weighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.parameterization import Denoiser, from_pivot
from models.paths import GaussianPath, PathSample, Scheduler, expand_like


def target_for(parameterization: str, sample: PathSample, scheduler: Scheduler) -> Tensor:
    """What a network in ``parameterization`` should output at ``sample.x_t``.

    velocity -> ``dx_t``, epsilon -> ``x0``, x1 -> ``x1``, score -> ``-x0 / sigma_t``. On a path
    with noise around its mean (Tong et al. 2024) the target is its velocity ``dx_t``, noise
    included; the other parameterizations are not defined there.
    """
    if scheduler.noisy:
        if parameterization != "velocity":
            raise ValueError(f"a path with noise around its mean trains velocity, not {parameterization!r}")
        return sample.dx_t
    s = scheduler(expand_like(sample.t, sample.x1))
    return from_pivot(sample.x1, sample.x0, s, parameterization)


def sample_time(batch: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``t ~ U[0, 1]`` per sample, on ``like``'s device and dtype."""
    return torch.rand(batch, generator=generator, device=like.device, dtype=like.dtype)


def flow_matching_loss(
    model: Denoiser,
    path: GaussianPath,
    x0: Tensor,
    x1: Tensor,
    t: Tensor | None = None,
    generator: torch.Generator | None = None,
    parameterization: str | None = None,
) -> Tensor:
    """Conditional flow matching: mean squared error to the conditional target.

    ``model`` may be a wrapper (e.g. DistributedDataParallel) of a ``Denoiser``; then
    pass the wrapped model's ``parameterization``.

    Its minimiser is the marginal quantity (e.g. the marginal velocity) because the
    conditional target is an unbiased estimate of it given ``x_t``.
    """
    if t is None:
        t = sample_time(x1.shape[0], x1, generator)
    sample = path.sample(x0, x1, t)
    target = target_for(parameterization or model.parameterization, sample, path.scheduler)
    return F.mse_loss(model(sample.x_t, sample.t), target)
