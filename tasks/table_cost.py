"""What a table costs before anything trains (`gendag table <name> --dry-run`).

Per cell: its training stages (steps x batch on how many workers), what it samples (points x
NFE over its sampler grid, with the untrained baseline), the network's forward FLOPs per item
(counted by `torch.utils.flop_counter` on one item of the data's shape), and a time estimate:
FLOPs over a rate, plus the fixed start-up of a graph run (Prefect, Ray, Ray Train: about a
minute per graph here, BENCHMARKS.md (b)), plus, for a minibatch-OT coupling, one OT plan per
training step, timed now on one random batch of the rank's size (exact OT and Sinkhorn cost
what the network does not: 14 and 95 ms a plan at 512 points here against ~5 ms a step). At `cpu` scale the rate is this machine's, measured
by a one-thread matrix product (its best of several, so that other work running does not
inflate it) times the cores and a calibrated efficiency; at `paper` scale a sustained GPU rate
is assumed (`GPU_FLOPS`, stated in the output). An estimate to plan with: it ignores data
loading, the evaluation's networks and an adaptive solver's steps beyond `ADAPTIVE_NFE`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import torch

from models.data import TORCHVISION_SHAPES
from tasks.config import RunConfig
from tasks.config_sections import TrainConfig, merged_train

GPU_FLOPS = 3e13  # sustained FLOP/s of one data-centre GPU on these networks (an assumption)
FIXED_S = 60.0  # start-up of one graph run (BENCHMARKS.md (b): 1-2 minutes; one process reuses it)
ADAPTIVE_NFE = 100  # what an adaptive solver is counted at
# What a graph's training step costs beyond the network's forward and backward (optimizer, EMA,
# DDP, data, progress): ~4 ms here (issue 14: 8 ms per step in a graph against 4.3 ms bare).
STEP_OVERHEAD_S = 0.004
# The share of the cores' matrix-product rate gendag's training reaches on the CPU, calibrated on
# the main job's training times at idle (BENCHMARKS.md: rectified-flow/digits 1-RF, 2500 steps of
# 64 on the UNet, 139 s, estimated 134 s; rectified-flow/moons 1-RF, 3000 steps of 512, 30 s, est. 35 s).
CPU_EFFICIENCY = 0.3
BACKWARD = 3.0  # a training step of one item: forward + backward ~ 3 forwards
SEQUENTIAL_DENSITY = ("iaf",)  # flows whose log-density takes one pass per dimension
SHAPES = {"digits": (1, 8, 8), "breast_cancer": (30,), **TORCHVISION_SHAPES}  # the rest are 2-D toys


@dataclass(frozen=True)
class Cost:
    stages: list[tuple[str, TrainConfig]]
    plan_seconds: float  # pairing one batch by the config's coupling (0: a coupling that costs nothing)
    trained_items: int  # training examples seen over every stage
    sampled_evals: int  # network evaluations of item size over every sampler setting and set
    flops_per_item: float
    seconds: float  # estimated wall time
    measured: bool  # at this machine's rate (else FLOPs over GPU_FLOPS)


def item_shape(cfg: RunConfig) -> tuple[int, ...]:
    name = cfg.data.name
    if name in ("npy", "image_folder"):
        return tuple(getattr(cfg.data, "shape", None) or (2,))  # unknown until read: counted as 2-D
    shape = SHAPES.get(name, (2,))
    size = getattr(cfg.data, "image_size", None)
    return (shape[0], size, size) if size and len(shape) == 3 else shape


def training_stages(cfg: RunConfig) -> list[tuple[str, TrainConfig]]:
    """The models a graph trains, in order, with each one's training settings."""
    if cfg.graph == "rectified-flow":
        stages = [("1-RF", cfg.train)]
        stages += [(f"{k}-RF", merged_train(cfg.train, cfg.reflow.train, "reflow.train"))
                   for k in range(2, cfg.reflow.rounds + 2)]
        if cfg.distill.enabled:
            stages.append(("distill", merged_train(cfg.train, cfg.distill.train, "distill.train")))
        return stages
    teacher = [] if getattr(cfg, "teacher", None) else [("teacher", cfg.train)]
    if cfg.graph == "progressive-distillation":
        student = merged_train(cfg.train, cfg.distill.train, "distill.train")
        return teacher + [(f"round {i + 1}", student) for i in range(cfg.distill.rounds)]
    if cfg.graph.startswith("consistency"):
        student = [("consistency", merged_train(cfg.train, cfg.consistency.train, "consistency.train"))]
        return student if cfg.graph == "consistency-training" else teacher + student
    return [(cfg.graph, cfg.train)]


def _evals_per_training_item(cfg: RunConfig) -> float:
    """Network forwards per training item: one, or the CNF's fixed-step solve (rk4: 4 a step)."""
    if cfg.graph != "cnf":
        return 1.0
    per_step = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4}.get(cfg.cnf.method, 4)
    return float(per_step * cfg.cnf.steps)


