"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of
Diffusion Models", Algorithm 2).

One round halves the number of sampling steps: a student that starts from the teacher's weights
learns to do with ONE deterministic DDIM step (eta = 0) from grid time ``t_i`` to ``t_{i+1}``
what the frozen teacher does with TWO, ``t_i -> t_mid -> t_{i+1}``. The student's grid is
``time_grid(scheduler, N)`` (N = ``student_steps``) and the teacher's ``time_grid(scheduler, 2N)``,
whose even points must be the student's. A training example (in this repo's time, t = 0 the
noise end) is:

1. ``i = floor(u N)`` for the batch's ``u ~ U[0, 1)``, and ``x_t = alpha_i x1 + sigma_i x0``;
2. the teacher's two DDIM steps from ``(x_t, t_i)`` give ``x_next`` at ``t_{i+1}``;
3. the target is the data estimate whose single DDIM step from ``(x_t, t_i)`` lands on ``x_next``
   (Algorithm 2's ``x~``), ``implied_x1``:
   ``x1~ = (sigma_i x_next - sigma_next x_t) / (alpha_next sigma_i - sigma_next alpha_i)``;
4. the loss is the paper's "truncated SNR" weighting (Sec. 4), an x1-space error:
   ``max(alpha_i^2 / sigma_i^2, 1) ||x1_hat - x1~||^2`` (= ``max(||x1 err||^2, ||eps err||^2)``
   at fixed ``x_t``), averaged over elements; ``x1_hat`` is the student's output in its own
   parameterization converted to x1 (the paper recommends ``v`` or ``x1`` students; ``epsilon``
   cannot express x1 where alpha = 0, the noise end of ``cond_ot``).

The target's form has no division by ``sigma_i`` or ``alpha``: at the data end (``sigma_next = 0``
on DDPM, VP and cond_ot) it is the teacher's last step ``x_next = x1_hat(x_mid)`` itself, and at
``t = 0`` of cond_ot (``alpha_i = 0``) the denominator is ``alpha_next sigma_i > 0``; it is
positive wherever the log-SNR increases from ``t_i`` to ``t_{i+1}``, as on every path here.

The trained student is sampled by the ``ddim`` sampler at ``nfe = N`` (eta = 0, trailing
spacing). Repeating the round with the student as the next teacher and N halved is the paper's
outer loop; it is one objective run per round.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.objectives import Objective, register_objective
from models.parameterization import coefficients, to_pivot
from models.paths import Scheduler, SchedulerOutput
from models.samplers import time_grid


def ddim_step(model, x: Tensor, t_a: float | Tensor, t_b: float | Tensor) -> Tensor:
    """One deterministic DDIM step (Song et al. 2021, Eq. 12 with eta = 0) of ``model`` from ``x``
    at ``t_a`` to ``t_b``: ``alpha_b x1_hat + sigma_b eps_hat``. Times are floats or one per sample
    (``(B,)``); this is the ``ddim`` sampler's step at ``eta = 0``."""
    x1, eps = model.pivot(x, t_a)
    s_b = coefficients(model.scheduler, t_b, x)
    return s_b.alpha * x1 + s_b.sigma * eps


def implied_x1(x_a: Tensor, x_b: Tensor, s_a: SchedulerOutput, s_b: SchedulerOutput) -> Tensor:
    """The data estimate whose DDIM step from ``x_a`` (coefficients ``s_a``) lands on ``x_b``
    (``s_b``): solves ``x_b = alpha_b x1 + sigma_b (x_a - alpha_a x1) / sigma_a`` for ``x1``."""
    return (s_a.sigma * x_b - s_b.sigma * x_a) / (s_b.alpha * s_a.sigma - s_b.sigma * s_a.alpha)


