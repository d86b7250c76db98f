"""The sampler registry: every sampler is a plain function over an explicit time grid.

A sampler has the shape of k-diffusion's samplers::

    fn(model, x, grid, generator, callback=None, **params) -> x

``model`` is a ``Denoiser`` (or anything providing what the sampler ``needs``), ``x`` the
draw at ``grid[0]``, ``grid`` a float64 tensor of times from the source end (t = 0) towards
the data end (t = 1), ``generator`` the ``torch.Generator`` of this shard: stochastic
samplers draw every noise from it, so a shard gives the same samples whichever worker runs it.
``callback(i, x)`` sees the state at ``grid[i]`` (trajectories). Adaptive solvers read
``grid`` as the times to report and choose their own steps.

``register_sampler`` declares, next to the function, what it needs from the model
(``velocity``, ``epsilon``, ``x1``, ``score``, ``gaussian_path`` (a Gaussian source),
...), its parameters with defaults and ranges, and how many network evaluations one grid
step costs. A sampling ``Setting`` names the method, its NFE and every parameter value, so
labels, file names and cache keys change whenever the output can.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product
from typing import Any, Callable

import torch
from torch import Tensor

SampleFn = Callable[..., Tensor]
SPACINGS = ("trailing", "leading", "quadratic")


@dataclass(frozen=True)
class Param:
    """One keyword parameter of a sampler: its default and what values are allowed."""

    default: Any
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    doc: str = ""
    integer: bool = False  # a count (corrector steps, window size): an int, not 2.5 or true

    def check(self, name: str, value: Any) -> Any:
        if self.choices is not None:
            if not any(value == c and type(value) is type(c) for c in self.choices):  # 1 is not True
                raise ValueError(f"{name}: got {value!r}; expected one of {', '.join(map(str, self.choices))}")
            return value
        kind = "an integer" if self.integer else "a number"
        if isinstance(value, bool) or not isinstance(value, int if self.integer else (int, float)):
            raise ValueError(f"{name}: got {value!r}; expected {kind}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise ValueError(f"{name}: got {value!r}; expected {kind} in [{self.low}, {self.high}]")
        return value if self.integer else float(value)


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: SampleFn
    needs: frozenset[str]
    params: dict[str, Param] = field(default_factory=dict)
    #: Network evaluations per grid step: a number, or a function of the setting's parameters
    #: (a predictor-corrector step costs 1 + corrector steps).
    evals_per_step: int | Callable[[dict[str, Any]], int] = 1
    adaptive: bool = False  # chooses its own steps; NFE is measured, not set
    stochastic: bool = False
    description: str = ""
    #: Steps along the flow's ODE over the grid, one state per grid time: the path energy of the
    #: visited states is the one of the learned flow (``path_energy``).
    ode_path: bool = False

    def evals(self, params: dict[str, Any]) -> int:
        """Network evaluations one grid step costs with these parameters (defaults filled in)."""
        if callable(self.evals_per_step):
            return self.evals_per_step({name: params.get(name, p.default) for name, p in self.params.items()})
        return self.evals_per_step


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(name: str, needs: set[str], params: dict[str, Param] | None = None, *,
                     evals_per_step: int | Callable[[dict[str, Any]], int] = 1, adaptive: bool = False,
                     stochastic: bool = False, ode_path: bool = False):
    """Decorator: add a sampler function to ``SAMPLERS`` under ``name``."""
    def add(fn: SampleFn) -> SampleFn:
        doc = (fn.__doc__ or "").strip().splitlines()
        SAMPLERS[name] = SamplerSpec(name, fn, frozenset(needs), dict(params or {}), evals_per_step,
                                     adaptive, stochastic, doc[0] if doc else "", ode_path)
        return fn
    return add


def get_sampler(name: str) -> SamplerSpec:
    import models.methods  # noqa: F401  (registers every method's samplers)

    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def _fmt(value: Any) -> str:
    """Short for people (0.001, 1e-05, 0), exact enough that two values never share a label."""
    if not isinstance(value, float):
        return str(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


@dataclass(frozen=True)
class Setting:
    """One point of a sampling grid: method, NFE (None when adaptive) and every parameter."""

    method: str
    nfe: int | None = None
    params: tuple[tuple[str, Any], ...] = ()
    untrained: bool = False  # the same network at initialization: the baseline

    @property
    def label(self) -> str:
        """``method,nfe=N,key=value,...`` (parameters sorted; ``,untrained`` for the baseline)."""
        parts = [self.method] + ([f"nfe={self.nfe}"] if self.nfe else [])
        parts += [f"{k}={_fmt(v)}" for k, v in self.params]
        return ",".join(parts + (["untrained"] if self.untrained else []))

    @property
    def file_stem(self) -> str:
        return self.label.replace(",", "_").replace("=", "-")

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def steps(self) -> int | None:
        return None if self.nfe is None else self.nfe // get_sampler(self.method).evals(self.kwargs)


def parse_label(label: str) -> tuple[str, dict[str, str]]:
    """``"ddim,nfe=50,eta=0"`` -> ``("ddim", {"nfe": "50", "eta": "0"})`` (``untrained`` -> "1")."""
    method, *rest = label.split(",")
    return method, {k: v for k, _, v in (p.partition("=") for p in rest) for v in [v or "1"]}


def settings_for(method: str, nfe: list[int] | None, params: dict[str, Any]) -> list[Setting]:
    """Every setting of one sampler entry: each NFE times each combination of list-valued
    parameters (so ``eta: [0, 0.5, 1]`` gives three), with defaults filled in. Raises
    ``ValueError`` naming the parameter when a value or an NFE does not fit the sampler."""
    spec = get_sampler(method)
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        valid = ", ".join(["nfe"] * (not spec.adaptive) + list(spec.params)) or "none"
        raise ValueError(f"{unknown[0]}: unknown key for sampler '{method}'; valid keys: {valid}")
    if spec.adaptive and nfe:
        raise ValueError(f"nfe: sampler '{method}' is adaptive and chooses its own steps; set its tolerances")
    if not spec.adaptive and not nfe:
        raise ValueError(f"nfe: sampler '{method}' needs a list of NFE, e.g. [1, 2, 4, 8]")
    choices = []
    for name, param in spec.params.items():
        values = params.get(name, param.default)
        values = values if isinstance(values, list) else [values]
        if not values:
            raise ValueError(f"{name}: empty list")
        choices.append([(name, param.check(name, v)) for v in values])
    settings = [Setting(method, n, tuple(combo)) for n in (nfe or [None]) for combo in product(*choices)]
    for s in settings:
        per_step = spec.evals(s.kwargs)
        if s.nfe and s.nfe % per_step:
            where = f" with {', '.join(f'{k}={_fmt(v)}' for k, v in s.params)}" if s.params else ""
            raise ValueError(f"nfe: sampler '{method}' uses {per_step} evaluations per step{where}; "
                             f"{s.nfe} is not a multiple of {per_step}")
    return settings


def time_grid(scheduler, steps: int, spacing: str = "trailing") -> Tensor:
    """``steps + 1`` times from the source end (t = 0) to the data (t = 1), float64.

    Continuous schedulers: uniform steps. A discrete DDPM schedule of T steps (diffusion step
    ``i`` at ``t = 1 - i / T``) picks ``steps`` of its training steps, then the data:
    ``trailing`` counts back from T evenly (T, T - T/S, ..., T/S); ``leading`` is the
    DDIM paper's ``range(0, T, T/S)`` (it starts at ``T - T/S + 1``, never at pure noise);
    ``quadratic`` is the DDIM paper's CIFAR-10 spacing, dense near the data (where it would
    repeat a step, the later ones move up so all S are distinct). Trailing is the
    default: with it a sampler starts from the prior it assumes at any S (Lin et al. 2024).
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    big_t = getattr(scheduler, "timesteps", None)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: got {spacing!r}; expected one of {', '.join(SPACINGS)}")
    if big_t is None:
        if spacing != "trailing":
            raise ValueError(f"spacing: '{spacing}' needs a discrete-time (DDPM) schedule; use 'trailing'")
        return torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if steps > big_t:
        raise ValueError(f"nfe: {steps} steps exceed the model's {big_t} training steps")
    if spacing == "trailing":
        index = torch.round(torch.linspace(big_t, 0, steps + 1, dtype=torch.float64)).long()
    else:
        if spacing == "leading":
            index = torch.arange(0, big_t, big_t // steps)[:steps] + 1
        else:
            index = (torch.linspace(0, (big_t * 0.8) ** 0.5, steps, dtype=torch.float64) ** 2).long() + 1
            for k in range(1, steps):  # dense near the data, steps repeat: move each up to stay distinct
                index[k] = max(index[k], index[k - 1] + 1)
        index = torch.cat([index.flip(0), torch.zeros(1, dtype=torch.long)])
    if len(set(index.tolist())) != len(index):
        raise ValueError(f"spacing: '{spacing}' repeats a step at S={steps} of T={big_t}; use 'trailing'")
    return 1 - index.double() / big_t


@dataclass
class SampleResult:
    x: Tensor
    nfe: int  # network evaluations per sample: rows the network saw / batch size
    trajectory: Tensor | None  # (points, B, ...) when asked for
    #: sequential network calls; equal to nfe except where one call evaluates several points of
    #: each sample (Picard windows, models.parallel)
    rounds: int
    #: per sample, the path energy of the states an ODE sampler visited (``path_energy``)
    energy: Tensor | None = None


class PathEnergy:
    """Per sample, ``sum_k |x_{k+1} - x_k|^2 / (t_{k+1} - t_k)`` over the states an ODE sampler
    visits at the grid times (fed one at a time, as a sampler's callback): the path energy
    ``PE = int_0^1 |v(x_t, t)|^2 dt`` of Tong et al. 2024 (Sec. 5.1) along the generated
    trajectory. For Euler steps it is exactly ``sum_k |v(x_k, t_k)|^2 dt_k``, the energy of the
    discretized flow; for other fixed-step methods, that of the polygon through their states (a
    lower bound of the integral along it). A straight path at constant speed scores
    ``|x_1 - x_0|^2``, the least any path between its ends can (Benamou-Brenier)."""

    def __init__(self, start: Tensor, times: list[float]):
        self.times, self.last = times, start
        self.total = torch.zeros(len(start), dtype=torch.float64)

    def __call__(self, i: int, x: Tensor) -> None:
        step = (x - self.last).double().flatten(1).pow(2).sum(1).cpu()
        self.total += step / (self.times[i] - self.times[i - 1])
        self.last = x


def sample_with(setting: Setting, model, x: Tensor, generator: torch.Generator | None = None,
                trajectory: bool = False, trajectory_points: int = 21) -> SampleResult:
    """Run one grid setting from the draw ``x``; counts the network's forward calls (``rounds``) and
    the rows they evaluate (``nfe`` = rows / batch size: a call on p points of each sample counts p).
    The networks are ``model.conditioners()`` where the model has it (a normalizing flow's
    coupling and autoregressive networks), else ``model.net``."""
    spec = get_sampler(setting.method)
    kwargs = setting.kwargs
    if spec.adaptive:
        grid = torch.linspace(0.0, 1.0, trajectory_points if trajectory else 2, dtype=torch.float64)
    else:
        grid = time_grid(model.scheduler, setting.steps, kwargs.get("spacing", "trailing"))
    calls, rows = [0], [0]

    def count(module, args) -> None:
        calls[0] += 1
        rows[0] += len(args[0]) if args else len(x)

    networks = model.conditioners() if hasattr(model, "conditioners") else [model.net]
    hooks = [net.register_forward_pre_hook(count) for net in networks]
    # the energy of an ODE sampler's states, where every step follows the velocity (a path that ends
    # with a jump to the predicted data does not)
    energy = PathEnergy(x, grid.tolist()) if spec.ode_path and model.scheduler.ode_end >= float(grid[-1]) else None
    path = [x] if trajectory else None

    def visit(i: int, y: Tensor) -> None:
        if path is not None:
            path.append(y)
        if energy is not None:
            energy(i, y)

    try:
        with torch.no_grad():
            out = spec.fn(model, x, grid, generator, callback=visit if trajectory or energy else None,
                          **{k: v for k, v in kwargs.items() if k != "spacing"})
    finally:
        for hook in hooks:
            hook.remove()
    return SampleResult(out, rows[0] // len(x), torch.stack(path) if trajectory else None, rounds=calls[0],
                        energy=energy.total if energy is not None else None)
