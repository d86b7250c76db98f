"""Consistency models (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models"), with the
pseudo-Huber distance of Song & Dhariwal 2023 ("Improved Techniques for Training Consistency
Models", Sec. 3.3).

A consistency function maps every point of a probability-flow ODE trajectory to the trajectory's
end at the data: ``f(x_t, t) = x_{t_end}`` for all t, with the boundary condition
``f(x, t_end) = x``. One evaluation at the noise end is a sample; more evaluations, re-noising in
between, trade compute for quality.

Time runs as everywhere in ``models``: t = 0 is the noise, t = 1 the data, and the paper's
``t_{n+1}`` (noisier) is our ``t_n`` (closer to 0). On a Gaussian path
``x_t = alpha_t x1 + sigma_t eps`` the paper's VE state and noise level are

    y = x_t / alpha_t = x1 + s eps,   s(t) = sigma_t / alpha_t   (s decreases towards the data).

**Where the trajectory ends.** ``t_end`` is the scheduler's ``ode_end`` (where ODE solvers
stop), moved towards the noise if needed so that ``s(t_end) >= s_min`` (the paper's
epsilon = 0.002). The boundary must sit at a positive noise level s0: with s0 = 0 the
parameterization below is the denoiser itself (r = 1), which is the identity at the data end
for some parameterizations only. CondOT: t_end = 1 / 1.002; sub-VP: 0.990; on the VP, DDPM and
VE paths ``ode_end`` already has s >= 0.01. ``t_end`` is rounded down to a float32 number, so
times passed in float32 or float64 compare equal to it.

**Parameterization** (Sec. 3, Eq. 5 and Appendix C). The paper writes, on the VE path,
``F(y, s) = c_skip(s) y + c_out(s) G(y, s)`` with a raw network G and

    c_skip(s) = sd^2 / ((s - s0)^2 + sd^2),   c_out(s) = sd (s - s0) / sqrt(s^2 + sd^2)

(sd = sigma_data = 0.5, s0 = s(t_end)); its distillation students start from the EDM teacher's G,
whose denoiser is ``D = c^E_skip y + c^E_out G`` with ``c^E_skip = sd^2 / (s^2 + sd^2)``,
``c^E_out = s sd / sqrt(s^2 + sd^2)`` (Karras et al. 2022, Table 1). Our networks are not EDM's,
but every ``Denoiser`` predicts the data ``D(x_t, t) = E[x1 | x_t]``: writing the paper's F on the
G that D implies, ``G = (D - c^E_skip y) / c^E_out``, gives

    F = r D + (c_skip - r c^E_skip) y,   r = c_out / c^E_out = 1 - s0 / s,

so a student made from a teacher's weights *is* the paper's student of that teacher: it starts
as the teacher's denoiser up to O(s0 / s) (exactly where s >> s0) and blends into the identity
at s0. On our path the trajectory ends at ``x_{t_end} = alpha_end y_{t_end}``, so

    f(x_t, t) = alpha_end F(x_t / alpha_t, s(t)) = c_skip(t) x_t + c_out(t) D(x_t, t),
    c_out(t)  = alpha_end (sigma - s0 alpha) / sigma,
    c_skip(t) = alpha_end s0 sd^2 alpha^2 (3 sigma (sigma - s0 alpha) + (s0^2 + sd^2) alpha^2)
                / (sigma ((sigma - s0 alpha)^2 + sd^2 alpha^2) (sigma^2 + sd^2 alpha^2)),

(multiplying out the ``1 / alpha`` of y): c_skip(t_end) = 1, c_out(t_end) = 0, and towards the
noise c_skip -> 0, c_out -> alpha_end (1 on VE, 0.998 on CondOT). Every factor is finite where
sigma > 0, which holds on [0, t_end], including CondOT's alpha_0 = 0 (c_skip = 0,
c_out = alpha_end). Times at or past t_end return x itself.

**Training** (both objectives; the model is a ``ConsistencyModel``, ``net(x, t)`` is its f):
N times ``tau_0 = 0 < ... < tau_{N-1} = t_end`` (``spacing``: ``uniform`` in t, or ``karras``:
the paper's rho = 7 spacing of s between s(0) and s0), n uniform in {0..N-2} from the batch's
``t``, and the loss ``d(f_theta(x_{tau_n}, tau_n), f_target(x_hat, tau_{n+1}))`` with
``x_{tau_n} = alpha x1 + sigma x0`` and the target network an EMA of theta (Eq. 8), lambda = 1.

- ``consistency_distillation`` (Alg. 2, Eq. 7): x_hat is one step of the teacher's
  probability-flow ODE from tau_n to tau_{n+1} (``solver``: euler, midpoint, heun, rk4).
- ``consistency_training`` (Alg. 3, Eq. 10): x_hat = alpha_{n+1} x1 + sigma_{n+1} x0, the same
  noise; N(k) and mu(k) follow the paper's Appendix C schedules over K = ``total_steps``.

**Sampling** (Alg. 1, the ``consistency`` sampler): f at grid[0] (the prior draw), then at each
later grid time before the data end re-noise the estimate of x_{t_end} to that time (the
forward transition from t_end, ``y + sqrt(s^2 - s0^2) z``) and apply f again: 1 NFE a step.
"""