def nested_grids(scheduler: Scheduler, student_steps: int) -> tuple[Tensor, Tensor]:
    """The student's grid of ``student_steps`` steps and the teacher's of twice as many (float64),
    checked to nest: every other teacher point is a student point."""
    if isinstance(student_steps, bool) or not isinstance(student_steps, int) or student_steps < 1:
        raise ValueError(f"student_steps: expected a positive integer, got {student_steps!r}")
    teacher_steps = 2 * student_steps
    timesteps = getattr(scheduler, "timesteps", None)
    if timesteps is not None and teacher_steps > timesteps:
        raise ValueError(f"student_steps: {student_steps} needs a teacher grid of {teacher_steps} steps, more than "
                         f"the schedule's {timesteps} training steps; expected student_steps <= {timesteps // 2}")
    student, teacher = time_grid(scheduler, student_steps), time_grid(scheduler, teacher_steps)
    if not torch.allclose(teacher[::2], student, rtol=0.0, atol=1e-12):
        raise ValueError(f"student_steps: the grid of {student_steps} steps is not every other point of the teacher's "
                         f"grid of {teacher_steps}; expected nested grids")
    return student, teacher


def same_path(a: Scheduler, b: Scheduler, times: Tensor) -> bool:
    """Whether two schedulers have the same grids and the same ``(alpha, sigma)`` at ``times``."""
    sa, sb = a(times), b(times)
    return (getattr(a, "timesteps", None) == getattr(b, "timesteps", None)
            and torch.allclose(sa.alpha, sb.alpha) and torch.allclose(sa.sigma, sb.sigma))


@register_objective("progressive_distillation")
class ProgressiveDistillation(Objective):
    """Salimans & Ho 2022, Algorithm 2: one student DDIM step fits two of the frozen teacher's.

    Options: ``student_steps`` (N), the student's number of DDIM steps; the teacher is sampled
    with 2N. Inputs: ``teacher``, a ``Denoiser`` on the same path as the student (any
    parameterization), never trained here.
    """

    inputs = ("teacher",)

    def __init__(self, model: nn.Module, inputs: dict[str, nn.Module] | None = None, *, student_steps: int,
                 **options) -> None:
        super().__init__(model, inputs, **options)  # options left over are unknown: refused there
        self.teacher = inputs["teacher"].eval().requires_grad_(False)
        self.student_steps = student_steps
        self.grid, self.teacher_grid = nested_grids(model.scheduler, student_steps)
        if not same_path(model.scheduler, self.teacher.scheduler, self.teacher_grid):
            raise ValueError("teacher: its path differs from the student's on the teacher's time grid; "
                             "expected the student's scheduler")

    def step_of(self, u: Tensor) -> Tensor:
        """Student grid step ``i = floor(u N)`` in 0..N-1 of uniform draws ``u`` in [0, 1)."""
        n = self.student_steps
        return (u.double() * n).floor().long().clamp(0, n - 1)

    def times(self, i: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(t_i, t_mid, t_{i+1})`` of student steps ``i``, in ``like``'s dtype and device."""
        grid = self.teacher_grid.to(like.device)
        return tuple(grid[2 * i + k].to(like.dtype) for k in range(3))

    @torch.no_grad()
    def target(self, x_t: Tensor, i: Tensor) -> Tensor:
        """The x1 whose one DDIM step from ``(x_t, t_i)`` matches the teacher's two steps to ``t_{i+1}``."""
        t_a, t_mid, t_b = self.times(i, x_t)
        x_next = ddim_step(self.teacher, ddim_step(self.teacher, x_t, t_a, t_mid), t_mid, t_b)
        sched = self.teacher.scheduler
        return implied_x1(x_t, x_next, coefficients(sched, t_a, x_t), coefficients(sched, t_b, x_t))

    def loss(self, net: nn.Module, batch) -> Tensor:
        i = self.step_of(batch.t)
        t_a = self.times(i, batch.x1)[0]
        s = coefficients(self.model.scheduler, t_a, batch.x1)
        x_t = s.alpha * batch.x1 + s.sigma * batch.x0
        x1_hat, _ = to_pivot(net(x_t, t_a), x_t, s, self.model.parameterization)
        weight = torch.maximum(s.alpha**2, s.sigma**2) / s.sigma**2  # max(SNR, 1); sigma_i > 0 off the data end
        return (weight * (x1_hat - self.target(x_t, i)) ** 2).mean()
