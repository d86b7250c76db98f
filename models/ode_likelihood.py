"""Exact log-likelihood through an ODE: the instantaneous change of variables.

A flow ``dx/dt = v(x, t)`` moves a density by d/dt log p_t(x_t) = -div v(x_t, t)
(Chen et al. 2018, "Neural Ordinary Differential Equations", Theorem 1, Eq. 4). In this
repo's time (t = 0 source, t = 1 data) a point x at the data end ``t_data`` is carried back
to the source end ``t_source``, accumulating

    a(t_source) = integral from t_data down to t_source of div v(x_t, t) dt
                = -(integral from t_source up to t_data of div v dt),

and then  log p_data(x) = log p_source(x_source) + a(t_source).  (Song et al. 2021,
"Score-Based Generative Modeling through SDEs", Sec. 4.3 and App. D.2, Eq. 39, write the
same thing with "+ integral of div" because their time runs from the data to the noise.)

The divergence is either exact (the trace of the Jacobian, one vector-Jacobian product per
dimension: for low dimensions) or Hutchinson's estimate E[eps^T J eps] with one Rademacher
probe eps per example, fixed for the whole trajectory (Grathwohl et al. 2019, "FFJORD",
Sec. 3.1, Eq. 7): one vector-Jacobian product per evaluation, an unbiased log-likelihood.

``ode_log_likelihood`` knows only a velocity function and a prior density, so it serves
continuous normalizing flows as well as diffusion models. The ``ode`` likelihood of the
registry applies it to a ``Denoiser`` on a Gaussian path (with uniform dequantization of
quantized data).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
from torch import Tensor

from models.likelihoods import dequantize, register_likelihood
from models.paths import time_batch
from models.solvers import FIXED_STEP_METHODS, solve_ode

DIVERGENCES = ("exact", "hutchinson")
METHODS = ("dopri5",) + FIXED_STEP_METHODS

#: The registered likelihood takes the exact trace up to this many dimensions (2-D toys cost
#: 2 vector-Jacobian products an evaluation), Hutchinson's estimate above (images).
EXACT_DIVERGENCE_MAX_DIMS = 16
#: dopri5 tolerances (atol = rtol) of the registered likelihood. Exact divergence: 1e-5, as
#: the probability-flow samplers. Hutchinson: 1e-4, measured on the 8x8 digits (test split, 500
#: images, 17 levels, the same u and probes at every tolerance) with the fm-digits UNet (CondOT,
#: 1000 training steps): 2.3537 / 2.3532 / 2.3533 bits/dim at 1e-3 / 1e-4 / 1e-5 (62 / 104 / ~270
#: NFE), against a standard error over images of 0.011: tightening from 1e-4 moves the mean by
#: 1e-4 bits/dim (1e-3 would already be within the error, but moves single images by 0.05).
EXACT_TOLERANCE = 1e-5
HUTCHINSON_TOLERANCE = 1e-4

VelocityFn = Callable[[Tensor, Tensor], Tensor]


class ODELikelihood(NamedTuple):
    log_prob: Tensor  # (B,) log density of each example at t_data
    nfe: int  # evaluations of the velocity function


def exact_trace_and_frobenius(velocity: Tensor, x: Tensor, *, create_graph: bool = False,
                              frobenius: bool = False) -> tuple[Tensor, Tensor | None]:
    """Trace of the Jacobian dv/dx of ``velocity`` (computed from ``x``) for each example, one
    backward pass per dimension (row i of the Jacobian is the gradient of v_i), and with
    ``frobenius`` its squared Frobenius norm ||dv/dx||_F^2 (the sum of the squared rows, free
    once the rows are there). ``create_graph``: keep the graph of the result, so that it can be
    differentiated again (training through the divergence, ``models.cnf``). Assumes examples do
    not interact (no batch statistics)."""
    flat = velocity.flatten(1)
    dims = flat.shape[1]
    trace = torch.zeros(len(x), dtype=velocity.dtype, device=velocity.device)
    norm = torch.zeros_like(trace) if frobenius else None
    for i in range(dims):
        (row,) = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=create_graph or i < dims - 1,
                                     create_graph=create_graph, allow_unused=True)
        if row is not None:
            row = row.flatten(1)
            trace = trace + row[:, i]
            if frobenius:
                norm = norm + row.pow(2).sum(1)
    return trace, norm


def _exact_divergence(velocity: Tensor, x: Tensor, create_graph: bool = False) -> Tensor:
    """Trace of the Jacobian of ``velocity`` (computed from ``x``) for each example, one
    backward pass per dimension. Assumes examples do not interact (no batch statistics)."""
    return exact_trace_and_frobenius(velocity, x, create_graph=create_graph)[0]


def probe_vjp(velocity: Tensor, x: Tensor, probe: Tensor, create_graph: bool = False) -> Tensor:
    """``probe^T dv/dx`` for each example (one backward pass), shaped like ``x``; zeros when
    ``velocity`` does not depend on ``x``. ``create_graph`` as in ``exact_trace_and_frobenius``."""
    (vjp,) = torch.autograd.grad(velocity, x, grad_outputs=probe, create_graph=create_graph,
                                 retain_graph=create_graph or None, allow_unused=True)
    return torch.zeros_like(x) if vjp is None else vjp


def _hutchinson_divergence(velocity: Tensor, x: Tensor, probe: Tensor, create_graph: bool = False) -> Tensor:
    """``probe^T J probe`` for each example: an unbiased estimate of the trace when the probe
    has zero mean and identity covariance."""
    return (probe_vjp(velocity, x, probe, create_graph) * probe).flatten(1).sum(1)


class _AugmentedField:
    """d/dt of the state ``[x_t flattened, accumulated divergence]`` (shape ``(B, D + 1)``):
    ``[v(x_t, t), div v(x_t, t)]``. Every call starts a fresh graph and returns detached
    values, so memory does not grow with the number of steps."""

    def __init__(self, velocity_fn: VelocityFn, shape: torch.Size, probe: Tensor | None):
        self.velocity_fn, self.shape, self.probe, self.calls = velocity_fn, shape, probe, 0

    def __call__(self, state: Tensor, t: float | Tensor) -> Tensor:
        self.calls += 1
        with torch.enable_grad():
            x = state[:, :-1].detach().reshape(self.shape).requires_grad_(True)
            velocity = self.velocity_fn(x, time_batch(t, x))
            if not velocity.requires_grad:  # a field that does not depend on x
                divergence = torch.zeros(len(x), dtype=state.dtype, device=state.device)
            elif self.probe is None:
                divergence = _exact_divergence(velocity, x)
            else:
                divergence = _hutchinson_divergence(velocity, x, self.probe)
        return torch.cat([velocity.detach().flatten(1), divergence.detach()[:, None]], 1).to(state.dtype)


def _state_norm(error: Tensor) -> Tensor:
    """dopri5's error norm: the larger of the RMS over the positions and over the accumulated
    divergences (torchdiffeq's norm of a tuple state), so that the log-density is held to the
    tolerance however many dimensions the positions have."""
    return torch.maximum(error[:, :-1].pow(2).mean().sqrt(), error[:, -1].pow(2).mean().sqrt())


def rademacher(shape: torch.Size, generator: torch.Generator | None, like: Tensor) -> Tensor:
    """Entries +1 / -1 with probability 1/2 each, drawn from ``generator``."""
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(dtype=like.dtype, device=like.device)


@torch.no_grad()
def ode_log_likelihood(
    velocity_fn: VelocityFn,
    x: Tensor,
    prior_log_prob: Callable[[Tensor], Tensor],
    *,
    t_data: float = 1.0,
    t_source: float = 0.0,
    divergence: str = "exact",
    method: str = "dopri5",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    jump_times: Sequence[float] = (),
) -> ODELikelihood:
    """log p(x) at time ``t_data`` of the flow ``dx/dt = velocity_fn(x, t_batch)`` whose
    density at ``t_source`` is ``prior_log_prob`` (one value per example, like the result).

    Integrates ``[x_t, a_t]`` with ``da/dt = div v`` from ``(x, 0)`` at ``t_data`` to
    ``t_source`` and returns ``prior_log_prob(x_source) + a(t_source)`` and the number of
    velocity evaluations. ``divergence``: ``exact`` (D backward passes an evaluation) or
    ``hutchinson`` (one Rademacher probe per example drawn from ``generator`` once, one
    backward pass an evaluation). ``method``: ``dopri5`` (torchdiffeq, ``atol`` / ``rtol``
    on the larger of the position and the log-density errors) or a fixed-step method of
    ``models.solvers`` (``steps``, default ``solvers.DEFAULT_STEPS``). ``jump_times`` (dopri5
    only): times where the velocity jumps, e.g. the steps of a DDPM schedule, whose log abar is
    piecewise linear; a step ends on each and the field is evaluated on the side being
    integrated (torchdiffeq's ``jump_t``), which dopri5's error estimate cannot see across a
    jump. At least 7 evaluations an interval: over 10 times closer per point, but costly.
    Runs under no_grad:
    an evaluation, not a training objective (no gradient flows to the velocity's weights).
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid choices: {DIVERGENCES}")
    if method not in METHODS:
        raise ValueError(f"unknown ODE method {method!r}; valid choices: {METHODS}")
    probe = rademacher(x.shape, generator, x) if divergence == "hutchinson" else None
    field = _AugmentedField(velocity_fn, x.shape, probe)
    start = torch.cat([x.flatten(1), torch.zeros(len(x), 1, dtype=x.dtype, device=x.device)], 1)
    if method == "dopri5":
        if steps is not None:
            raise ValueError("dopri5 chooses its own steps; set atol/rtol instead of steps")
        from torchdiffeq import odeint  # it imports SciPy (a second): only where dopri5 runs

        times = torch.tensor([t_data, t_source], dtype=torch.float64)
        # step_t: the last step ends on t_source instead of overshooting it and interpolating
        # back, so the velocity is never asked for outside [t_source, t_data]
        options = {"norm": _state_norm, "step_t": times[1:]}
        inside = [t for t in jump_times if min(t_source, t_data) < t < max(t_source, t_data)]
        if inside:
            options["jump_t"] = torch.tensor(inside, dtype=torch.float64)
        end = odeint(lambda t, state: field(state, t), start, times, method="dopri5", atol=atol, rtol=rtol,
                     options=options)[-1]
    elif jump_times:
        raise ValueError("jump_times are for dopri5; a fixed-step method steps over its own grid")
    else:
        end = solve_ode(field, start, method, steps=steps, t0=t_data, t1=t_source).x
    x_source = end[:, :-1].reshape(x.shape)
    return ODELikelihood(prior_log_prob(x_source) + end[:, -1], field.calls)


@register_likelihood("ode", {"velocity", "gaussian_source"})
@torch.no_grad()
def ode_nll(model, x: Tensor, generator: torch.Generator | None = None, levels: int | None = None) -> Tensor:
    """Negative log-likelihood in nats through the probability-flow ODE (dopri5), per example.

    Integrates the model's velocity from ``model.scheduler.ode_end`` to 0 onto its prior
    N(0, prior_std^2 I). On VP / DDPM paths the velocity is singular at t = 1, so ``ode_end``
    is a little before it and the density is that of the barely noised data there (Song et al.
    2021 evaluate at t = eps in their time for the same reason). Exact divergence up to
    ``EXACT_DIVERGENCE_MAX_DIMS`` dimensions, Hutchinson's estimate above. A DDPM schedule's
    velocity jumps at its T steps; they are not passed as ``jump_times`` (7 T evaluations):
    on 2-D Gaussians that leaves per-point errors up to 5e-3 nats at T = 1000 (3e-5 on average
    over points) and 8e-2 at T = 100 (5e-3 on average), below a test set's standard error.

    Quantized data (``levels`` evenly spaced values in [-1, 1], bins of width
    delta = 2 / (levels - 1)) are dequantized uniformly: x + u with u ~ U(-delta/2, delta/2)^D
    drawn from ``generator`` first (before any probe), and the value is
    -log p(x + u) - D log delta, an upper bound on -log P(bin of x) in expectation over u
    (Jensen), in the discrete-probability nats of ``ddpm_bound``.
    """
    dims = x[0].numel()
    x, log_volume = dequantize(x, levels, generator)
    exact = dims <= EXACT_DIVERGENCE_MAX_DIMS
    tolerance = EXACT_TOLERANCE if exact else HUTCHINSON_TOLERANCE
    log_px, _ = ode_log_likelihood(model.velocity, x, model.prior_log_prob, t_data=model.scheduler.ode_end,
                                   t_source=0.0, divergence="exact" if exact else "hutchinson",
                                   atol=tolerance, rtol=tolerance, generator=generator)
    return -log_px - log_volume