from __future__ import annotations

import abc
import copy
import math

import torch
from torch import Tensor, nn

from models.checkpoint import FAMILIES, Family, ModelSpec
from models.ddpm import scheduler_at
from models.ema import EMA
from models.objectives import Objective, register_objective
from models.parameterization import Denoiser
from models.paths import Scheduler, expand_like, time_batch
from models.samplers import register_sampler
from models.solvers import _STEPPERS, FIXED_STEP_METHODS

SIGMA_DATA = 0.5  # sd of the paper's Appendix C (and EDM's)
S_MIN = 0.002  # the paper's epsilon: the smallest noise level s, where f is the identity
RHO = 7.0  # Karras et al.'s spacing exponent, used by the paper
HUBER_C = 0.00054  # pseudo-Huber c = 0.00054 sqrt(d) (Song & Dhariwal 2023, Sec. 3.3)
SPACINGS = ("uniform", "karras")
DISTANCES = ("l2", "pseudo_huber")


def _choice(name: str, value, choices: tuple) -> str:
    if value not in choices:
        raise ValueError(f"{name}: got {value!r}; expected one of {', '.join(choices)}")
    return value


def noise_level(scheduler: Scheduler, t: float | Tensor) -> Tensor:
    """s(t) = sigma_t / alpha_t in float64 (infinite where alpha_t = 0)."""
    out = scheduler(torch.as_tensor(t, dtype=torch.float64))
    return out.sigma / out.alpha


def time_at_noise(scheduler: Scheduler, s: Tensor, t_max: float) -> Tensor:
    """The times in [0, t_max] where s(t) falls to each level ``s`` (bisection; s decreases in t):
    the last time still at or above the level, to float64 precision."""
    lo, hi = torch.zeros_like(s, dtype=torch.float64), torch.full_like(s, t_max, dtype=torch.float64)
    for _ in range(64):
        mid = (lo + hi) / 2
        above = noise_level(scheduler, mid) >= s
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return lo


def data_end(scheduler: Scheduler, s_min: float = S_MIN) -> float:
    """t_end: the scheduler's ``ode_end``, or the earlier time where s(t) = ``s_min`` if s falls
    below it before; rounded down to a float32 number."""
    end = scheduler.ode_end
    if not float(noise_level(scheduler, end)) >= s_min:
        end = float(time_at_noise(scheduler, torch.tensor([s_min], dtype=torch.float64), end)[0])
    t32 = torch.tensor(end, dtype=torch.float32)
    if float(t32) > end:
        t32 = torch.nextafter(t32, torch.tensor(-math.inf))
    return float(t32)


