"""(l) One training worker with every core against DDP workers of one core each, on one node.

    .venv/bin/python benchmarks/workers_vs_threads.py [--quick] [--json PATH]

The step the main job's digits stages take (the rectified-flow digits UNet, AdamW, a global
batch of 64), timed side by side in one run as bare PyTorch loops, each layout in fresh
processes: one process with 1 thread, one process with every core (`torch.set_num_threads`),
and N = cores DDP processes of 1 thread each on gloo (the per-worker batch 64 / N; DDP
all-reduces the gradients in backward). On a node whose cores are all its workers', the ratio
says which layout a training stage should ask Ray Train for: `train.num_workers: 1` (the lone
worker takes every core, `tasks/train_worker.py`) or one worker a core.

Batches come from `models.pairs.PairSampler.stream` as in the worker, built inline or ahead in
a background thread ("+ batch thread", `prefetch=2`): the two rows with and without it show
what one more thread beside a step on every core costs (why the stream builds cheap batches
inline).
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _common as C

TARGET = "a measurement: which layout trains the digits stage faster on one node"
UNET = dict(base_channels=32, channel_mults=[1, 2, 2], num_res_blocks=1, groups=4)  # rectified-flow/digits
BATCH = 64


def _worker(rank: int, world: int, threads: int, prefetch: int, steps: int, port: int, out) -> None:
    from models.networks import build_network
    from models.pairs import PairSampler

    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = build_network("unet", (1, 8, 8), **UNET)
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    optimizer = torch.optim.AdamW(net.parameters(), 1e-3)
    data = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    batches = PairSampler(data, BATCH // world, rank=rank).stream(0, 10 ** 6, prefetch=prefetch)

    def step() -> None:
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = (model(batch.x1, batch.t) - batch.x0).square().mean()
        loss.backward()
        optimizer.step()
        loss.item()

    for _ in range(10):  # warm-up: allocator, oneDNN primitives, DDP buckets
        step()
    seconds = C.timeit(step, repeat=3, number=steps)
    if world > 1:
        dist.destroy_process_group()
    if rank == 0:
        out.put(min(seconds))


def ms_per_step(world: int, threads: int, prefetch: int, steps: int, port: int) -> float:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, threads, prefetch, steps, port, out), nprocs=world, start_method="spawn")
    return out.get() * 1e3


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2, help="every layout is timed this many times, interleaved")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    steps = 10 if args.quick else 40
    layouts = {"1 process, 1 thread": (1, 1, 0), f"1 process, {cores} threads": (1, cores, 0),
               f"1 process, {cores} threads + batch thread": (1, cores, 2),
               f"{cores} DDP processes, 1 thread each": (cores, 1, 0),
               f"{cores} DDP processes, 1 thread each + batch thread": (cores, 1, 2)}
    load_before = C.uptime()
    times = {name: [] for name in layouts}
    for r in range(1 if args.quick else args.rounds):
        for k, (name, (world, threads, prefetch)) in enumerate(layouts.items()):
            times[name].append(ms_per_step(world, threads, prefetch, steps, 29400 + 10 * r + k))
    best = {name: min(v) for name, v in times.items()}
    one = best["1 process, 1 thread"]
    rows = [[name, best[name], one / best[name]] for name in layouts]
    C.print_table(f"digits UNet training step, global batch {BATCH} ({load_before})", ["layout", "ms/step", "speed-up vs 1 thread"], rows)
    threads_vs_ddp = best[f"{cores} DDP processes, 1 thread each"] / best[f"1 process, {cores} threads"]
    thread_cost = best[f"1 process, {cores} threads + batch thread"] / best[f"1 process, {cores} threads"]
    print(f"\none worker with {cores} threads is {threads_vs_ddp:.2f}x as fast as {cores} DDP workers; "
          f"a batch thread beside it makes its step {thread_cost:.2f}x as long")
    C.finish(args, "workers vs threads", TARGET, {"threads / DDP speed-up": threads_vs_ddp,
                                                   "batch thread slow-down": thread_cost, "ms/step": best},
             {"load_before": load_before, "load_after": C.uptime(), "times_ms": times})


if __name__ == "__main__":
    main()