def sampled_evals(cfg: RunConfig) -> int:
    """Network evaluations of the sampler grids (every set, the baseline once)."""
    from models.sampling import sampling_grid

    total = 0
    for entries, _ in cfg.sampler_lists().values():
        entries = entries if isinstance(entries, list) else [entries]
        for setting in sampling_grid(entries, baseline=False):
            total += (setting.nfe or ADAPTIVE_NFE) * cfg.sample.n_samples * cfg.sample.sets
    return total


def estimate(cfg: RunConfig, scale: str) -> Cost:
    """FLOPs of the training steps and the sampler grids over a rate (`cpu_rate()` here,
    `GPU_FLOPS` at paper scale), plus gendag's per-step overhead on the CPU."""
    shape = item_shape(cfg)
    flops = _flops((cfg.graph, json.dumps(cfg.model.model_dump(mode="json"), sort_keys=True), shape))
    stages = training_stages(cfg)
    trained = sum(t.steps * t.batch_size for _, t in stages)
    sampled = sampled_evals(cfg)
    work = flops * (trained * BACKWARD * _evals_per_training_item(cfg) + sampled)
    plan = plan_seconds(cfg, shape)
    # every stage not trained on a coupling set pairs its batches (on the CPU at either scale:
    # POT); a rectified flow's reflow and distillation stages train on its coupling sets
    unpaired = stages[:1] if cfg.graph == "rectified-flow" else stages
    plans = plan * sum(t.steps for _, t in unpaired)
    if scale == "paper":
        return Cost(stages, plan, trained, sampled, flops, FIXED_S + plans + work / GPU_FLOPS, measured=False)
    overhead = sum(t.steps for _, t in stages) * STEP_OVERHEAD_S
    return Cost(stages, plan, trained, sampled, flops, FIXED_S + overhead + plans + work / cpu_rate(), measured=True)


def plan_seconds(cfg: RunConfig, shape: tuple[int, ...]) -> float:
    """What pairing one of a rank's batches costs under the config's coupling (each rank pairs
    its own), timed now; 0 for a coupling that costs nothing (`costly` unset)."""
    from models.couplings import COUPLINGS

    coupling = getattr(cfg, "coupling", None)
    if coupling is None or not COUPLINGS[coupling.kind].costly:
        return 0.0
    batch = max(1, cfg.train.batch_size // max(1, cfg.train.num_workers))
    return _time_pairing(coupling.kind, json.dumps(coupling.kwargs, sort_keys=True), batch, math.prod(shape))


@lru_cache(maxsize=None)
def _time_pairing(kind: str, kwargs: str, batch: int, dims: int) -> float:
    """The best of three pairings of two random batches (standard normal against a shifted one)."""
    from models.couplings import make_coupling

    coupling = make_coupling(kind, **json.loads(kwargs))
    generator = torch.Generator().manual_seed(0)
    x0, x1 = (torch.randn(batch, dims, generator=generator) + shift for shift in (0.0, 1.0))
    best = float("inf")
    for _ in range(3):
        began = time.perf_counter()
        coupling(x0, x1, generator)
        best = min(best, time.perf_counter() - began)
    return best


@lru_cache(maxsize=None)
def cpu_rate() -> float:
    """What this machine's cores sustain on a small network's matrix products: the best of
    several 256 x 512 x 512 float32 products on one thread, times the cores (the best, not the
    mean, so that other work on the machine does not inflate the estimate), at the efficiency
    small networks reach (`CPU_EFFICIENCY`)."""
    import os

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(256, 512), torch.randn(512, 512)
        best = float("inf")
        for _ in range(20):
            began = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - began)
    finally:
        torch.set_num_threads(threads)
    return 2 * 256 * 512 * 512 / best * (os.cpu_count() or 1) * CPU_EFFICIENCY


def _network(key: tuple, device: str = "cpu"):
    """(the cell's network as a function of a batch, how many such passes a training item
    costs): a denoiser's forward; a normalizing flow's log-density, which for IAF is D
    passes of its one-pass direction (sampling), counted as D x that pass."""
    graph, model, shape = key
    model = json.loads(model)
    with torch.device(device):
        if "network" in model:
            from models.networks import build_network

            net = build_network(model["network"], shape, **model["kwargs"])
            return (lambda x: net(x, torch.full((x.shape[0],), 0.5, device=x.device))), 1
        from models.normalizing_flows import build_flow

        flow = build_flow(graph, shape, **model["kwargs"])
        if graph in SEQUENTIAL_DENSITY:
            return flow.decode, math.prod(shape)
        return flow.log_prob, 1


@lru_cache(maxsize=None)
def _flops(key: tuple) -> float:
    """Forward FLOPs of one item, counted on the meta device (no arithmetic is done: a paper-size
    network, or an autoregressive flow's D passes, costs nothing to count); on the CPU when an
    operation has no meta kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    for device in ("meta", "cpu"):
        try:
            forward, passes = _network(key, device)
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                forward(torch.randn(1, *key[2], device=device))
            return max(float(counter.get_total_flops()), 1.0) * passes
        except (NotImplementedError, RuntimeError):
            continue
    return 1.0
