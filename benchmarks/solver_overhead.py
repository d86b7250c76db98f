"""(c) Sampler cost per NFE vs one bare network forward, for every registered sampler.

ratio(setting) = wall time of models.samplers.sample_with(setting, model, x0, generator) / time
                 spent in the network's forward calls during that same call

i.e. cost per NFE / cost of one bare net(x, t) forward, measured inside one call: the network is
wrapped in a timer, so both sides see the same inputs at the same moment, and drift in the
machine's speed (it moves by 10-20% within minutes on this shared machine) cancels. Everything
outside the forward counts as sampler cost: the time grid, `Denoiser.velocity` / `pivot`
(parameterization conversion), the sampler's own arithmetic and noise draws, the NFE-counting
hook and, for dopri5, torchdiffeq's step control.

Measured on the network of every shipped config of the flow-matching, ddpm, score-sde (VP; VE
and sub-VP train the same networks) and ncsn (digits) graphs (the ddim graph trains the ddpm
models), at its shard size, for every registered sampler the model can feed (its `needs` met by
the config): fixed-step samplers at N = 100 (at most one step a level on NCSN's 50 levels;
ancestral small and large variance, DDIM at eta 0 and 1, the ODE solvers, Euler-Maruyama,
reverse diffusion, PC with one corrector step, annealed Langevin at 5 steps a level, the Picard
samplers with their default window), dopri5 per *reported* NFE at the config's tolerance (1e-3
where the config has none).

The headline is the median over rounds; a plain loop of N bare forwards is timed in each round
for reference. torch uses 1 thread, as the sampling actors do (models.sampling.Sampler).

    .venv/bin/python benchmarks/solver_overhead.py [--quick] [--rounds 7]
"""

from __future__ import annotations

import time

import _common as C  # noqa: I001  (puts the repo on sys.path)
import torch
from torch import nn

from models.checkpoint import ModelSpec
from models.samplers import SAMPLERS, Setting, get_sampler, sample_with, settings_for
from tasks.config import RunConfig
from tasks.config_loading import load_config

TARGET = "sampler time <= 1.1 x (NFE x one net(x, t) forward)"
CONFIGS = {"flow-matching/digits": (1, 8, 8), "flow-matching/gaussians-to-moons": (2,),
           "ddpm/digits": (1, 8, 8), "ddpm/moons": (2,), "score-sde/vp-digits": (1, 8, 8), "score-sde/vp": (2,),
           "ncsn/digits": (1, 8, 8)}
VARIANTS = {"ancestral": {"variance": ["small", "large"]}, "ddim": {"eta": [0.0, 1.0]}}


def settings(cfg: RunConfig, nfe: int, timesteps: int | None) -> list[Setting]:
    """Every registered sampler this config's model can feed, at `nfe` (or its dopri5 tolerance);
    on a discrete schedule of `timesteps` steps (NCSN's levels), at most one step per level."""
    get_sampler("euler")  # registers every method
    adaptive = [e.params for e in cfg.sample.samplers if get_sampler(e.method).adaptive]
    tol = adaptive[0] if adaptive else {"atol": 1e-3, "rtol": 1e-3}
    out = []
    for name, spec in SAMPLERS.items():
        if spec.needs <= cfg.provides():
            per_step = spec.evals({})
            n = min(nfe, timesteps * per_step) if timesteps else nfe
            out += settings_for(name, [] if spec.adaptive else [n], tol if spec.adaptive else VARIANTS.get(name, {}))
    return out


def shipped_models() -> dict[str, tuple[ModelSpec, int, list]]:
    """config -> (model spec, shard size, configs' settings) of the shipped configs."""
    out = {}
    for config, shape in CONFIGS.items():
        cfg = load_config(C.ROOT / "configs" / f"{config}.yaml")
        out[config] = (cfg.model_spec(shape), cfg.sample.shard_size, cfg)
    return out


def build(spec: ModelSpec):
    torch.manual_seed(0)
    model = spec.build().eval()
    with torch.no_grad():  # the UNet's output conv starts at zero: give it a non-trivial field
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    return model


class TimedNet(nn.Module):
    """The network, with the time spent in its forward calls added up."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net, self.seconds, self.calls = net, 0.0, 0

    def forward(self, x, t):
        start = time.perf_counter()
        out = self.net(x, t)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


def measure(name: str, spec: ModelSpec, batch: int, cfg: RunConfig, nfe: int, rounds: int) -> list[dict]:
    model = build(spec)
    bare, model.net = model.net, TimedNet(model.net)
    x0 = torch.randn(batch, *spec.data_shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((batch,), 0.5)
    grid = settings(cfg, nfe, model.scheduler.timesteps)

    def run(setting: Setting) -> tuple[float, float, int]:
        """(wall / time in the forwards, ms per forward, NFE) of one call."""
        model.net.seconds, model.net.calls = 0.0, 0
        start = time.perf_counter()
        out = sample_with(setting, model, x0, torch.Generator().manual_seed(2))
        wall = time.perf_counter() - start
        assert model.net.calls == out.rounds  # one call each, a Picard window call evaluates many rows
        return wall / model.net.seconds, model.net.seconds / out.nfe * 1e3, out.nfe

    runs: dict[str, list[tuple[float, float, int]]] = {s.label: [] for s in grid}
    bare_ms = []
    with torch.no_grad():
        run(grid[0]), run(grid[-1])  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(nfe):
                bare(x0, t)
            bare_ms.append((time.perf_counter() - start) / nfe * 1e3)
            for setting in grid:
                runs[setting.label].append(run(setting))
    rows = []
    for label, results in runs.items():
        ratios, net_ms, nfes = zip(*results)
        rows.append({
            "model": f"{name} ({spec.network})", "setting": label, "nfe": nfes[-1], "ratio_vs_net": C.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "net_ms_in_solve": C.median(net_ms),
            "net_ms_bare_loop": C.median(bare_ms),
        })
    return rows


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="rounds of every setting (the median is shown)")
    p.add_argument("--configs", default="", help="comma-separated config names (default: all of CONFIGS)")
    args = p.parse_args()
    torch.set_num_threads(1)
    nfe, rounds = (20, 3) if args.quick else (100, args.rounds)
    print(f"machine before: {C.uptime()}")
    rows = []
    chosen = [c for c in args.configs.split(",") if c]
    for name, (spec, batch, cfg) in shipped_models().items():
        if chosen and name not in chosen:
            continue
        rows += measure(name, spec, batch, cfg, nfe, rounds)
    C.print_table(
        f"sampler cost per NFE / one net(x, t) forward in the same call (median of {rounds} rounds; 1 thread)",
        ["model", "setting", "NFE", "ratio", "(min-max)", "net ms in call", "net ms, bare loop"],
        [[r["model"], r["setting"], r["nfe"], r["ratio_vs_net"], "{:.3f}-{:.3f}".format(*r["ratio_range"]),
          r["net_ms_in_solve"], r["net_ms_bare_loop"]] for r in rows],
    )
    worst = max(rows, key=lambda r: r["ratio_vs_net"])
    summary = {f"{r['model']} {r['setting']}": round(r["ratio_vs_net"], 3) for r in rows}
    summary["worst"] = f"{worst['model']} {worst['setting']} {worst['ratio_vs_net']:.3f}x"
    summary["pass"] = all(r["ratio_vs_net"] <= 1.1 for r in rows)
    C.finish(args, "c_solver_overhead", TARGET, summary, {"rows": rows, "torch_threads": 1})


if __name__ == "__main__":
    main()