class ConsistencyModel(nn.Module):
    """A consistency function ``f(x, t) = c_skip(t) x + c_out(t) D(x, t)`` around a ``Denoiser``
    (see the module docstring for the scalings); ``forward`` is f, so a DDP wrapper's call is too.

    Its only submodule is the denoiser's network, as ``net``: the state dict has a Denoiser's keys
    (``net.*``), so ``student.load_state_dict(teacher.state_dict())`` starts a student from a
    teacher (and the weights of either load into the other), and ``model.net`` is what sampling
    hooks to count evaluations. ``denoiser`` is the wrapped Denoiser, sharing that network.
    """

    provides = frozenset({"consistency"})

    def __init__(self, denoiser: Denoiser, sigma_data: float = SIGMA_DATA, s_min: float = S_MIN):
        super().__init__()
        if not (sigma_data > 0 and s_min > 0):
            raise ValueError(f"sigma_data and s_min must be positive, got {sigma_data} and {s_min}")
        self.net = denoiser.net
        object.__setattr__(self, "denoiser", denoiser)  # not a submodule: one copy of the weights
        self.scheduler, self.parameterization = denoiser.scheduler, denoiser.parameterization
        self.sigma_data = sigma_data
        self.t_end = data_end(self.scheduler, s_min)
        alpha, sigma = scheduler_at(self.scheduler, self.t_end)
        self.alpha_end, self.s_end = alpha, sigma / alpha

    def scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_skip, c_out)`` at the times ``t`` (float64, shaped like ``t``); (1, 0) from t_end on."""
        out = self.scheduler(t.double())
        a, g = out.alpha, out.sigma
        s0, sd2, a_end = self.s_end, self.sigma_data**2, self.alpha_end
        gap = g - s0 * a  # alpha (s - s0) >= 0 up to t_end
        consistency = gap**2 + sd2 * a**2  # alpha^2 ((s - s0)^2 + sd^2)
        edm = g**2 + sd2 * a**2  # alpha^2 (s^2 + sd^2)
        c_skip = a_end * s0 * sd2 * a**2 * (3 * g * gap + (s0**2 + sd2) * a**2) / (g * consistency * edm)
        c_out = a_end * gap / g
        at_end = t >= self.t_end
        return torch.where(at_end, 1.0, c_skip), torch.where(at_end, 0.0, c_out)

    def consistency(self, x: Tensor, t: float | Tensor) -> Tensor:
        """f(x, t): the estimate of the trajectory's point at t_end (1 network evaluation)."""
        t = time_batch(t, x)
        c_skip, c_out = (expand_like(c, x).to(x.dtype) for c in self.scalings(t))
        f = c_skip * x + c_out * self.denoiser.x1(x, t)
        return torch.where(expand_like(t >= self.t_end, x), x, f)  # exact, whatever D is there

    def forward(self, x: Tensor, t: float | Tensor) -> Tensor:
        return self.consistency(x, t)

    def renoise(self, x_end: Tensor, t: float, z: Tensor) -> Tensor:
        """A draw at time ``t <= t_end`` given the point ``x_end`` at t_end, from the noise ``z``:
        ``alpha_t (y_end + sqrt(s_t^2 - s0^2) z)`` (Alg. 1's ``x + sqrt(tau^2 - eps^2) z``)."""
        alpha, sigma = scheduler_at(self.scheduler, t)
        return (alpha / self.alpha_end) * x_end + math.sqrt(max(sigma**2 - (alpha * self.s_end) ** 2, 0.0)) * z

    def prior(self, shape: tuple[int, ...], n: int, generator: torch.Generator | None = None) -> Tensor:
        """Where sampling starts (t = 0): the denoiser's prior draw."""
        return self.denoiser.prior(shape, n, generator)


def student_from(teacher: Denoiser, **kwargs) -> ConsistencyModel:
    """A distillation student: a copy of the teacher's network, as a consistency model
    (``kwargs``: ``sigma_data``, ``s_min``)."""
    return ConsistencyModel(copy.deepcopy(teacher), **kwargs)


def _build(spec: ModelSpec) -> ConsistencyModel:
    return ConsistencyModel(FAMILIES["denoiser"].build(spec))


FAMILIES["consistency"] = Family(_build, lambda spec: ConsistencyModel.provides)


# --------------------------------------------------------------------------- sampling


@register_sampler("consistency", {"consistency", "gaussian_source"}, stochastic=True)
def consistency(model: ConsistencyModel, x: Tensor, grid: Tensor, generator: torch.Generator | None = None,
                callback=None) -> Tensor:
    """Consistency models' multistep sampling (Song et al. 2023, Alg. 1); one step is one f."""
    times = grid.tolist()[:-1]  # the last grid time is the data end, which f already reaches
    x = model.consistency(x, times[0])
    for i, t in enumerate(times[1:], start=1):
        x = model.renoise(x, t, torch.randn(x.shape, generator=generator).to(x))
        if callback:
            callback(i, x)
        x = model.consistency(x, t)
    if callback:
        callback(len(times), x)
    return x


# --------------------------------------------------------------------------- training


