"""Parallel sampling by Picard iterations over a sliding window: ParaDiGMS (Shih, Belkhale,
Ermon, Sadigh & Anari 2023, "Parallel Sampling of Diffusion Models", Alg. 1).

A sequential sampler takes N steps ``x_{i+1} = step_i(x_i)``, one network evaluation each, one
after the other. Write every step as a number times ``x_i`` (its linear part) plus what the
network makes:

    x_{i+1} = a_i x_i + g_i(x_i)

Euler on the probability-flow / flow ODE is ``a_i = 1``, ``g_i = dt_i v(x_i, t_i)``; DDIM at
eta = 0 is ``a_i = sigma_b / sigma_a`` and ``g_i = alpha_b x1_hat + sigma_b eps_hat - a_i x_a``
(= ``(alpha_b - sigma_b alpha_a / sigma_a) x1_hat(x_a)`` whenever the pivot is consistent,
``x_a = alpha_a x1_hat + sigma_a eps_hat``; writing DDIM's own step keeps its fixed point DDIM's
where the pivot clamps a division, e.g. an epsilon network on CondOT at t = 0).

Picard iteration keeps guesses of ``p`` consecutive points ``x_{s+1..s+p}`` after a window start
``x_s`` that is final. One *round* evaluates ``g`` at ``x_s .. x_{s+p-1}`` in ONE batched network
call (``p * B`` rows), then recomputes all ``p`` points from ``x_s`` by the scan
``x_{j+1} = a_j x_j + g_j`` (the linear part exactly, no network call; for Euler it is Alg. 1's
cumulative sum of drifts). The window then slides past the leading points that are settled and
is filled up with copies of its last point; sampling ends when the window passes the end.
At the fixed point every step holds, so the samples are the sequential sampler's; the rounds
(sequential network calls) are far fewer than N on smooth models, the evaluations more.

When a point is settled (``tol``). A round's change of point ``j`` is the RMS over dimensions of
``x_j(new) - x_j(old)``, relative to the path's scale at ``t_j``, ``sqrt(alpha_t^2 + sigma_t^2)``
(1 on VP / DDPM, 0.71 to 1 on CondOT, ``sqrt(1 + sigma_t^2)`` on VE: the RMS of ``x_t`` for
unit-variance data), and the largest over the batch's samples. The first point of a window is
exact (its ``g`` was evaluated at the final ``x_s``); point ``j + 1`` is accepted with it when the
changes of points ``s+1 .. j`` are all at most ``tol``: then every ``g`` that made it was evaluated
within ``tol`` (RMS per dimension, relative to the path's scale) of its point's accepted value.
That is what ``tol`` bounds; the distance to the sequential sampler's output is a path-dependent
multiple of it (``tests/test_parallel.py`` measures at most 3 tol, max abs, on an exact Gaussian
model). Every round accepts at least one point, so rounds <= N (on a path singular at the data
``picard_euler`` counts its final jump as one round of its N, as ``euler`` does); ``tol = 0``
accepts a point only once the points before it stopped moving exactly: the sequential values
(to rounding), still in at most N rounds. The samples of a batch move together (one window for
the batch), so a sample's result depends on the batch ``x`` it is drawn with, the grid and the
parameters, nothing else; a window call evaluates ``p * B`` rows at once (memory).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from models.ddpm import SPACING, scheduler_at
from models.samplers import Param, register_sampler
from models.solvers import _to_data

#: ``network_part(points, first) -> g``: the network terms ``g_{first + k}(points[k])`` of the
#: window's points ``(p, B, ...)``, made with one batched network call.
NetworkPart = Callable[[Tensor, int], Tensor]


PICARD_PARAMS = {
    "window": Param(16, low=1, integer=True, doc="points evaluated in one batched network call (the whole grid "
                                                 "when larger)"),
    "tol": Param(1e-3, low=0.0, high=1.0, doc="largest change, RMS per dimension relative to the path's scale, "
                                              "of the points a window accepts"),
}


def picard(x: Tensor, linear: Sequence[float], network_part: NetworkPart, scale: Sequence[float], window: int,
           tol: float, callback=None) -> Tensor:
    """Solve the chain ``x_{i+1} = linear[i] x_i + g_i(x_i)``, ``i < len(linear)``, from ``x_0 = x``
    by Picard iterations over a sliding window of ``window`` points (module docstring).
    ``scale[j]`` is the path's scale at point ``j`` (what a change is measured against);
    ``callback(j, x_j)`` sees each point once, in order, when it is accepted."""
    steps, batch = len(linear), len(x)
    start, points = 0, x.unsqueeze(0)  # points[k]: the guess of x_{start + k}; points[0] is final
    while start < steps:
        size = min(window, steps - start)
        points = torch.cat([points, points[-1:].expand(size + 1 - len(points), *x.shape)])
        g = network_part(points[:size], start)
        updated = [points[0]]
        for k in range(size):
            updated.append(linear[start + k] * updated[k] + g[k])
        updated = torch.stack(updated)
        change = (updated[1:] - points[1:]).reshape(size, batch, -1).pow(2).mean(2).sqrt().amax(1)
        change = change / torch.tensor(scale[start + 1:start + size + 1], dtype=change.dtype, device=change.device)
        settled = int((change[:-1] <= tol).int().cumprod(0).sum())  # leading points that moved at most tol
        accepted = settled + 1
        if callback:
            for k in range(1, accepted + 1):
                callback(start + k, updated[k])
        points, start = updated[accepted:], start + accepted
    return points[0]


def rows(points: Tensor, times: Sequence[float]) -> tuple[Tensor, Tensor]:
    """The window's points ``(p, B, ...)`` as one batch of ``p * B`` rows, and each row's time."""
    t = torch.tensor(times, dtype=points.dtype, device=points.device).repeat_interleave(points.shape[1])
    return points.flatten(0, 1), t


def per_point(values: Sequence[float], like: Tensor) -> Tensor:
    """One number per window point, shaped ``(p, 1, ..., 1)`` to broadcast against ``(p, B, ...)``."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *[1] * (like.ndim - 1))


