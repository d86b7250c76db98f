"""(m) The [SF]^2M 2-D setup (issue 14's cfm-2d) as a bare one-thread loop: train, sample, score.

Reads a `gendag run flow-matching` config (with `--set` overrides, the same schema and
validation) and does that run's work in one Python process with one torch thread and no
Prefect, Ray, DVC or MLflow: the same datasets (`models.data`, the source on seed + 1 as the
graph versions it), the same network, path, coupling and batches (`PairSampler`, its background
thread included), the same optimizer step; then the same starts (`start_draw`), sampler
(`sample_with`, which also measures the path energy) and metrics (exact W2 against the held-out
points, NPE against W2^2 between the source and the held-out points). It is what a graph run's
training step is compared with (ms per step), and a fast way to measure a method on a task.

    .venv/bin/python benchmarks/cfm2d_loop.py -c configs/flow-matching/cfm-2d/gaussian-to-8gaussians.yaml \
        [--set coupling.kind=independent ...] [--steps N] [--json out.json]
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch

from _common import load1, parser  # noqa: F401  (puts the repo on sys.path)

from models.couplings import make_coupling
from models.data import load_dataset
from models.metrics import wasserstein2
from models.objectives import make_objective
from models.pairs import PairSampler
from models.samplers import sample_with
from models.sampling import sampling_grid, start_draw
from models.training import optimizer_step, scheduled_lr
from models.ema import EMA
from tasks.config_loading import load_config


def run(cfg, steps: int | None = None, prefetch: int = 2, pair_workers: int = 1) -> dict:
    torch.set_num_threads(1)
    steps = steps or cfg.train.steps
    data = load_dataset(cfg.data.spec(cfg.seed))
    source_cfg = cfg.source_config.as_data()
    source = load_dataset(source_cfg.spec(cfg.seed + 1)) if source_cfg else None
    shape = tuple(data.train.shape[1:])
    torch.manual_seed(cfg.seed)
    model = cfg.model_spec(shape).build()
    objective = make_objective(cfg.objective, model)
    pairs = PairSampler(torch.from_numpy(data.train), cfg.train.batch_size,
                        source=torch.from_numpy(source.train) if source else None,
                        coupling=make_coupling(cfg.coupling.kind, **cfg.coupling.kwargs), seed=cfg.seed,
                        noise=model.scheduler.noisy)
    ema = EMA(model, decay=cfg.train.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    model.train()
    t_start = time.perf_counter()
    t_warm, warm = None, min(50, steps - 1)
    losses = []
    for batch in pairs.stream(0, steps, prefetch=prefetch, workers=pair_workers):
        if batch.step == warm:
            t_warm = time.perf_counter()
        loss = objective.loss(model, batch)
        lr = scheduled_lr(batch.step, cfg.train.lr, cfg.train.warmup_steps, steps, cfg.train.lr_schedule)
        losses.append(optimizer_step(loss, model, optimizer, ema, lr, cfg.train.grad_clip))
    t_end = time.perf_counter()
    trained = ema.shadow.eval()

    n = cfg.sample.n_samples
    test = data.test[:10_000]
    starts = source.test if source else None
    x0 = start_draw(trained, shape, n, torch.Generator().manual_seed(cfg.seed), starts, 0, n, cfg.seed)
    floor_start = starts[:len(test)] if source else np.random.default_rng([cfg.seed, 3]).standard_normal(test.shape)
    floor = wasserstein2(floor_start, test) ** 2
    out = {"config": cfg.name, "seed": cfg.seed, "steps": steps, "train_s": round(t_end - t_start, 1),
           "ms_per_step": round(1e3 * (t_end - t_warm) / max(1, steps - warm), 3),
           "final_loss": float(np.mean(losses[-200:])), "distinct_starts": int(len(np.unique(x0.numpy(), axis=0))),
           "pe_floor": floor, "load1": load1()}
    for setting in sampling_grid(cfg.sample.samplers, baseline=False):
        result = sample_with(setting, trained, x0.clone(), torch.Generator().manual_seed(cfg.seed + 1))
        out[f"w2@{setting.label}"] = wasserstein2(result.x.numpy(), test)
        if result.energy is not None:
            pe = float(result.energy.mean())
            out[f"pe@{setting.label}"], out[f"npe@{setting.label}"] = pe, abs(pe - floor) / floor
    return out


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--scale", default="cpu")
    p.add_argument("--steps", type=int, default=None, help="train this many steps instead of the config's")
    p.add_argument("--pair-workers", type=int, default=1, help="threads building batches (OT plans) ahead")
    args = p.parse_args()
    cfg = load_config(args.config, args.scale, args.overrides)
    result = run(cfg, 200 if args.quick else args.steps, pair_workers=args.pair_workers)
    result["overrides"] = args.overrides
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