def example_distance(name: str, a: Tensor, b: Tensor) -> Tensor:
    """Per-example distance: ``l2`` is the mean squared difference (the paper's squared l2 over
    the d dimensions, divided by d), ``pseudo_huber`` is ``sqrt(|a - b|^2 + c^2) - c`` with
    ``c = 0.00054 sqrt(d)`` (Song & Dhariwal 2023, Sec. 3.3)."""
    sq = (a - b).pow(2).flatten(1)
    if name == "l2":
        return sq.mean(1)
    c = HUBER_C * math.sqrt(sq.shape[1])
    return torch.sqrt(sq.sum(1) + c * c) - c


def discretization(model: ConsistencyModel, steps: int, spacing: str = "uniform") -> Tensor:
    """The N = ``steps`` training times from 0 to t_end (float64): ``uniform`` in t, or
    ``karras`` (the paper's Sec. 5: rho = 7 spacing of s from s(0) down to s(t_end))."""
    if spacing == "uniform":
        return torch.linspace(0.0, model.t_end, steps, dtype=torch.float64)
    s_max = float(noise_level(model.scheduler, 0.0))
    if not math.isfinite(s_max):
        raise ValueError("spacing: 'karras' needs a finite noise level sigma / alpha at t = 0; "
                         "this path has alpha_0 = 0 (use 'uniform')")
    ramp = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    lo, hi = s_max ** (1 / RHO), model.s_end ** (1 / RHO)
    times = time_at_noise(model.scheduler, (lo + ramp * (hi - lo)) ** RHO, model.t_end)
    times[0], times[-1] = 0.0, model.t_end
    return times


class ConsistencyObjective(Objective):
    """What CD and CT share: the pairs of neighbouring times, the target network and the loss.

    ``modules()`` is ``{"target": theta^-}``, the EMA copy of the model (Eq. 8), moved by
    ``after_step`` with the decay of the step the last loss was computed at; nothing else is kept
    between steps (N and mu are functions of ``batch.step``).
    """

    def __init__(self, model: nn.Module, inputs: dict[str, nn.Module] | None = None, *,
                 distance: str = "l2", spacing: str = "uniform", **options) -> None:
        super().__init__(model, inputs, **options)
        if not isinstance(model, ConsistencyModel):
            raise ValueError(f"model: objective {self.name!r} trains a 'consistency' family model, "
                             f"got {type(model).__name__}")
        self.distance = _choice("distance", distance, DISTANCES)
        self.spacing = _choice("spacing", spacing, SPACINGS)
        discretization(model, 2, spacing)  # a spacing the path cannot have fails now, not at step 0
        self._target = EMA(model, decay=0.0, warmup=False)
        self._grids: dict[int, Tensor] = {}
        self._step = 0

    @property
    def target(self) -> ConsistencyModel:
        return self._target.shadow

    @abc.abstractmethod
    def steps_at(self, step: int) -> int:
        """N at training step ``step``."""

    @abc.abstractmethod
    def decay_at(self, step: int) -> float:
        """mu at training step ``step``."""

    @abc.abstractmethod
    def next_point(self, x: Tensor, t: Tensor, t_next: Tensor, batch) -> Tensor:
        """x_hat at ``t_next`` (closer to the data) from ``x`` at ``t`` (times shaped to broadcast)."""

    def grid(self, steps: int) -> Tensor:
        if steps not in self._grids:
            self._grids[steps] = discretization(self.model, steps, self.spacing)
        return self._grids[steps]

    def loss(self, net: nn.Module, batch) -> Tensor:
        self._step = batch.step
        steps = self.steps_at(batch.step)
        x1, x0 = batch.x1, batch.x0
        grid = self.grid(steps).to(x1.device)
        n = (batch.t.double() * (steps - 1)).floor().long().clamp(0, steps - 2)
        t, t_next = (expand_like(grid[i].to(x1.dtype), x1) for i in (n, n + 1))
        s = self.model.scheduler(t)
        x_t = s.alpha * x1 + s.sigma * x0
        with torch.no_grad():
            target = self.target(self.next_point(x_t, t, t_next, batch), t_next.reshape(-1))
        return example_distance(self.distance, net(x_t, t.reshape(-1)), target).mean()

    def modules(self) -> dict[str, nn.Module]:
        return {"target": self.target}

    def after_step(self) -> None:
        self._target.decay = self.decay_at(self._step)
        self._target.update(self.model)


