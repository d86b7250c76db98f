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
time ``s = 1 - t`` and converts, and the discrete DDPM schedule puts its step
``i`` (0 = data, T = noise) at ``t = 1 - i / T``.
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

    #: Discrete schedules (DDPM's steps, NCSN's noise levels) train on ``timesteps`` steps, step
    #: ``i`` at ``t = 1 - i / timesteps``; continuous ones have None.
    timesteps: int | None = None
    #: What a model on this path offers samplers and likelihoods beyond a network's outputs
    #: (``discrete_time``: DDPM's Markov chain, which the variational bound is written for;
    #: ``sde``: a forward SDE whose drift is finite where sampling starts, alpha_0 > 0, which
    #: the reverse-SDE samplers integrate; CondOT's alpha_0 = 0 makes its drift infinite there;
    #: ``noise_levels``: sigma > 0 down to the data end, as annealed Langevin's step rule divides
    #: by the smallest level).
    provides: frozenset[str] = frozenset()
    #: The last time an ODE solver may reach. Variance-preserving paths end with sigma ~ sqrt(1 - t)
    #: at the data, where the velocity diverges: solvers stop at ``ode_end`` and jump to the
    #: predicted data (see ``models.solvers``), as score SDEs stop at t = 1 - eps.
    ode_end: float = 1.0

    @abc.abstractmethod
    def __call__(self, t: Tensor) -> SchedulerOutput: ...

    def log_snr(self, t: Tensor) -> Tensor:
        """``lambda_t = log(alpha_t^2 / sigma_t^2)``: increases from the source to the data end."""
        s = self(t)
        return 2.0 * (torch.log(s.alpha) - torch.log(s.sigma))

    #: A path with noise around its mean (``noise``): x_t = alpha_t x1 + sigma_t x0 + s_t eps.
    noisy: bool = False

    def noise(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(s_t, ds_t/dt)``: the std of the noise ``eps ~ N(0, I)``, drawn apart from the source,
        that a ``noisy`` path adds to ``alpha_t x1 + sigma_t x0`` (none by default)."""
        raise NotImplementedError(f"{type(self).__name__} adds no noise to its path")

    @property
    def prior_std(self) -> float:
        """Scale of the Gaussian a sampler starts from at ``t = 0``: ``sigma_0`` (``sigma_max`` on
        a VE path); variance-preserving schedules override it with exactly 1."""
        return float(self(torch.zeros((), dtype=torch.float64)).sigma)


SIGMA_SCHEDULES = ("constant", "brownian_bridge")


class CondOTScheduler(Scheduler):
    """Straight line between source and data (rectified flow / conditional OT), with the
    conditional paths of Lipman et al. 2023 and Tong et al. 2024 as options:

    * ``sigma_min`` (Lipman et al. 2023, Eq. 20, "FM"): ``alpha_t = t``,
      ``sigma_t = 1 - (1 - sigma_min) t``, so ``x_t = t x1 + (1 - (1 - sigma_min) t) x0`` and
      the target ``u_t = x1 - (1 - sigma_min) x0``; 0 is the plain line;
    * ``sigma`` (Tong et al. 2024, Eqs. 14-15, I-CFM / OT-CFM): Gaussian noise of std ``s_t``
      around the line, ``x_t = t x1 + (1 - t) x0 + s_t eps``, ``eps ~ N(0, I)`` drawn apart from
      ``x0``; ``sigma_schedule: constant`` is ``s_t = sigma`` (target ``x1 - x0``),
      ``brownian_bridge`` is ``s_t = sigma sqrt(t (1 - t))`` (SB-CFM, Tong et al. 2024 Eq. 20
      and Prop. 3.4: target ``(1 - 2t) / (2 t (1 - t)) (x_t - mu_t) + x1 - x0``, i.e.
      ``ds_t/dt eps`` added to ``x1 - x0``).
    """

    def __init__(self, sigma_min: float = 0.0, sigma: float = 0.0, sigma_schedule: str = "constant"):
        if not 0.0 <= sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
        if sigma < 0.0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if sigma_schedule not in SIGMA_SCHEDULES:
            raise ValueError(f"sigma_schedule: unknown {sigma_schedule!r}; valid choices: {SIGMA_SCHEDULES}")
        self.sigma_min, self.sigma, self.sigma_schedule = sigma_min, sigma, sigma_schedule

    def __call__(self, t: Tensor) -> SchedulerOutput:
        if not self.sigma_min:
            return SchedulerOutput(
                alpha=t, sigma=1 - t, d_alpha=torch.ones_like(t), d_sigma=-torch.ones_like(t)
            )
        slope = 1.0 - self.sigma_min
        return SchedulerOutput(alpha=t, sigma=1 - slope * t, d_alpha=torch.ones_like(t),
                               d_sigma=torch.full_like(t, -slope))

    @property
    def noisy(self) -> bool:
        return self.sigma > 0

    def noise(self, t: Tensor) -> tuple[Tensor, Tensor]:
        if self.sigma_schedule == "constant":
            return torch.full_like(t, self.sigma), torch.zeros_like(t)
        root = torch.sqrt(t * (1 - t))
        # d/dt sigma sqrt(t (1 - t)) = sigma (1 - 2t) / (2 sqrt(t (1 - t))): infinite at the ends,
        # where t ~ U[0, 1) lands with probability 0; clamped so t = 0 stays finite
        return self.sigma * root, self.sigma * (1 - 2 * t) / (2 * root.clamp(min=1e-6))


class VPScheduler(Scheduler):
    """Variance preserving (DDPM / VP-SDE) path with a linear beta schedule.

    In diffusion time ``s = 1 - t``: ``alpha = exp(-B(s) / 2)``, ``sigma = sqrt(1 - alpha^2)``
    with ``B(s) = beta_min * s + (beta_max - beta_min) * s^2 / 2``.  ``d_sigma`` diverges
    at ``t = 1`` (``sigma -> 0`` like a square root), so ``sigma`` is clamped in that division.
    """

    prior_std = 1.0
    provides = frozenset({"sde"})
    ode_end = 1.0 - 1e-3  # Song et al. 2021's epsilon for the VP SDE

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


class SubVPScheduler(VPScheduler):
    """Sub-VP path (Song et al. 2021, Eq. 29): VP's ``alpha``, ``sigma = 1 - alpha^2``.

    Its variance is below VP's at every time, and ``sigma`` vanishes linearly (not like a square
    root) at the data end; its SDE's diffusion is ``beta (1 - exp(-2 B(s)))``.
    """

    prior_std = Scheduler.prior_std  # sigma_0 = 1 - exp(-B(1)), just below VP's exact 1

    def __call__(self, t: Tensor) -> SchedulerOutput:
        vp = super().__call__(t)
        return SchedulerOutput(alpha=vp.alpha, sigma=1 - vp.alpha**2, d_alpha=vp.d_alpha,
                               d_sigma=-2 * vp.alpha * vp.d_alpha)


class VEScheduler(Scheduler):
    """Variance exploding (NCSN / VE-SDE) path: data kept, noise shrinks geometrically."""

    provides = frozenset({"sde", "noise_levels"})

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


class NCSNScheduler(VEScheduler):
    """NCSN's noise levels (Song & Ermon 2019, Sec. 4.2): the VE path at L geometric sigmas.

    As every discrete schedule, step ``i`` sits at ``t = 1 - i / L``: the L trained levels are the
    steps ``i = L - 1, ..., 0``, ``sigma_i = sigma_min (sigma_max / sigma_min)^(i / L)``, from the
    largest down to ``sigma_min`` (step 0, ``t = 1``); step ``L`` (``t = 0``) is ``sigma_max``,
    the scale of the prior draw sampling starts from. A grid of S steps (``time_grid``) then
    visits S of the levels after the prior, all L when S = L.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, levels: int = 10):
        super().__init__(sigma_min, sigma_max)
        if levels < 1:
            raise ValueError(f"levels must be >= 1, got {levels}")
        self.timesteps = levels

    def level_times(self) -> Tensor:
        """Times of the L trained levels, from the largest sigma to ``sigma_min`` (float64)."""
        return torch.arange(1, self.timesteps + 1, dtype=torch.float64) / self.timesteps

    def time_of(self, step: Tensor) -> Tensor:
        """Time ``t = 1 - i / L`` of integer steps ``i`` (float64)."""
        return 1 - step.double() / self.timesteps


