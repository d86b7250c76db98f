"""(d) Minibatch-OT vs independent couplings: training time per step at batch 512 on a 2-D task.

The moons config's problem and model, in one process: 8 gaussians -> moons (the
datasets the graph versions, seeds 0 and 1), the MLP (hidden 256, 4 layers), batch
512, AdamW lr 2e-3 with 100 warm-up steps, grad clip 1, EMA 0.999, `PairSampler` +
`flow_matching_loss` as in tasks/train.py, torch with 1 thread and OMP_NUM_THREADS=1
(numpy's OpenBLAS on 1 thread), as in each training worker of the graph (a 1-CPU Ray
actor); `--blas-default` leaves numpy's BLAS at its default 2 threads instead.

Timing: every mode trains from the same initialisation for `--steps` steps; the
modes run one after the other in rounds (A B C D, then D C B A, ...) and each OT
mode's cost is divided by the independent run of the same round; the median over
rounds is reported. Modes:

- independent:          IndependentCoupling, batches built inline (prefetch=0);
- OT synchronous:       MinibatchOTCoupling("exact") (POT `ot.emd`), prefetch=0;
- OT prefetch, 1 thread: `PairSampler.stream(prefetch=2)`, what tasks/train.py uses;
- OT prefetch, N threads: `PairSampler.stream(prefetch=2N, workers=N)`.

Every OT mode must end with bit-identical weights (same batches, same order): asserted.
The script also checks that POT's `ot.emd` releases the GIL (the longest stall of a
pure-Python loop while another thread runs `ot.emd` must be far below one emd call).

The headline is the full training run below (3000 steps, the moons config's length,
OT with the pooled prefetch) against the independent run of the same length; the
rounds above are the side-by-side check of every mode.

Quality: independent and OT are each trained for `--train-steps` steps (the moons
config's 3000); the EMA model is sampled with Euler at NFE 1, 2, 4 and 100 from 2000
source test points, and scored by exact W2 (`models.metrics.wasserstein2`) against
10000 held-out moons points.

    .venv/bin/python benchmarks/ot_coupling.py [--quick] [--steps T] [--rounds R] [--workers N]
"""

from __future__ import annotations

import os
import sys

# A graph training worker is a Ray actor with 1 CPU, for which Ray sets OMP_NUM_THREADS=1: numpy's
# OpenBLAS then runs 1 thread. Emulate that (before numpy is imported) unless --blas-default is given:
# with 2 BLAS threads, OpenBLAS's helper thread busy-waits ~100 ms after each small product in ot.dist,
# i.e. for ever at one plan per step, and takes the core that the prefetched plans should use.
if "--blas-default" not in sys.argv:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import threading
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import _common as C  # noqa: I001
import numpy as np
import ot
import torch

from models.checkpoint import ModelSpec
from models.couplings import IndependentCoupling, MinibatchOTCoupling
from models.data import DatasetSpec, load_dataset
from models.ema import EMA
from models.losses import flow_matching_loss
from models.metrics import wasserstein2
from models.pairs import PairSampler
from models.paths import GaussianPath
from models.solvers import solve_ode
from models.training import optimizer_step, scheduled_lr

TARGET = "OT training time per step <= 2x independent (batch 512, 2-D, one process)"
BATCH, LR, WARMUP, CLIP, EMA_DECAY, SEED = 512, 2e-3, 100, 1.0, 0.999, 0
SPEC = ModelSpec("mlp", (2,), network_kwargs={"hidden": 256, "layers": 4})


def datasets():
    data = load_dataset(DatasetSpec("moons", seed=SEED))
    source = load_dataset(DatasetSpec("eight_gaussians", seed=SEED + 1))
    return data, source


def train(data, source, coupling, steps: int, prefetch: int, workers: int = 1):
    """The tasks/train.py loop, in process; returns (model, ema, seconds per step)."""
    torch.manual_seed(SEED)
    model = SPEC.build()
    ema = EMA(model, decay=EMA_DECAY)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    path = GaussianPath(model.scheduler)
    pairs = PairSampler(torch.from_numpy(data.train), BATCH, source=torch.from_numpy(source.train),
                        coupling=coupling, seed=SEED)
    model.train()
    start = time.perf_counter()
    for batch in pairs.stream(0, steps, prefetch=prefetch, workers=workers):
        loss = flow_matching_loss(model, path, batch.x0, batch.x1, t=batch.t)
        optimizer_step(loss, model, opt, ema, scheduled_lr(batch.step, LR, WARMUP, steps), CLIP)
    return model, ema, (time.perf_counter() - start) / steps


