"""(b) Orchestration overhead: the whole graph vs a bare PyTorch loop doing the same job.

Graph: `gendag run flow-matching -c <config> --out <ws>/runs/bench` in a fresh
GENDAG_HOME temp workspace (embedded Prefect server, Ray, Ray Train with 2 DDP
workers of 1 thread, DVC, MLflow), timed from process launch to exit.

Bare: one fresh Python process (this script with `--bare`), torch with 2 threads
(`--bare-threads`, `--bare-train-threads`: give the bare loop its fastest setting for
the model at hand; the digits base-32 UNet trains faster on 2 threads, a base-16 one
on 1; see BENCHMARKS.md), no Prefect/Ray/DVC/MLflow, doing the same work: load the dataset; train the FID feature
network (image data); train the same model with the same global batch (the two DDP
ranks' batches, drawn by the same `PairSampler`s and concatenated), steps, lr
schedule, grad clip and EMA; sample the same grid (`sampling_grid`: every solver x NFE
plus the untrained baseline) in the same shards with the same seeds; score every set
and the real-data floor with the same metrics (FID/KID via `fid_kid`, or W2 + MMD).
What the bare loop does not do is the orchestration: the Prefect server and states,
Ray and Ray Train start-up, DDP, checkpoints, DVC add/push, the report plots, MLflow
logging and registration.

The graph's time is broken down from Prefect's own task-run records (its SQLite DB in
the workspace) and the Ray Train checkpoint times (to separate the training loop from
Ray Train's start-up).

    .venv/bin/python benchmarks/orchestration_overhead.py [--quick] [--config C] [--set k=v ...] [--pairs K]

Default: the digits config at cpu scale (its UNet, steps, batch, sample sets and
Euler NFE 1..100 + dopri5 grid, FID/KID). `--quick` runs the tiny scale.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import _common as C  # noqa: I001

TARGET = "graph wall time <= 1.15 x bare loop wall time, on a job whose bare loop takes >= 2 minutes"
GENDAG = Path(sys.executable).with_name("gendag")


# ----------------------------------------------------------------------------- bare loop (child process)


def bare(config: str, scale: str, overrides: list[str], workdir: Path, out: Path, threads: int,
         train_threads: int) -> None:
    """The same job as the graph, as a plain loop in this process; writes stage times to `out`."""
    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    import numpy as np
    import torch

    from flows.cli import resolve_config
    from models.data import DatasetSpec, load_dataset
    from models.ema import EMA
    from models.losses import flow_matching_loss
    from models.metrics import mmd_rbf, reference_set, scoring_blocks, summarize_blocks, wasserstein2
    from models.pairs import PairSampler
    from models.couplings import make_coupling
    from models.paths import GaussianPath
    from models.training import optimizer_step, scheduled_lr
    from tasks.config_loading import load_config

    torch.set_num_threads(threads)
    cfg = load_config(resolve_config("flow-matching", config), scale=scale, overrides=overrides)
    stages["imports"] = time.perf_counter() - t_start

    t = time.perf_counter()
    splits = load_dataset(DatasetSpec(**cfg.data.model_dump(), seed=cfg.seed))
    source_cfg = cfg.source.as_data()
    source = load_dataset(DatasetSpec(**source_cfg.model_dump(), seed=cfg.seed + 1)) if source_cfg else None
    stages["data"] = time.perf_counter() - t

    t = time.perf_counter()
    weights = None
    if splits.kind == "images":
        from models.features import save_classifier, train_feature_extractor

        extractor, info = train_feature_extractor(splits, seed=cfg.seed, epochs=cfg.evaluate.feature_epochs)
        weights = workdir / "features.safetensors"
        save_classifier(extractor, weights, meta=info)
    stages["features"] = time.perf_counter() - t

    # Training: tasks/train.py's loop; the global batch is the world=2 ranks' batches concatenated.
    t = time.perf_counter()
    torch.set_num_threads(train_threads)
    world = cfg.train.num_workers or 1
    spec = cfg.model_spec(tuple(splits.train.shape[1:]))
    torch.manual_seed(cfg.seed)
    model = spec.build()
    ema = EMA(model, decay=cfg.train.ema_decay)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    path = GaussianPath(model.scheduler)
    data = torch.from_numpy(splits.train)
    src = torch.from_numpy(source.train) if source else None
    local = max(1, cfg.train.batch_size // world)
    streams = [PairSampler(data, local, source=src, seed=cfg.seed, rank=r,
                           coupling=make_coupling(cfg.coupling.kind, **cfg.coupling.kwargs)).stream(0, cfg.train.steps)
               for r in range(world)]
    model.train()
    losses = []
    for batches in zip(*streams):
        step = batches[0].step
        x0, x1, tt = (torch.cat([getattr(b, k) for b in batches]) for k in ("x0", "x1", "t"))
        loss = flow_matching_loss(model, path, x0, x1, t=tt)
        lr = scheduled_lr(step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps, cfg.train.lr_schedule)
        losses.append(optimizer_step(loss, model, opt, ema, lr, cfg.train.grad_clip))
    stages["train"] = time.perf_counter() - t
    torch.set_num_threads(threads)

    # Sampling: the graph's grid, shards and seeds, with the sampling workers' own class, in this process.
    t = time.perf_counter()
    from models.checkpoint import save_model
    from models.sampling import Sampler, sample_count, sampling_grid, shards

    grid = sampling_grid(cfg.sample.samplers)
    save_model(ema.shadow, spec, workdir / "model")
    source_path = None
    if source:
        source_path = workdir / "source-test.npy"
        np.save(source_path, source.test)
    sampler = Sampler(str(workdir / "model"), cfg.seed, source_path and str(source_path), threads=threads)
    samples = {}
    for setting in grid:
        total = sample_count(setting, cfg.sample.n_samples, cfg.sample.sets)
        results = [sampler.run(setting, i, n, cfg.seed, cfg.sample.trajectories if i == 0 else 0)
                   for i, n in shards(total, cfg.sample.shard_size)]
        samples[setting.label] = np.concatenate([r["x"] for r in results])
    stages["sample"] = time.perf_counter() - t

    # Evaluation: tasks/evaluate.py's protocol (same blocks, scores and summary), in this process.
    t = time.perf_counter()
    reference = reference_set(splits.test, splits.kind, cfg.evaluate.n_reference)
    blocks = scoring_blocks(splits.train, samples, cfg.sample.n_samples, cfg.sample.sets, cfg.seed)
    scores = {}
    for key, x in blocks.items():
        if splits.kind == "points":
            scores[key] = {"w2": wasserstein2(x, reference), "mmd": mmd_rbf(x[:2000], reference[:2000])}
        else:
            from models.features import fid_kid

            values = fid_kid(x, reference, weights_path=weights, reference_cache_name="bare",
                             cache_root=workdir / "fidelity-cache", kid_subset_size=cfg.evaluate.kid_subset_size)
            scores[key] = {"fid": values["fid"], "kid": values["kid"]}
    metrics = summarize_blocks(scores)
    stages["evaluate"] = time.perf_counter() - t
    stages["total_in_process"] = time.perf_counter() - t_start
    out.write_text(json.dumps({"stages": stages, "metrics": metrics, "steps": len(losses),
                               "final_loss": float(np.mean(losses[-50:]))}))


# ----------------------------------------------------------------------------- driver


def _clean_env(ws: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PREFECT_HOME", "GENDAG_DVC_REMOTE")}
    env.update(GENDAG_HOME=str(ws), PYTHONHASHSEED="0")
    return env


def run_bare(config: str, scale: str, overrides: list[str], threads: int, train_threads: int) -> dict:
    ws = Path(tempfile.mkdtemp(prefix="gendag-bare-"))
    out = ws / "bare.json"
    cmd = [sys.executable, __file__, "--bare", "--config", config, "--scale", scale, "--workdir", str(ws),
           "--bare-out", str(out), "--bare-threads", str(threads),
           "--bare-train-threads", str(train_threads)] + [a for o in overrides for a in ("--set", o)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=_clean_env(ws), cwd=ws)
    wall = time.perf_counter() - t
    res = json.loads(out.read_text())
    shutil.rmtree(ws, ignore_errors=True)
    return {"wall": wall, **res}


def _utc(s: str) -> float:
    return datetime.fromisoformat(s).replace(tzinfo=timezone.utc).timestamp()


def run_graph(config: str, scale: str, overrides: list[str], keep: bool) -> dict:
    ws = Path(tempfile.mkdtemp(prefix="gendag-graph-"))
    cmd = [str(GENDAG), "run", "flow-matching", "-c", config, "--scale", scale, "--out", str(ws / "runs" / "bench")]
    cmd += [a for o in overrides for a in ("--set", o)]
    launch = time.time()
    t = time.perf_counter()
    with open(ws / "log.txt", "w") as log:
        proc = subprocess.run(cmd, env=_clean_env(ws), cwd=ws, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    end = launch + wall
    if proc.returncode:
        raise SystemExit(f"graph failed ({proc.returncode}); log: {ws / 'log.txt'}")
    summary = json.loads((ws / "runs" / "bench" / "summary.json").read_text())
    db = sqlite3.connect(ws / ".gendag" / "prefect" / "prefect.db")
    flow = db.execute("select start_time, end_time from flow_run").fetchone()
    tasks = [(n.rsplit("-", 1)[0], _utc(a), _utc(b))
             for n, a, b in db.execute("select name, start_time, end_time from task_run order by start_time")]
    db.close()
    f0, f1 = _utc(flow[0]), _utc(flow[1])
    by = {}
    for name, a, b in tasks:
        by.setdefault(name, []).append((a, b))
    span = lambda name: sum(b - a for a, b in by.get(name, []))  # noqa: E731
    stages = {
        "start-up (imports, config, Prefect server, flow run)": f0 - launch,
        "data (version-dataset: DVC add/push)": span("version-dataset"),
        "features (feature-extractor)": span("feature-extractor"),
        "train (Ray Train)": span("train"),
        "sample (Ray actors)": span("sample"),
        "evaluate": span("evaluate"),
        "report (plots)": by["register"][0][0] - by["evaluate"][-1][1],
        "register (MLflow)": span("register"),
        "flow end + shutdown": end - by["register"][-1][1],
    }
    # Ray Train: steady step rate from the last two checkpoints -> loop time vs start-up/teardown.
    train_loop = None
    snap = next((ws / ".gendag" / "ray").glob("*/checkpoint_manager_snapshot.json"), None)
    if snap:
        results = json.loads(snap.read_text())["checkpoint_results"]
        if len(results) >= 2:
            (s0, d0), (s1, d1) = [(r["metrics"]["step"], r["checkpoint_dir_name"]) for r in results[-2:]]
            ts = [datetime.strptime(d.removeprefix("checkpoint_"), "%Y-%m-%d_%H-%M-%S.%f").timestamp() for d in (d0, d1)]
            per_step = (ts[1] - ts[0]) / (s1 - s0)
            train_loop = {"s_per_step": per_step, "steps": s1, "loop_estimate": per_step * s1}
    res = {"wall": wall, "stages": stages, "flow_run": f1 - f0, "train_loop": train_loop,
           "metrics": summary["metrics"], "workspace": str(ws)}
    if not keep:
        shutil.rmtree(ws, ignore_errors=True)
    return res


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="flow-matching/digits")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override for both runs")
    p.add_argument("--scale", default=None)
    p.add_argument("--pairs", type=int, default=1, help="(bare, graph) pairs to run (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the graph workspaces")
    p.add_argument("--bare-threads", type=int, default=2, help="torch threads of the bare loop (default 2)")
    p.add_argument("--bare-train-threads", type=int, default=2,
                   help="torch threads of the bare training loop (default 2: fastest for the digits config here)")
    p.add_argument("--bare", action="store_true", help=argparse_hidden())
    p.add_argument("--workdir", type=Path, help=argparse_hidden())
    p.add_argument("--bare-out", type=Path, help=argparse_hidden())
    args = p.parse_args()
    scale = args.scale or ("tiny" if args.quick else "cpu")
    if args.bare:
        bare(args.config, scale, args.overrides, args.workdir, args.bare_out, args.bare_threads,
             args.bare_train_threads)
        return

    print(f"machine before: {C.uptime()}")
    print(f"job: {args.config} --scale {scale} {' '.join('--set ' + o for o in args.overrides)}"
          f"   (bare loop: torch threads {args.bare_threads}, {args.bare_train_threads} in the training loop)")
    runs = []
    for k in range(args.pairs):
        order = ("bare", "graph") if k % 2 == 0 else ("graph", "bare")
        pair = {}
        for kind in order:
            pair[kind] = (run_bare(args.config, scale, args.overrides, args.bare_threads, args.bare_train_threads) if kind == "bare"
                          else run_graph(args.config, scale, args.overrides, args.keep))
            print(f"  {kind}: {pair[kind]['wall']:.1f} s   {C.uptime()}")
        pair["ratio"] = pair["graph"]["wall"] / pair["bare"]["wall"]
        runs.append(pair)
    ratios = [r["ratio"] for r in runs]
    g, b = runs[-1]["graph"], runs[-1]["bare"]
    rows = [[name, f"{sec:.1f}"] for name, sec in g["stages"].items()]
    C.print_table(f"graph: {g['wall']:.1f} s (last pair), by stage (Prefect task-run records)", ["stage", "s"], rows)
    if g["train_loop"]:
        tl = g["train_loop"]
        print(f"  train: loop ~{tl['loop_estimate']:.1f} s ({tl['s_per_step'] * 1e3:.1f} ms/step over the last checkpoint"
              f" interval) + Ray Train start-up/checkpoints/teardown ~{g['stages']['train (Ray Train)'] - tl['loop_estimate']:.1f} s")
    C.print_table(f"bare loop: {b['wall']:.1f} s (last pair), by stage", ["stage", "s"],
                  [[k, f"{v:.1f}"] for k, v in b["stages"].items()] +
                  [["process start + exit", f"{b['wall'] - b['stages']['total_in_process']:.1f}"]])
    if b["steps"]:
        print(f"  bare train: {b['stages']['train'] / b['steps'] * 1e3:.1f} ms/step (global batch, {args.bare_train_threads} thread(s))")
    bs = b["stages"]
    pairs_ = [("start-up", g["stages"]["start-up (imports, config, Prefect server, flow run)"],
               bs["imports"] + b["wall"] - bs["total_in_process"]),
              ("data", g["stages"]["data (version-dataset: DVC add/push)"], bs["data"]),
              ("features", g["stages"]["features (feature-extractor)"], bs["features"]),
              ("train", g["stages"]["train (Ray Train)"], bs["train"]),
              ("sample", g["stages"]["sample (Ray actors)"], bs["sample"]),
              ("evaluate", g["stages"]["evaluate"], bs["evaluate"]),
              ("report + register + shutdown", g["stages"]["report (plots)"] + g["stages"]["register (MLflow)"]
               + g["stages"]["flow end + shutdown"], 0.0)]
    C.print_table("side by side (last pair): where the graph's extra time goes", ["stage", "graph s", "bare s", "graph - bare s"],
                  [[n, f"{a:.1f}", f"{c:.1f}", f"{a - c:+.1f}"] for n, a, c in pairs_]
                  + [["total", f"{g['wall']:.1f}", f"{b['wall']:.1f}", f"{g['wall'] - b['wall']:+.1f}"]])
    shared = sorted(set(g["metrics"]) & set(b["metrics"]))
    C.print_table("same job? metrics of the graph vs the bare loop (not bit-identical: DDP vs one process)",
                  ["metric", "graph", "bare"], [[m, g["metrics"][m], b["metrics"][m]] for m in shared])
    summary = {
        "graph s": round(C.median([r["graph"]["wall"] for r in runs]), 1),
        "bare s": round(C.median([r["bare"]["wall"] for r in runs]), 1),
        "ratio graph/bare": round(C.median(ratios), 3),
        "overhead %": round(100 * (C.median(ratios) - 1), 1),
        "bare threads (train loop)": f"{args.bare_threads} ({args.bare_train_threads})",
        "bare >= 120 s": C.median([r["bare"]["wall"] for r in runs]) >= 120,
        "pass": C.median(ratios) <= 1.15 and C.median([r["bare"]["wall"] for r in runs]) >= 120,
    }
    C.finish(args, "b_orchestration_overhead", TARGET, summary, {"runs": runs, "config": args.config,
                                                                  "scale": scale, "overrides": args.overrides,
                                                                  "bare_threads": args.bare_threads,
                                                                  "bare_train_threads": args.bare_train_threads})


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
