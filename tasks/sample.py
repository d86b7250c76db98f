"""Generate samples in parallel with Ray actors, in fixed shards with their own seeds.

Each actor is a `models.sampling.Sampler`; shard i always starts from the same
draw (seeded by (seed, i)) and stochastic samplers take their noise from that same
generator, so the result does not depend on how many workers there are or which worker
ran which shard. A setting's file is named by its label, which carries the method and
every parameter that changes its output (`models.samplers.Setting`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import ray
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.sampling import Sampler, sample_count, shards
from models.samplers import Setting
from tasks.config import RunConfig
from tasks.infra import Ref, file_digest, short_hash, store
from tasks.progress import progress_bar
from tasks.runtime import ensure_ray


SCHEME = "shards-v4"  # bump when the way shards are drawn changes: stored samples are keyed by it

# Ray ships the class by reference: workers import only models.sampling (torch), not Prefect.
SamplerActor = ray.remote(num_cpus=1)(Sampler)


def sample_folder(cfg: RunConfig, model: Ref) -> Path:
    """Where the sample sets of a model live: keyed by the model and the sampling protocol."""
    n = cfg.sample
    return store() / "samples" / short_hash(SCHEME, model.hash, cfg.seed, n.n_samples, n.sets, n.shard_size)


@task(name="sample", cache_policy=NO_CACHE)
def sample(cfg: RunConfig, model: Ref, source: Ref | None, grid: list[Setting]) -> dict[str, Ref]:
    """Sample every grid setting with `cfg.sample.num_workers` Ray actors; one .npz per setting
    holding its sample sets one after another (see `sample_count`)."""
    n, sets = cfg.sample.n_samples, cfg.sample.sets
    out_dir = sample_folder(cfg, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {s.label: out_dir / f"{s.file_stem}.npz" for s in grid}
    todo = [s for s in grid if not files[s.label].exists()]
    if todo:
        ensure_ray()
        source_path = str(source.path / "test.npy") if source else None
        gpus = 1 if cfg.sample.device == "cuda" else 0
        actors = [
            SamplerActor.options(num_gpus=gpus).remote(model.uri, cfg.seed, source_path, device=cfg.sample.device)
            for _ in range(cfg.sample.num_workers)
        ]
        jobs = [(s, i, k) for s in todo for i, k in shards(sample_count(s, n, sets), cfg.sample.shard_size)]
        pool = ray.util.ActorPool(actors)
        done: dict[str, list[dict]] = {s.label: [] for s in todo}
        traj = cfg.sample.trajectories
        with progress_bar() as bar:
            job = bar.add_task(f"sample {cfg.name}", total=len(jobs), info=f"{len(actors)} Ray workers")
            for res in pool.map_unordered(
                lambda a, j: a.run.remote(j[0], j[1], j[2], cfg.seed, traj if j[1] == 0 else 0), jobs
            ):
                done[res["label"]].append(res)
                bar.advance(job)
        for actor in actors:
            ray.kill(actor)
        for setting in todo:
            _save(sorted(done[setting.label], key=lambda r: r["shard"]), files[setting.label])
    return {s.label: Ref("samples", str(files[s.label]), file_digest(files[s.label]), model.hash) for s in grid}


def _save(results: list[dict], path: Path) -> None:
    """Concatenate shard results in order; write atomically so a crash leaves no half file."""
    arrays = {
        "x": np.concatenate([r["x"] for r in results]),
        "nfe": np.array([r["nfe"] for r in results], dtype=np.int64),
    }
    if results[0]["trajectory"] is not None:
        arrays["trajectory"] = results[0]["trajectory"]
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    partial.rename(path)
