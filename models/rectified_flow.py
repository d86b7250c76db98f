"""Rectified flow: reflow on generated couplings, straightness, and one-step distillation.

Liu, Gong & Liu 2023, "Flow Straight and Fast: Learning to Generate and Transfer Data with
Rectified Flow". A 1-rectified flow is flow matching on the straight (CondOT) path from
independent pairs (Eq. 1). *Reflow* (Sec. 2.3) simulates that flow's ODE from fresh draws,
z -> x = ODE(z), and trains the next flow by the same objective on the *paired* rows (z, x):
its paths cross less, so it is straighter, and k rounds give the k-rectified flow. The pairs are
a coupling set (``tasks/couplings.py`` makes them; ``models.pairs.PairSampler(paired=True)``
draws them); reflow itself needs no new objective.

What is new here:
- ``straightness`` of a flow, S(Z) = int_0^1 E ||(Z_1 - Z_0) - v(Z_t, t)||^2 dt (Definition 2.2),
  along the flow's own simulated paths;
- ``one_step_distillation``: fit v(z, 0) to x - z on a coupling set, so that one Euler step
  z + v(z, 0) lands where the teacher's ODE does (Sec. 2.3, "distillation"; the paper uses LPIPS
  on images, here the L2 distance).
"""

from __future__ import annotations

import torch
from torch import Tensor

from models.objectives import PathRegression, register_objective
from models.samplers import time_grid


@register_objective("one_step_distillation")
class OneStepDistillation(PathRegression):
    """Regress the velocity at t = 0 only: on the straight path from a coupling's pair (z, x) the
    target there is x - z, so the loss is ||z + v(z, 0) - x||^2, one Euler step onto the pair's
    end. Trained on paired rows (a coupling set), usually starting from the flow that made them."""

    def times(self, u: Tensor) -> Tensor:
        return torch.zeros_like(u)


@torch.no_grad()
def straightness(model, x0: Tensor, steps: int = 100) -> tuple[float, Tensor]:
    """(S, x1): the straightness of the flow ``model.velocity`` along its Euler paths from ``x0``
    in ``steps`` uniform steps, S = mean over steps and rows of ||(x1 - x0) - v(x_t, t)||^2 (summed
    over dimensions, Liu et al. Definition 2.2), and the paths' ends x1. A straight flow has S = 0
    and then one Euler step is exact."""
    grid = time_grid(model.scheduler, steps).tolist()
    x, velocities = x0, []
    for t_a, t_b in zip(grid[:-1], grid[1:]):
        v = model.velocity(x, t_a)
        velocities.append(v)
        x = x + (t_b - t_a) * v
    chord = x - x0
    gaps = torch.stack([(chord - v).flatten(1).pow(2).sum(1) for v in velocities])  # (steps, rows)
    return float(gaps.mean()), x
