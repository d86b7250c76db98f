"""(c) Sampler cost per NFE vs one bare network forward.

ratio(method) = time of solve_ode(model.velocity, x0, method, nfe=N) / (N x time of one net(x, t))

measured for euler, midpoint, heun, rk4 at N = 100 and for dopri5 per *reported* NFE,
on the two networks the shipped configs sample with, at their shard size:

- digits: the digits config's UNet on its shard size of 1 x 8 x 8 images;
- moons:  the moons config's MLP on its shard size of 2-D points.

(both read from the shipped configs at `cpu` scale).

The overhead is split in two: `Denoiser.velocity` (time_batch + parameterization
conversion) vs the bare net, and the solver loop vs N calls of `Denoiser.velocity`.
All timings are interleaved (one round measures everything once). Other processes'
load only adds time, so the headline ratio is best round / best round (as timeit
advises); the median over rounds of the within-round ratio is printed next to it. torch uses
1 thread, as the sampling actors do (models.sampling.Sampler).

    .venv/bin/python benchmarks/solver_overhead.py [--quick]
"""

from __future__ import annotations

import time

import _common as C  # noqa: I001  (puts the repo on sys.path)
import torch

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
        adaptive = [s for s in cfg.sample.solvers if not s.nfe]
        tol = adaptive[0].atol if adaptive else 1e-5
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


def measure(name: str, spec: ModelSpec, batch: int, tol: float, nfe: int, rounds: int) -> list[dict]:
    model = build(spec)
    x0 = torch.randn(batch, *spec.data_shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((batch,), 0.5)
    times: dict[str, list[float]] = {k: [] for k in ("net", "velocity", *FIXED, "dopri5")}
    dopri_nfe = 0

    @torch.no_grad()
    def loop(fn) -> float:
        start = time.perf_counter()
        for _ in range(nfe):
            fn(x0, t)
        return (time.perf_counter() - start) / nfe

    loop(model.net), solve_ode(model.velocity, x0, "euler", nfe=4)  # warm-up
    for _ in range(rounds):
        times["net"].append(loop(model.net))
        times["velocity"].append(loop(model.velocity))
        for method in FIXED:
            start = time.perf_counter()
            sol = solve_ode(model.velocity, x0, method, nfe=nfe)
            times[method].append((time.perf_counter() - start) / sol.nfe)
        start = time.perf_counter()
        sol = solve_ode(model.velocity, x0, "dopri5", atol=tol, rtol=tol)
        times["dopri5"].append((time.perf_counter() - start) / sol.nfe)
        dopri_nfe = sol.nfe
    # Load from other processes only ever adds time: the primary ratio is best round / best round
    # (as timeit advises); the median over rounds of the within-round ratio is shown next to it.
    best = {k: min(v) for k, v in times.items()}
    per_round = lambda a, b: C.median([x / y for x, y in zip(times[a], times[b])])  # noqa: E731
    rows = []
    for method in (*FIXED, "dopri5"):
        rows.append({
            "model": name, "method": method, "nfe": dopri_nfe if method == "dopri5" else nfe,
            "ms_per_nfe": best[method] * 1e3, "net_ms": best["net"] * 1e3, "velocity_ms": best["velocity"] * 1e3,
            "ratio_vs_net": best[method] / best["net"], "median_ratio_vs_net": per_round(method, "net"),
            "denoiser_overhead": best["velocity"] / best["net"], "solver_loop_overhead": best[method] / best["velocity"],
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
        f"solve_ode cost per NFE vs one bare net(x, t) forward (best of {rounds} rounds; torch 1 thread)",
        ["model", "method", "NFE", "ms/NFE", "net ms", "velocity ms", "ratio vs net", "(median ratio)",
         "Denoiser x", "solver loop x"],
        [[r["model"], r["method"], r["nfe"], r["ms_per_nfe"], r["net_ms"], r["velocity_ms"],
          r["ratio_vs_net"], r["median_ratio_vs_net"], r["denoiser_overhead"], r["solver_loop_overhead"]]
         for r in rows],
    )
    worst = max(rows, key=lambda r: r["ratio_vs_net"])
    summary = {f"{r['model']} {r['method']}": round(r["ratio_vs_net"], 3) for r in rows}
    summary["worst"] = f"{worst['model']} {worst['method']} {worst['ratio_vs_net']:.3f}x"
    summary["pass"] = all(r["ratio_vs_net"] <= 1.1 for r in rows)
    C.finish(args, "c_solver_overhead", TARGET, summary, {"rows": rows, "torch_threads": 1})


if __name__ == "__main__":
    main()
