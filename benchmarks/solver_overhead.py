"""(c) Sampler cost per NFE vs one bare network forward.

ratio(method) = wall time of solve_ode(model.velocity, x0, method) / time spent in the network's
                forward calls during that same solve

i.e. cost per NFE / cost of one bare net(x, t) forward, measured inside one call: the network is
wrapped in a timer, so both sides see the same inputs at the same moment, and drift in the
machine's speed (it moves by 10-20% within minutes on this shared machine) cancels. Everything
outside the forward counts as solver cost: `Denoiser.velocity` (time batching, parameterization
conversion), the solver's own arithmetic and, for dopri5, torchdiffeq's step control.

Measured for euler, midpoint, heun, rk4 at N = 100 and for dopri5 per *reported* NFE, on the two
networks the shipped configs sample with, at their shard size and dopri5 tolerance (read from the
shipped configs at `cpu` scale):

- digits: the digits config's UNet on its shard size of 1 x 8 x 8 images;
- moons:  the moons config's MLP on its shard size of 2-D points.

The headline is the median over rounds; a plain loop of N bare forwards is timed in each round
for reference. torch uses 1 thread, as the sampling actors do (models.sampling.Sampler).

    .venv/bin/python benchmarks/solver_overhead.py [--quick]
"""

from __future__ import annotations

import time

import _common as C  # noqa: I001  (puts the repo on sys.path)
import torch
from torch import nn

from models.checkpoint import ModelSpec
from models.solvers import solve_ode
from tasks.config import load_config

TARGET = "solve_ode time <= 1.1 x (NFE x one net(x, t) forward)"
FIXED = ("euler", "midpoint", "heun", "rk4")

SHAPES = {"digits": (1, 8, 8), "gaussians-to-moons": (2,)}


def shipped_models() -> dict[str, tuple[ModelSpec, int, float]]:
    """name -> (model spec, shard size, dopri5 tolerance) of the configs the main job runs."""
    out = {}
    for config, shape in SHAPES.items():
        cfg = load_config(C.ROOT / "configs" / "flow-matching" / f"{config}.yaml")
        adaptive = [s for s in cfg.sample.samplers if not s.nfe]
        tol = adaptive[0].params["atol"] if adaptive else 1e-5
        out[f"{config}-{cfg.model.network}"] = (cfg.model_spec(shape), cfg.sample.shard_size, tol)
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


def measure(name: str, spec: ModelSpec, batch: int, tol: float, nfe: int, rounds: int) -> list[dict]:
    model = build(spec)
    bare, model.net = model.net, TimedNet(model.net)
    x0 = torch.randn(batch, *spec.data_shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((batch,), 0.5)
    methods = (*FIXED, "dopri5")

    def solve(method: str) -> tuple[float, float, int]:
        """(wall / time in the forwards, ms per forward, NFE) of one solve."""
        model.net.seconds, model.net.calls = 0.0, 0
        kwargs = {"atol": tol, "rtol": tol} if method == "dopri5" else {"nfe": nfe}
        start = time.perf_counter()
        sol = solve_ode(model.velocity, x0, method, **kwargs)
        wall = time.perf_counter() - start
        assert model.net.calls == sol.nfe
        return wall / model.net.seconds, model.net.seconds / sol.nfe * 1e3, sol.nfe

    runs: dict[str, list[tuple[float, float, int]]] = {m: [] for m in methods}
    bare_ms = []
    with torch.no_grad():
        solve("euler"), solve("dopri5")  # warm-up
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(nfe):
                bare(x0, t)
            bare_ms.append((time.perf_counter() - start) / nfe * 1e3)
            for method in methods:
                runs[method].append(solve(method))
    rows = []
    for method in methods:
        ratios, net_ms, nfes = zip(*runs[method])
        rows.append({
            "model": name, "method": method, "nfe": nfes[-1], "ratio_vs_net": C.median(ratios),
            "ratio_range": [min(ratios), max(ratios)], "net_ms_in_solve": C.median(net_ms),
            "net_ms_bare_loop": C.median(bare_ms),
        })
    return rows


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    nfe, rounds = (20, 3) if args.quick else (100, 7)
    print(f"machine before: {C.uptime()}")
    rows = []
    for name, (spec, batch, tol) in shipped_models().items():
        rows += measure(name, spec, batch, tol, nfe, rounds)
    C.print_table(
        f"solve_ode cost per NFE / one net(x, t) forward in the same solve (median of {rounds} rounds; 1 thread)",
        ["model", "method", "NFE", "ratio", "(min-max)", "net ms in solve", "net ms, bare loop"],
        [[r["model"], r["method"], r["nfe"], r["ratio_vs_net"], "{:.3f}-{:.3f}".format(*r["ratio_range"]),
          r["net_ms_in_solve"], r["net_ms_bare_loop"]] for r in rows],
    )
    worst = max(rows, key=lambda r: r["ratio_vs_net"])
    summary = {f"{r['model']} {r['method']}": round(r["ratio_vs_net"], 3) for r in rows}
    summary["worst"] = f"{worst['model']} {worst['method']} {worst['ratio_vs_net']:.3f}x"
    summary["pass"] = all(r["ratio_vs_net"] <= 1.1 for r in rows)
    C.finish(args, "c_solver_overhead", TARGET, summary, {"rows": rows, "torch_threads": 1})


if __name__ == "__main__":
    main()
