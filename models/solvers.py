"""ODE samplers for ``dx/dt = v(x, t)``.

Fixed-step methods are written out here so that the number of network evaluations
(NFE) is exact and known in advance; ``dopri5`` delegates to ``torchdiffeq``.
Integration runs from ``t0`` to ``t1`` (default source -> data); ``t1 < t0``
integrates backward, e.g. data -> noise for likelihoods or reflow inversion.

``solve_ode`` integrates any velocity function; the same methods are registered as
samplers (``models.samplers``) that integrate a model's velocity over a time grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from models.paths import time_batch
from models.samplers import Param, register_sampler

VelocityFn = Callable[[Tensor, Tensor], Tensor]
Step = Callable[[VelocityFn, Tensor, float, float], Tensor]

DEFAULT_STEPS = 100


def _euler(f: VelocityFn, x: Tensor, t: float, dt: float) -> Tensor:
    return x + dt * f(x, t)


def _midpoint(f: VelocityFn, x: Tensor, t: float, dt: float) -> Tensor:
    return x + dt * f(x + 0.5 * dt * f(x, t), t + 0.5 * dt)


def _heun(f: VelocityFn, x: Tensor, t: float, dt: float) -> Tensor:
    d = f(x, t)
    return x + 0.5 * dt * (d + f(x + dt * d, t + dt))


def _rk4(f: VelocityFn, x: Tensor, t: float, dt: float) -> Tensor:
    k1 = f(x, t)
    k2 = f(x + 0.5 * dt * k1, t + 0.5 * dt)
    k3 = f(x + 0.5 * dt * k2, t + 0.5 * dt)
    k4 = f(x + dt * k3, t + dt)
    return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


# method -> (one step, velocity evaluations per step)
_STEPPERS: dict[str, tuple[Step, int]] = {
    "euler": (_euler, 1),
    "midpoint": (_midpoint, 2),
    "heun": (_heun, 2),
    "rk4": (_rk4, 4),
}
FIXED_STEP_METHODS = tuple(_STEPPERS)
ADAPTIVE_METHODS = ("dopri5",)


@dataclass
class ODESolution:
    x: Tensor
    nfe: int
    trajectory: Tensor | None  # (n_points, B, ...) when requested


class _Counted:
    """Wraps ``velocity_fn``: counts its calls and hands it a ``(B,)`` time."""

    def __init__(self, velocity_fn: VelocityFn):
        self.velocity_fn, self.calls = velocity_fn, 0

    def __call__(self, x: Tensor, t: float | Tensor) -> Tensor:
        self.calls += 1
        return self.velocity_fn(x, time_batch(t, x))


def steps_for_nfe(method: str, nfe: int) -> int:
    """Number of steps of a fixed-step ``method`` that costs exactly ``nfe`` evaluations."""
    if method not in _STEPPERS:
        raise ValueError(f"{method!r} is not a fixed-step method; choose from {FIXED_STEP_METHODS}")
    per_step = _STEPPERS[method][1]
    if nfe <= 0 or nfe % per_step:
        raise ValueError(
            f"method {method!r} uses {per_step} evaluations per step: "
            f"nfe must be a positive multiple of {per_step}, got {nfe}"
        )
    return nfe // per_step


def _integrate(step: Step, f: VelocityFn, x: Tensor, times: list[float], callback=None) -> Tensor:
    """Fixed steps through ``times``; ``callback(i, x)`` after reaching ``times[i]``."""
    for i, (ta, tb) in enumerate(zip(times[:-1], times[1:]), start=1):
        x = step(f, x, ta, tb - ta)
        if callback:
            callback(i, x)
    return x


def _solve_fixed(
    f: _Counted, x: Tensor, method: str, steps: int, t0: float, t1: float, keep: bool
) -> tuple[Tensor, list[Tensor]]:
    times = torch.linspace(t0, t1, steps + 1, dtype=torch.float64).tolist()
    path = [x] if keep else []
    x = _integrate(_STEPPERS[method][0], f, x, times, (lambda _, y: path.append(y)) if keep else None)
    return x, path


def _solve_adaptive(
    f: _Counted, x: Tensor, t0: float, t1: float, atol: float, rtol: float, points: int
) -> tuple[Tensor, list[Tensor]]:
    from torchdiffeq import odeint  # it imports SciPy (a second): only where dopri5 runs

    times = torch.linspace(t0, t1, points, dtype=x.dtype, device=x.device)
    path = odeint(lambda t, y: f(y, t), x, times, method="dopri5", atol=atol, rtol=rtol)
    return path[-1], list(path)


@torch.no_grad()
def solve_ode(
    velocity_fn: VelocityFn,
    x0: Tensor,
    method: str = "euler",
    steps: int | None = None,
    nfe: int | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    return_trajectory: bool = False,
    trajectory_points: int = 21,
) -> ODESolution:
    """Integrate ``dx/dt = velocity_fn(x, t_batch)`` from ``x0`` at ``t0`` to ``t1``.

    Fixed-step methods take ``steps`` or ``nfe`` (not both; neither means
    ``DEFAULT_STEPS``).  ``dopri5`` adapts its steps to ``atol``/``rtol`` and rejects
    both.  The reported ``nfe`` is the number of ``velocity_fn`` calls actually made.
    """
    f = _Counted(velocity_fn)
    if method in ADAPTIVE_METHODS:
        if steps is not None or nfe is not None:
            raise ValueError(f"{method!r} chooses its own steps; set atol/rtol instead of steps/nfe")
        points = trajectory_points if return_trajectory else 2
        x, path = _solve_adaptive(f, x0, t0, t1, atol, rtol, points)
    elif method in FIXED_STEP_METHODS:
        if steps is not None and nfe is not None:
            raise ValueError("give either steps or nfe, not both")
        if nfe is not None:
            steps = steps_for_nfe(method, nfe)
        steps = DEFAULT_STEPS if steps is None else steps
        if steps <= 0:
            raise ValueError(f"steps must be positive, got {steps}")
        x, path = _solve_fixed(f, x0, method, steps, t0, t1, return_trajectory)
    else:
        raise ValueError(
            f"unknown ODE method {method!r}; valid choices: {FIXED_STEP_METHODS + ADAPTIVE_METHODS}"
        )
    trajectory = torch.stack(path) if return_trajectory else None
    return ODESolution(x=x, nfe=f.calls, trajectory=trajectory)


# --------------------------------------------------------------------------- as samplers


def _velocity(model):
    return lambda x, t: model.velocity(x, time_batch(t, x))


def _to_data(model, x: Tensor, t: float, callback, i: int) -> Tensor:
    """The jump from time ``t`` to the data end: the predicted data ``x1_hat(x, t)`` (1 NFE)."""
    x = model.pivot(x, t)[0]
    if callback:
        callback(i, x)
    return x


def _fixed_step_sampler(method: str):
    def sample(model, x: Tensor, grid: Tensor, generator=None, callback=None) -> Tensor:
        times = grid.tolist()
        if model.scheduler.ode_end >= times[-1]:
            return _integrate(_STEPPERS[method][0], _velocity(model), x, times, callback)
        # the velocity diverges at the data end of this path: the last step is a jump to the
        # predicted data (DDIM's last step; k-diffusion ends Heun with an Euler step the same way)
        x = _integrate(_STEPPERS[method][0], _velocity(model), x, times[:-1], callback)
        return _to_data(model, x, times[-2], callback, len(times) - 1)

    sample.__doc__ = (f"Probability-flow / flow ODE, {method} steps over the grid ({_STEPPERS[method][1]} NFE a "
                      "step; a path singular at the data ends with a 1-NFE jump to the predicted data).")
    return sample


for _name, (_, _evals) in _STEPPERS.items():
    register_sampler(_name, {"velocity"}, evals_per_step=_evals, ode_path=True)(_fixed_step_sampler(_name))

_TOLERANCE = Param(1e-5, low=1e-12, high=1.0, doc="torchdiffeq tolerance")


@register_sampler("dopri5", {"velocity"}, {"atol": _TOLERANCE, "rtol": _TOLERANCE}, adaptive=True)
def dopri5(model, x: Tensor, grid: Tensor, generator=None, callback=None, atol: float = 1e-5,
           rtol: float = 1e-5) -> Tensor:
    """Probability-flow / flow ODE, adaptive Dormand-Prince 5(4) (torchdiffeq), to the scheduler's
    ``ode_end`` (then a jump to the predicted data if that is before t = 1); reports at ``grid``."""
    from torchdiffeq import odeint

    velocity = _velocity(model)
    end = min(model.scheduler.ode_end, 1.0)
    times = grid.clone()
    times[-1] = end
    times = times.to(device=x.device, dtype=x.dtype)
    # torchdiffeq's last step may overshoot the end and interpolate back: past `ode_end` the
    # velocity is held at its value there (beyond it a VP path's velocity diverges)
    field = (lambda t, y: velocity(y, t.clamp(max=end))) if end < 1.0 else (lambda t, y: velocity(y, t))
    path = odeint(field, x, times, method="dopri5", atol=atol, rtol=rtol)
    for i in range(1, len(path)):
        if callback and (end >= 1.0 or i < len(path) - 1):
            callback(i, path[i])
    return path[-1] if end >= 1.0 else _to_data(model, path[-1], end, callback, len(path) - 1)