def path_scale(scheduler, times: Sequence[float]) -> list[float]:
    """``sqrt(alpha_t^2 + sigma_t^2)`` at each time: the RMS of ``x_t`` for unit-variance data."""
    return [math.hypot(*scheduler_at(scheduler, t)) for t in times]


@register_sampler("picard_euler", {"velocity"}, PICARD_PARAMS)
def picard_euler(model, x: Tensor, grid: Tensor, generator=None, callback=None, window: int = 16,
                 tol: float = 1e-3) -> Tensor:
    """Probability-flow / flow ODE, the Euler steps of ``euler`` solved by Picard iterations over a
    sliding window (ParaDiGMS); a path singular at the data ends with the same 1-NFE jump."""
    times = grid.tolist()
    jump = model.scheduler.ode_end < times[-1]
    chain = times[:-1] if jump else times  # the Euler steps; then the jump from chain[-1]
    dt = [t_b - t_a for t_a, t_b in zip(chain[:-1], chain[1:])]

    def drifts(points: Tensor, first: int) -> Tensor:
        flat, t = rows(points, chain[first:first + len(points)])
        velocity = model.velocity(flat, t).reshape(points.shape)
        return per_point(dt[first:first + len(points)], points) * velocity

    x = picard(x, [1.0] * len(dt), drifts, path_scale(model.scheduler, chain), window, tol, callback)
    return _to_data(model, x, chain[-1], callback, len(times) - 1) if jump else x


@register_sampler("picard_ddim", {"epsilon", "x1", "gaussian_source"}, {**PICARD_PARAMS, "spacing": SPACING})
def picard_ddim(model, x: Tensor, grid: Tensor, generator=None, callback=None, window: int = 16,
                tol: float = 1e-3) -> Tensor:
    """DDIM at eta = 0 (the steps of ``ddim``, same grid and spacing) solved by Picard iterations
    over a sliding window (ParaDiGMS), the linear part of each step exactly."""
    times = grid.tolist()
    alpha, sigma = zip(*(scheduler_at(model.scheduler, t) for t in times))
    linear = [sigma[i + 1] / sigma[i] for i in range(len(times) - 1)]  # sigma > 0 wherever a step starts

    def network_part(points: Tensor, first: int) -> Tensor:
        steps = range(first, first + len(points))
        x1, eps = model.pivot(*rows(points, times[first:first + len(points)]))
        ddim_step = (per_point([alpha[i + 1] for i in steps], points) * x1.reshape(points.shape)
                     + per_point([sigma[i + 1] for i in steps], points) * eps.reshape(points.shape))
        return ddim_step - per_point([linear[i] for i in steps], points) * points

    return picard(x, linear, network_part, path_scale(model.scheduler, times), window, tol, callback)