def gil_check(n: int = 512, repeats: int = 3) -> dict:
    """Does ot.emd release the GIL?  Two measurements, each the best of `repeats` (load only adds time):

    - the longest stall of a pure-Python loop while another thread runs ot.emd back to back,
      vs the duration of one emd call (a solver holding the GIL would stall the loop that long);
    - two threads each solving `k` plans vs one thread solving 2k (~2x if they run in parallel).
    """
    rng = np.random.default_rng(0)
    cost = ot.dist(rng.normal(size=(n, 2)), rng.normal(size=(n, 2)))
    w = ot.unif(n)
    one = min(C.timeit(lambda: ot.emd(w, w, cost), repeat=5))

    def longest_gap(seconds: float) -> float:
        stamps, end = [], time.perf_counter() + seconds
        while (now := time.perf_counter()) < end:
            stamps.append(now)
        return float(np.diff(stamps).max())

    def with_solver(seconds: float) -> float:
        stop = threading.Event()

        def solve() -> None:
            while not stop.is_set():
                ot.emd(w, w, cost)

        th = threading.Thread(target=solve)
        th.start()
        time.sleep(0.05)
        gap = longest_gap(seconds)
        stop.set()
        th.join()
        return gap

    alone = min(longest_gap(0.5) for _ in range(repeats))
    busy = min(with_solver(0.5) for _ in range(repeats))
    k = 6

    def solve_k() -> None:
        for _ in range(k):
            ot.emd(w, w, cost)

    def two_threads() -> float:
        ths = [threading.Thread(target=solve_k) for _ in range(2)]
        t = time.perf_counter()
        for th in ths:
            th.start()
        for th in ths:
            th.join()
        return time.perf_counter() - t

    serial = min(C.timeit(lambda: (solve_k(), solve_k()), repeat=repeats))
    parallel = min(two_threads() for _ in range(repeats))
    return {"emd_ms": one * 1e3, "longest_stall_alone_ms": alone * 1e3, "longest_stall_with_emd_ms": busy * 1e3,
            "two_threads_speedup": serial / parallel, "releases_gil": busy < 0.5 * one}