BETA_SCHEDULES = ("linear", "cosine")


def ddpm_betas(schedule: str, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """The T betas of a DDPM noise schedule, in float64.

    ``linear``: Ho et al. 2020 (Sec. 4), ``beta_start`` to ``beta_end`` for T = 1000, both scaled
    by 1000 / T for other T (Nichol & Dhariwal 2021, Sec. 3.2, so the schedule keeps its shape).
    ``cosine``: Nichol & Dhariwal 2021, Eq. 17: ``alpha_bar(i) = f(i) / f(0)`` with
    ``f(i) = cos^2((i / T + s) / (1 + s) * pi / 2)``, ``s = 0.008``, betas clipped at 0.999.
    """
    if schedule == "linear":
        scale = 1000.0 / timesteps
        return torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta_schedule {schedule!r}; valid choices: {BETA_SCHEDULES}")


class DDPMScheduler(Scheduler):
    """The discrete-time DDPM forward process, q(x_i | x_data) = N(sqrt(abar_i) x, (1 - abar_i) I).

    Diffusion step ``i`` in 0..T (0 is the data) sits at time ``t = 1 - i / T``; training uses
    the steps 1..T only. Between steps, ``log abar`` is interpolated linearly, so the schedule
    is a continuous (piecewise smooth) Gaussian path too and every sampler of ``models`` applies:
    ancestral and DDIM steps on the training steps, ODE solvers anywhere.
    """

    prior_std = 1.0
    provides = frozenset({"discrete_time", "sde"})

    def __init__(self, beta_schedule: str = "linear", timesteps: int = 1000,
                 beta_start: float = 1e-4, beta_end: float = 0.02):
        if timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        self.beta_schedule, self.timesteps = beta_schedule, timesteps
        self.betas = ddpm_betas(beta_schedule, timesteps, beta_start, beta_end)
        if not bool(((self.betas > 0) & (self.betas < 1)).all()):
            raise ValueError(f"timesteps: linear betas {beta_start}..{beta_end}, scaled by 1000/T, reach "
                             f"{float(self.betas.max()):.3g} at T={timesteps}; need betas below 1 (more timesteps, "
                             "a smaller beta_end, or beta_schedule: cosine)")
        # log abar_i for i = 0..T (abar_0 = 1: the data)
        self.log_alpha_bar = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-self.betas), 0)])
        self.ode_end = 1.0 - 1.0 / timesteps  # step 1: the last noise level the model was trained on

    def time_of(self, step: Tensor) -> Tensor:
        """Time ``t = 1 - i / T`` of integer diffusion steps ``i`` (float64)."""
        return 1 - step.double() / self.timesteps

    def alpha_bar(self, i: Tensor) -> Tensor:
        """``abar_i`` at integer steps ``i`` (float64)."""
        return self.log_alpha_bar[i.long()].exp()

    def __call__(self, t: Tensor) -> SchedulerOutput:
        big_t = self.timesteps
        table = self.log_alpha_bar.to(device=t.device)
        pos = ((1 - t.double()) * big_t).clamp(0, big_t)
        lo = pos.floor().clamp(max=big_t - 1).long()
        slope = table[lo + 1] - table[lo]  # d log abar / d i on this interval
        log_ab = (table[lo] + (pos - lo) * slope).to(t.dtype)
        slope = slope.to(t.dtype)
        alpha = torch.exp(0.5 * log_ab)
        sigma = torch.sqrt(-torch.expm1(log_ab))
        d_log_ab = -big_t * slope  # di/dt = -T
        d_alpha = 0.5 * alpha * d_log_ab
        d_sigma = -torch.exp(log_ab) * d_log_ab / (2 * sigma.clamp(min=1e-12))
        return SchedulerOutput(alpha=alpha, sigma=sigma, d_alpha=d_alpha, d_sigma=d_sigma)


