"""(a) Parallel sampling: the same sample sets with 1 then 2 Ray sampling workers.

What is sampled: a fixed workload, a small digits UNet (base 16, mults [1, 2], 1 res
block, 8x8 images; the digits config now ships a larger one), freshly initialised
(seed 0; its zero-initialised output conv is given small random weights so the field
is not zero) and written with `models.checkpoint.save_model`;
the digits config's whole sampling grid (Euler NFE 1, 2, 4, 8, 16, 100, dopri5 at
atol = rtol = 1e-4, and the untrained baseline at Euler NFE 100) for `--samples`
samples in shards of 125, through `tasks.sample.run_shards` (Ray tasks, `workers` at a
time) and `shards`, exactly as the `sample` task drives them.

Wall time counts from submitting the first shard to the last result; Ray itself is
started once before, and a warm-up run starts its worker processes (which keep them
and the model for later runs, as in the pipeline). Runs
alternate 1, 2, 2, 1, ... workers and the speed-up is the median over pairs. Every
shard's samples (and reported NFE) must be bit-identical between 1 and 2 workers:
the script asserts it. Finally it measures the machine's own ceiling: two plain
processes (no Ray) running the same shard loop side by side vs one.

    .venv/bin/python benchmarks/parallel_sampling.py [--quick] [--samples N] [--pairs K]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as C  # noqa: I001
import numpy as np
import ray
import torch

from models.checkpoint import ModelSpec, save_model
from tasks.runtime import ensure_ray
from models.samplers import Setting
from models.sampling import SamplerKey, shards
from tasks.sample import run_shards

TARGET = "speed-up (1 worker wall / 2 workers wall) >= 1.8x on 2 cores"
SPEC = ModelSpec("unet", (1, 8, 8), network_kwargs={"base_channels": 16, "channel_mults": [1, 2],
                                                     "num_res_blocks": 1, "groups": 4})
GRID = [Setting("euler", n) for n in (1, 2, 4, 8, 16, 100)] + [
    Setting("dopri5", None, (("atol", 1e-4), ("rtol", 1e-4))), Setting("euler", 100, untrained=True)]
SHARD = 125
SEED = 0


def make_model(folder: Path, spec: ModelSpec = SPEC) -> str:
    """A freshly initialised model (seed 0) whose all-zero layers get small random weights."""
    torch.manual_seed(SEED)
    model = spec.build()
    with torch.no_grad():
        for p in model.parameters():
            if not p.abs().sum():
                p.normal_(0, 0.02)
    save_model(model, spec, folder)
    return str(folder)


def _bare_worker(model_dir: str, shards: int, barrier, out) -> None:
    """No Ray: integrate `shards` Euler NFE=100 shards with `models.sampling.Sampler` in this process."""
    from models.sampling import Sampler

    sampler = Sampler(model_dir, SEED, None)
    setting = Setting("euler", 100)
    sampler.run(setting, 0, SHARD, SEED)  # warm-up
    barrier.wait()
    start = time.perf_counter()
    for i in range(shards):
        sampler.run(setting, i, SHARD, SEED)
    out.put(time.perf_counter() - start)


def machine_ceiling(model_dir: str, shards: int) -> float:
    """Throughput of 2 plain processes vs 1 on the same shard loop (no Ray): what 2 cores give here."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    walls = {}
    for procs in (1, 2):
        barrier, out = ctx.Barrier(procs), ctx.Queue()
        ps = [ctx.Process(target=_bare_worker, args=(model_dir, shards, barrier, out)) for _ in range(procs)]
        for p in ps:
            p.start()
        walls[procs] = max(out.get() for _ in ps)
        for p in ps:
            p.join()
    return 2 * walls[1] / walls[2]  # 2 processes did twice the work