def _w2(args):
    x, ref = args
    return wasserstein2(x, ref)


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="timed steps per mode and round (default 500)")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 2)")
    p.add_argument("--workers", type=int, default=2, help="plan threads of the pooled mode (default 2)")
    p.add_argument("--train-steps", type=int, default=None, help="steps of the quality runs (default 3000)")
    p.add_argument("--blas-default", action="store_true",
                   help="leave numpy's BLAS threads at their default (2 here) instead of 1 as in a Ray worker")
    args = p.parse_args()
    steps = args.steps or (40 if args.quick else 500)
    rounds = args.rounds or (1 if args.quick else 2)
    train_steps = args.train_steps or (300 if args.quick else 3000)
    n_eval, n_ref = (500, 2000) if args.quick else (2000, 10_000)
    torch.set_num_threads(1)
    print(f"machine before: {C.uptime()}")
    gil = gil_check()
    print(f"  ot.emd 512x512: {gil['emd_ms']:.1f} ms; longest stall of a Python loop while another thread "
          f"runs ot.emd: {gil['longest_stall_with_emd_ms']:.1f} ms (alone {gil['longest_stall_alone_ms']:.1f} ms); "
          f"2 threads solve plans {gil['two_threads_speedup']:.2f}x as fast as 1"
          f" -> releases the GIL: {gil['releases_gil']}")
    print(f"  numpy BLAS threads: {os.environ.get('OMP_NUM_THREADS', 'default')} (OMP_NUM_THREADS)")
    data, source = datasets()
    ot_exact = MinibatchOTCoupling("exact")
    modes = {
        "independent": (IndependentCoupling(), 0, 1),
        "OT synchronous": (ot_exact, 0, 1),
        "OT prefetch, 1 thread": (ot_exact, 2, 1),
        f"OT prefetch, {args.workers} threads": (ot_exact, 2 * args.workers, args.workers),
    }
    train(data, source, IndependentCoupling(), 20, 0)  # warm-up
    per_step: dict[str, list[float]] = {m: [] for m in modes}
    weights: dict[str, list[torch.Tensor]] = {}
    for r in range(rounds):
        order = list(modes) if r % 2 == 0 else list(modes)[::-1]
        for mode in order:
            coupling, prefetch, workers = modes[mode]
            model, _, sec = train(data, source, coupling, steps, prefetch, workers)
            per_step[mode].append(sec)
            w = [p.detach().clone() for p in model.parameters()]
            if mode != "independent":
                ref = weights.setdefault("ot", w)
                assert all(torch.equal(a, b) for a, b in zip(ref, w)), f"{mode}: weights differ from the other OT modes"
        print(f"  round {r + 1}: " + ", ".join(f"{m} {per_step[m][-1] * 1e3:.2f} ms" for m in modes)
              + f"   {C.uptime()}")
    ratio = {m: C.median([a / b for a, b in zip(per_step[m], per_step["independent"])]) for m in modes}
    pooled = list(modes)[-1]
    C.print_table(
        f"training time per step, batch {BATCH} ({steps} steps x {rounds} rounds; ratio = median over rounds)",
        ["mode", "ms/step (median)", "x independent"],
        [[m, C.median(per_step[m]) * 1e3, ratio[m]] for m in modes],
    )
    print(f"  all OT modes ended with bit-identical weights after {steps} steps: yes (asserted)")

    # Quality after the same number of steps: independent vs OT (trained with the pooled prefetch).
    print(f"\n  quality runs: {train_steps} steps each ...")
    quality = {}
    long_runs = {}
    for name, coupling, prefetch, workers in (("independent", IndependentCoupling(), 0, 1),
                                              ("minibatch OT", ot_exact, 2 * args.workers, args.workers)):
        _, ema, sec = train(data, source, coupling, train_steps, prefetch, workers)
        long_runs[name] = sec
        g = torch.Generator().manual_seed(SEED)
        x0 = torch.from_numpy(source.test)[torch.randint(len(source.test), (n_eval,), generator=g)]
        for nfe in (1, 2, 4, 100):
            quality[(name, nfe)] = solve_ode(ema.shadow.velocity, x0, "euler", nfe=nfe).x.numpy()
    reference = data.test[:n_ref]
    floor = data.train[np.random.default_rng(SEED).permutation(len(data.train))[:n_eval]]
    jobs = {k: v for k, v in quality.items()} | {("floor", 0): floor}
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        w2 = dict(zip(jobs, pool.map(_w2, [(x, reference) for x in jobs.values()])))
    C.print_table(
        f"W2 after {train_steps} steps ({n_eval} samples vs {n_ref} held-out moons; Euler; floor = real train points)",
        ["coupling", "NFE=1", "NFE=2", "NFE=4", "NFE=100", "ms/step over the run"],
        [[name, *(w2[(name, n)] for n in (1, 2, 4, 100)), long_runs[name] * 1e3]
         for name in ("independent", "minibatch OT")] + [["real data (floor)", w2[("floor", 0)], "", "", "", ""]],
    )
    summary = {
        "independent ms/step": round(C.median(per_step["independent"]) * 1e3, 2),
        **{f"{m} x": round(ratio[m], 2) for m in list(modes)[1:]},
        f"long run ({train_steps} steps) OT pooled x": round(long_runs["minibatch OT"] / long_runs["independent"], 2),
        "emd releases GIL": gil["releases_gil"],
        "numpy BLAS threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "W2 indep NFE 1/2/4/100": "/".join(f"{w2[('independent', n)]:.3f}" for n in (1, 2, 4, 100)),
        "W2 OT NFE 1/2/4/100": "/".join(f"{w2[('minibatch OT', n)]:.3f}" for n in (1, 2, 4, 100)),
        "W2 floor": round(w2[("floor", 0)], 4),
        "pass": long_runs["minibatch OT"] / long_runs["independent"] <= 2.0,
    }
    C.finish(args, "d_ot_coupling", TARGET, summary, {
        "per_step_s": per_step, "ratios": ratio, "gil": gil, "long_run_s_per_step": long_runs,
        "w2": {f"{k[0]}@nfe={k[1]}": v for k, v in w2.items()}, "steps": steps, "rounds": rounds,
        "train_steps": train_steps,
    })


if __name__ == "__main__":
    main()