SCHEDULERS: dict[str, type[Scheduler]] = {
    "cond_ot": CondOTScheduler,
    "vp": VPScheduler,
    "subvp": SubVPScheduler,
    "ve": VEScheduler,
    "ncsn": NCSNScheduler,
    "ddpm": DDPMScheduler,
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

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor, noise: Tensor | None = None) -> PathSample:
        """Place each pair ``(x0[i], x1[i])`` at its time ``t[i]`` (``t`` of shape ``(B,)``); a
        ``noisy`` scheduler's path adds ``s_t * noise`` (``noise``: N(0, I) draws shaped like
        ``x1``) to ``x_t`` and ``ds_t/dt * noise`` to its velocity."""
        t_x = expand_like(t, x1)
        s = self.scheduler(t_x)
        x_t = s.alpha * x1 + s.sigma * x0
        dx_t = s.d_alpha * x1 + s.d_sigma * x0
        if self.scheduler.noisy:
            if noise is None:
                raise ValueError("this path adds noise around its mean: pass `noise` (N(0, I) draws like x1)")
            std, d_std = self.scheduler.noise(t_x)
            x_t, dx_t = x_t + std * noise, dx_t + d_std * noise
        return PathSample(x_t=x_t, t=t, x0=x0, x1=x1, dx_t=dx_t)