def run(model_dir: str, workers: int, n_samples: int) -> tuple[float, dict]:
    """Sample the grid with `workers` Ray workers; returns (wall s, results)."""
    start = time.perf_counter()
    calls = [(s, i, n, SEED, 0) for s in GRID for i, n in shards(n_samples, SHARD)]
    results = {(res["label"], res["shard"]): (res["x"], res["nfe"])
               for res in run_shards(SamplerKey(model_dir, "benchmark", SEED, None, None), calls, workers)}
    return time.perf_counter() - start, results


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=None, help="samples per grid setting (default 1500)")
    p.add_argument("--pairs", type=int, default=None, help="(1-worker, 2-worker) pairs to time (default 2)")
    args = p.parse_args()
    n_samples = args.samples or (250 if args.quick else 1500)
    pairs = args.pairs or (1 if args.quick else 2)
    print(f"machine before: {C.uptime()}")
    t = time.perf_counter()
    ensure_ray()
    ray_start = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        model_dir = make_model(Path(d) / "model")
        run(model_dir, 2, 2 * SHARD)  # warm-up: worker processes, file caches
        times: dict[int, list[float]] = {1: [], 2: []}
        reference, reference_workers, mismatches = None, 0, []
        order = [w for k in range(pairs) for w in ((1, 2) if k % 2 == 0 else (2, 1))]
        for workers in order:
            wall, results = run(model_dir, workers, n_samples)
            print(f"  {workers} worker(s): {wall:.2f} s   {C.uptime()}")
            times[workers].append(wall)
            if reference is None:
                reference, reference_workers = results, workers
                continue
            assert results.keys() == reference.keys()
            for key in sorted(reference):
                (x, nfe), (x_ref, nfe_ref) = results[key], reference[key]
                if not (np.array_equal(x, x_ref) and nfe == nfe_ref):
                    mismatches.append({
                        "run": len(times[1]) + len(times[2]), "workers": workers, "vs_workers": reference_workers,
                        "key": key, "nfe": (int(nfe), int(nfe_ref)), "max_abs_diff": float(np.abs(x - x_ref).max()),
                        "elements_differing": int((x != x_ref).sum()), "nan": bool(np.isnan(x).any()),
                    })
                    print(f"  MISMATCH {mismatches[-1]}")
        ceiling = machine_ceiling(model_dir, 3 if args.quick else 8)
        print(f"  machine ceiling: 2 plain processes (no Ray) run the same shard loop {ceiling:.2f}x as fast as 1"
              f"   {C.uptime()}")
    assert not mismatches, f"{len(mismatches)} shard(s) differ between runs: {mismatches[:3]}"
    ratios = [a / b for a, b in zip(times[1], times[2])]
    n_shards = len(shards(n_samples, SHARD))
    nfe_per_shard = {s.label: int(np.mean([reference[(s.label, i)][1] for i in range(n_shards)])) for s in GRID}
    rows = [[w, len(times[w]), C.median(times[w])] for w in (1, 2)]
    C.print_table("wall time of the whole grid (median of runs)", ["workers", "runs", "wall s"], rows)
    print(f"\n  work: {len(GRID)} settings x {n_shards} shards of {SHARD} 8x8 images; NFE per shard {nfe_per_shard}")
    print(f"  all {len(reference)} shards identical for 1 and 2 workers: yes (asserted)")
    summary = {
        "speed-up": round(C.median(ratios), 3),
        "1 worker s": round(rows[0][2], 2), "2 workers s": round(rows[1][2], 2),
        "identical": True,
        "ceiling (2 plain processes, no Ray)": round(ceiling, 3),
        "pass": C.median(ratios) >= 1.8,
    }
    C.finish(args, "a_parallel_sampling", TARGET, summary, {
        "times": times, "ratios": ratios, "ray_start_s": ray_start,
        "n_samples_per_setting": n_samples, "shard": SHARD, "nfe_per_shard": nfe_per_shard,
    })
    ray.shutdown()


if __name__ == "__main__":
    main()
