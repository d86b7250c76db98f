"""Continuous normalizing flows trained by maximum likelihood.

A CNF is a ``Denoiser`` whose network output is the velocity (parameterization
``velocity``, any network: an MLP for vectors, a UNet for images) of a flow ``dx/dt = v(x, t)``
that carries the source N(0, prior_std^2 I) at t = 0 to the data at t = 1. It is trained by
maximum likelihood through the ODE instead of by flow matching, and is then the same kind of
model as a flow-matching one: every ODE sampler (``models.solvers``) draws from it and the
registered ``ode`` likelihood (``models.ode_likelihood``, dopri5) evaluates it.

The log-density follows the instantaneous change of variables, d log p_t(x_t)/dt = -div v
(Chen et al. 2018, "Neural Ordinary Differential Equations", Theorem 1, Eq. 4). As in FFJORD
(Grathwohl et al. 2019, Sec. 3, Eq. 4) a data point is integrated, together with its
log-density change, from the data end t = 1 down to the source end t = 0:

    d/dt [x, a, K, J] = [v(x, t), div v(x, t), -||v(x, t)||^2, -||eps^T dv/dx||^2],

from ``[x, 0, 0, 0]`` at t = 1, so that at t = 0

    log p(x) = log N(x_0; 0, prior_std^2 I) + a(0),    a(0) = -int_0^1 div v dt,
    K(0) = int_0^1 ||v(x_t, t)||^2 dt,                 J(0) = int_0^1 ||eps^T dv/dx||^2 dt

(the lecture's simplified loss, Eq. 7 of the flow-models notes, is the first line up to
constants). The divergence is exact (one vector-Jacobian product per dimension) or Hutchinson's
estimate eps^T (dv/dx) eps with a Rademacher probe eps drawn once per example and fixed along
the trajectory (FFJORD, Sec. 3.1, Eq. 7): unbiased for the log-likelihood.

K and J are the two regularizers of RNODE (Finlay et al. 2020, "How to train your neural ODE:
the world of Jacobian and kinetic regularization"), integrated as extra state channels: the
kinetic energy of the flow, an optimal-transport cost that straightens the trajectories (OT-Flow,
Onken et al. 2021, and the lecture's R(theta) write it int 1/2 ||v||^2 dt: their weight is
``2 * kinetic`` here), and the squared Frobenius norm of the Jacobian, estimated with the same
probe as the trace, E ||eps^T dv/dx||^2 = ||dv/dx||_F^2. With the exact divergence the rows of
the Jacobian are computed anyway, so J is then the exact ||dv/dx||_F^2 (the same expectation,
without variance).

Training differentiates through the solver: a fixed-step method (``models.solvers``, rk4 by
default) with the divergence's graph kept (``create_graph``), i.e. discretize-then-optimize
backpropagation, not the adjoint. Memory grows with ``steps`` (every step's graph is kept),
which is fine for toys and small images. The time grid is that of the ``ode`` likelihood:
from ``model.scheduler.ode_end`` (1 on the cond_ot path, the natural scheduler for a CNF) to 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

import numpy as np
import torch
from torch import Tensor, nn

from models.likelihoods import bin_width, dequantize
from models.objectives import Objective, register_objective
from models.ode_likelihood import (
    EXACT_DIVERGENCE_MAX_DIMS, exact_trace_and_frobenius, probe_vjp, rademacher,
)
from models.paths import time_batch
from models.solvers import _STEPPERS, FIXED_STEP_METHODS, _integrate

DIVERGENCES = ("auto", "exact", "hutchinson")


@dataclass
class CNFTerms:
    """Per-example quantities of one differentiable solve, each of shape ``(B,)``, in nats."""

    nll: Tensor  # -log p(x) of the points as given (continuous density, no dequantization)
    kinetic: Tensor  # int_0^1 ||v(x_t, t)||^2 dt along the trajectory
    jacobian: Tensor  # int_0^1 ||eps^T dv/dx||^2 dt (exact ||dv/dx||_F^2 with the exact divergence)
    nfe: int  # velocity evaluations of the solve


class _TrainingField:
    """d/dt of the state ``[x flattened, a, K, J]`` (shape ``(B, D + 3)``), keeping the graph:
    ``[v, div v, -||v||^2, -||eps^T dv/dx||^2]`` (minus signs: integrated from t = 1 down to 0,
    so that K and J end as the integrals over [0, 1])."""

    def __init__(self, net: nn.Module, shape: torch.Size, probe: Tensor | None):
        self.net, self.shape, self.probe, self.calls = net, shape, probe, 0

    def __call__(self, state: Tensor, t: float) -> Tensor:
        self.calls += 1
        dims = state.shape[1] - 3
        x = state[:, :dims].reshape(self.shape)
        if not x.requires_grad:  # the first evaluation, on the data themselves
            x = x.detach().requires_grad_(True)
        velocity = self.net(x, time_batch(t, x))  # the raw output (the wrapper's, under DDP) is the velocity
        zeros = torch.zeros(len(x), dtype=state.dtype, device=state.device)
        if not velocity.requires_grad:  # a field that depends neither on x nor on weights
            divergence, frobenius = zeros, zeros
        elif self.probe is None:
            divergence, frobenius = exact_trace_and_frobenius(velocity, x, create_graph=True, frobenius=True)
        else:
            vjp = probe_vjp(velocity, x, self.probe, create_graph=True)
            divergence = (vjp * self.probe).flatten(1).sum(1)
            frobenius = vjp.flatten(1).pow(2).sum(1)
        # K and J cost no extra network evaluation (J reuses the divergence's products): always
        # integrated, for logging; they reach the gradient only with a nonzero weight
        flat = velocity.flatten(1).to(state.dtype)
        kinetic = flat.pow(2).sum(1)
        return torch.cat([flat, divergence[:, None], -kinetic[:, None], -frobenius[:, None]], 1).to(state.dtype)


def _nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: the weight must be a finite number >= 0, got {value!r}")
    return float(value)


@register_objective("cnf")
class ContinuousNormalizingFlow(Objective):
    """Maximum likelihood through the ODE (FFJORD's objective) with RNODE's regularizers.

    Per batch of data rows x (``batch.x1``; the source draws ``batch.x0`` are not used):

        loss = mean_x [ -log p(x~) - D log delta + kinetic * K(x~) + jacobian * J(x~) ] / D,

    D the dimensions of one example, x~ = x + u the dequantized point (with ``levels``; else
    x~ = x and the ``- D log delta`` term is absent), K and J as in the module docstring. The NLL
    is thus in nats per dimension (with ``levels`` a bound on the discrete NLL, in the same
    nats as the ``ode`` likelihood with ``levels``), and the regularizers are per dimension
    too, so that a weight means the same for 2-D toys and images.

    Options:

    - ``divergence``: ``exact`` (D vector-Jacobian products an evaluation), ``hutchinson``
      (one, with a Rademacher probe per example fixed along the trajectory) or ``auto``
      (default: exact up to ``EXACT_DIVERGENCE_MAX_DIMS`` dimensions, as the ``ode``
      likelihood, Hutchinson above).
    - ``method`` (default ``rk4``) and ``steps`` (default 8): the fixed-step solver of the
      training solve, differentiated through; ``last_nfe`` holds its velocity evaluations
      (steps x evaluations a step).
    - ``kinetic`` (lambda_K >= 0, default 0) and ``jacobian`` (lambda_J >= 0, default 0).
    - ``levels`` (default None: continuous data): data quantized to ``levels`` values evenly
      spaced in [-1, 1] are dequantized uniformly, x + U(-delta/2, delta/2)^D with
      delta = 2 / (levels - 1) (Theis et al. 2016; the ``ode`` likelihood's convention).

    Randomness (dequantization noise, then probes) comes from a generator seeded by the
    torch seed at construction (the training worker's ``cfg.seed``), the DDP rank and
    ``batch.step``: reproducible across resumes, different on every rank.

    Every velocity evaluation is ``net(x, t)``, the DDP wrapper's call. The divergences are
    out-of-place gradients with respect to the inputs (``autograd.grad`` with ``create_graph``),
    which do not touch DDP's hooks; the single ``backward`` of the loss reaches every weight once
    and is all-reduced there (the pattern PyTorch gives for gradient penalties under DDP,
    pytorch/pytorch#63812). A one-process gloo DDP gives the plain gradients (tests/test_cnf.py).
    """

    needs = frozenset({"data"})

    def __init__(self, model: nn.Module, inputs: dict[str, nn.Module] | None = None, *,
                 divergence: str = "auto", method: str = "rk4", steps: int = 8, kinetic: float = 0.0,
                 jacobian: float = 0.0, levels: int | None = None, **options) -> None:
        super().__init__(model, inputs, **options)
        if getattr(model, "parameterization", None) != "velocity":
            raise ValueError("parameterization: a CNF's network output must be its velocity (parameterization "
                             f"'velocity'), got {getattr(model, 'parameterization', None)!r}")
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence: unknown {divergence!r}; valid choices: {DIVERGENCES}")
        if method not in FIXED_STEP_METHODS:
            raise ValueError(f"method: {method!r} is not a fixed-step method (training differentiates through "
                             f"the solver's steps); valid choices: {FIXED_STEP_METHODS}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: must be a positive integer, got {steps!r}")
        if levels is not None:
            bin_width(levels)  # checks it
        self.divergence, self.method, self.steps, self.levels = divergence, method, steps, levels
        self.kinetic = _nonnegative("kinetic", kinetic)
        self.jacobian = _nonnegative("jacobian", jacobian)
        self.seed = torch.initial_seed()
        self.last_nfe = 0
        self.last_terms: dict[str, Tensor] = {}

    def divergence_for(self, dims: int) -> str:
        """The divergence used for examples of ``dims`` dimensions (``auto`` resolved)."""
        if self.divergence != "auto":
            return self.divergence
        return "exact" if dims <= EXACT_DIVERGENCE_MAX_DIMS else "hutchinson"

    def terms(self, net: nn.Module, x: Tensor, generator: torch.Generator | None = None,
              steps: int | None = None) -> CNFTerms:
        """One differentiable solve of ``x`` (as given: no dequantization) from the data end to
        t = 0 through ``net(x, t)`` (the raw output is the velocity); a Hutchinson probe is drawn
        from ``generator`` (the draw of ``ode_log_likelihood``, so the same generator state
        gives the same probe). ``steps`` overrides the objective's."""
        dims = x[0].numel()
        probe = rademacher(x.shape, generator, x) if self.divergence_for(dims) == "hutchinson" else None
        field = _TrainingField(net, x.shape, probe)
        start = torch.cat([x.detach().flatten(1), torch.zeros(len(x), 3, dtype=x.dtype, device=x.device)], 1)
        t_data = float(self.model.scheduler.ode_end)
        times = torch.linspace(t_data, 0.0, (steps or self.steps) + 1, dtype=torch.float64).tolist()
        with torch.enable_grad():  # the divergence needs autograd even when the caller does not
            end = _integrate(_STEPPERS[self.method][0], field, start, times)
        x_source = end[:, :dims].reshape(x.shape)
        log_prob = self.model.prior_log_prob(x_source) + end[:, dims]
        return CNFTerms(-log_prob, end[:, dims + 1], end[:, dims + 2], field.calls)

    def _generator(self, batch) -> torch.Generator:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if distributed else 0
        step = int(getattr(batch, "step", 0))
        seed = int(np.random.SeedSequence([self.seed, rank, step]).generate_state(1, np.uint64)[0]) >> 1
        return torch.Generator().manual_seed(seed)

    def loss(self, net: nn.Module, batch) -> Tensor:
        x = batch.x1
        dims = x[0].numel()
        generator = self._generator(batch)
        x, log_volume = dequantize(x, self.levels, generator)  # as the ode likelihood: before the probe
        offset = -log_volume
        terms = self.terms(net, x, generator)
        self.last_nfe = terms.nfe
        nll, kinetic, jacobian = (v.mean() / dims for v in (terms.nll, terms.kinetic, terms.jacobian))
        loss = nll + offset / dims
        if self.kinetic:
            loss = loss + self.kinetic * kinetic
        if self.jacobian:
            loss = loss + self.jacobian * jacobian
        # per dimension, detached (no device sync here): what a run may log beside the loss
        self.last_terms = {"nll": nll.detach() + offset / dims, "kinetic": kinetic.detach(),
                           "jacobian": jacobian.detach()}
        return loss