@register_objective("consistency_distillation")
class ConsistencyDistillation(ConsistencyObjective):
    """Consistency distillation (Song et al. 2023, Alg. 2 and Eq. 7) from the input ``teacher``.

    Options: ``steps`` N >= 2 (training times), ``solver`` (one teacher probability-flow ODE step
    along its ``velocity``: euler, midpoint, heun, rk4; the paper uses Heun), ``target_decay`` mu
    in [0, 1] (the paper's ImageNet 64 / LSUN value 0.95 by default), ``distance``, ``spacing``.
    The teacher must be on the student's path.
    """

    inputs = ("teacher",)

    def __init__(self, model: nn.Module, inputs: dict[str, nn.Module] | None = None, *, steps: int = 18,
                 solver: str = "heun", target_decay: float = 0.95, **options) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"steps: got {steps!r}; expected an integer >= 2")
        self.solver = _choice("solver", solver, FIXED_STEP_METHODS)
        if not 0.0 <= target_decay <= 1.0:
            raise ValueError(f"target_decay: got {target_decay!r}; expected a number in [0, 1]")
        super().__init__(model, inputs, **options)
        self.steps, self.mu = steps, float(target_decay)
        self.teacher = (inputs or {}).get("teacher")
        if self.teacher is None or not hasattr(self.teacher, "velocity"):
            raise ValueError("teacher: consistency distillation needs a teacher model with a velocity (a denoiser)")
        times = torch.linspace(0.0, model.t_end, 17, dtype=torch.float64)
        mine, theirs = model.scheduler(times), self.teacher.scheduler(times)
        if not (torch.allclose(mine.alpha, theirs.alpha) and torch.allclose(mine.sigma, theirs.sigma)):
            raise ValueError("teacher: its path (scheduler) differs from the student's")

    def steps_at(self, step: int) -> int:
        return self.steps

    def decay_at(self, step: int) -> float:
        return self.mu

    def next_point(self, x: Tensor, t: Tensor, t_next: Tensor, batch) -> Tensor:
        return _STEPPERS[self.solver][0](self.teacher.velocity, x, t, t_next - t)


def ct_steps(step: int, total_steps: int, s0: int, s1: int) -> int:
    """N(k) = ceil(sqrt(k / K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1 (Song et al. 2023, App. C):
    s0 at k = 0, s1 + 1 at k = K (and after)."""
    frac = min(step, total_steps) / total_steps
    return math.ceil(math.sqrt(frac * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def ct_decay(step: int, total_steps: int, s0: int, s1: int, mu0: float) -> float:
    """mu(k) = exp(s0 log mu0 / N(k)) (Song et al. 2023, App. C): mu0 at k = 0, rising with N."""
    return 0.0 if mu0 == 0 else math.exp(s0 * math.log(mu0) / ct_steps(step, total_steps, s0, s1))


@register_objective("consistency_training")
class ConsistencyTraining(ConsistencyObjective):
    """Consistency training (Song et al. 2023, Alg. 3 and Eq. 10): no teacher; the point closer to
    the data is the same noise at the later time.

    Options: ``total_steps`` K (the run's length, required), ``s0`` / ``s1`` (N grows from s0 to
    s1 + 1), ``mu0`` (the target decay at step 0, in [0, 1)); the paper's CIFAR-10 values 2, 150,
    0.9 by default; ``distance``, ``spacing``.
    """

    def __init__(self, model: nn.Module, inputs: dict[str, nn.Module] | None = None, *,
                 total_steps: int | None = None, s0: int = 2, s1: int = 150, mu0: float = 0.9, **options) -> None:
        for name, value, low in (("total_steps", total_steps, 1), ("s0", s0, 2), ("s1", s1, s0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: got {value!r}; expected an integer >= {low}"
                                 + (" (the training length K)" if name == "total_steps" else ""))
        if not 0.0 <= mu0 < 1.0:
            raise ValueError(f"mu0: got {mu0!r}; expected a number in [0, 1)")
        super().__init__(model, inputs, **options)
        self.total_steps, self.s0, self.s1, self.mu0 = total_steps, s0, s1, float(mu0)

    def steps_at(self, step: int) -> int:
        return ct_steps(step, self.total_steps, self.s0, self.s1)

    def decay_at(self, step: int) -> float:
        return ct_decay(step, self.total_steps, self.s0, self.s1, self.mu0)

    def next_point(self, x: Tensor, t: Tensor, t_next: Tensor, batch) -> Tensor:
        s = self.model.scheduler(t_next)
        return s.alpha * batch.x1 + s.sigma * batch.x0
