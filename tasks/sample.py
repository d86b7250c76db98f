"""Generate samples in parallel with Ray actors, in fixed shards with their own seeds.

A sample set is cut into shards of `shard_size`; shard i always starts from the
same source draw (seeded by (seed, i)), so the result does not depend on how many
workers there are or which worker ran which shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.checkpoint import SPEC_FILE, ModelSpec, load_model
from models.solvers import solve_ode
from tasks.config import RunConfig
from tasks.infra import Ref, file_digest, short_hash, store
from tasks.progress import progress_bar
from tasks.runtime import ensure_ray


SCHEME = "shards-v2"  # bump when the way shards are drawn changes: stored samples are keyed by it


@dataclass(frozen=True)
class Setting:
    """One point of the sampling grid."""

    method: str
    nfe: int | None = None  # None for adaptive solvers
    atol: float = 1e-5
    rtol: float = 1e-5
    untrained: bool = False  # the same network at initialization: the baseline

    @property
    def label(self) -> str:
        base = f"nfe={self.nfe}" if self.nfe else "adaptive"
        return f"{base},untrained" if self.untrained else base


def sampling_grid(cfg: RunConfig) -> list[Setting]:
    grid = [
        Setting(s.method, n, s.atol, s.rtol) for s in cfg.sample.solvers for n in (s.nfe or [None])
    ]
    fixed = [s for s in grid if s.nfe]
    best = max(fixed, key=lambda s: s.nfe) if fixed else grid[0]
    return grid + [Setting(best.method, best.nfe, best.atol, best.rtol, untrained=True)]


def shard_seed(seed: int, shard: int) -> int:
    """Independent streams per shard (numpy's SeedSequence), not consecutive small seeds."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def source_draw(shape: tuple[int, ...], n: int, seed: int, source: np.ndarray | None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if source is None:
        return torch.randn((n, *shape), generator=g)
    return torch.from_numpy(source)[torch.randint(len(source), (n,), generator=g)]


class Sampler:
    """Holds one model in memory and integrates shards on request."""

    def __init__(self, model_dir: str, untrained_seed: int, source_path: str | None) -> None:
        torch.set_num_threads(1)
        self.model = load_model(Path(model_dir))
        spec = ModelSpec.from_json((Path(model_dir) / SPEC_FILE).read_text())
        torch.manual_seed(untrained_seed)  # the same initialization training started from
        self.untrained = spec.build().eval()
        self.shape = tuple(spec.data_shape)
        self.source = np.load(source_path, allow_pickle=False) if source_path else None

    def run(self, setting: Setting, shard: int, n: int, seed: int, trajectory: int = 0) -> dict:
        model = self.untrained if setting.untrained else self.model
        x0 = source_draw(self.shape, n, shard_seed(seed, shard), self.source)
        sol = solve_ode(
            model.velocity, x0, method=setting.method, nfe=setting.nfe,
            atol=setting.atol, rtol=setting.rtol, return_trajectory=trajectory > 0,
        )
        traj = sol.trajectory[:, :trajectory].numpy() if trajectory else None
        return {"label": setting.label, "shard": shard, "x": sol.x.numpy(), "nfe": sol.nfe, "trajectory": traj}


SamplerActor = ray.remote(num_cpus=1)(Sampler)


def _shards(n: int, size: int) -> list[tuple[int, int]]:
    return [(i, min(size, n - i * size)) for i in range((n + size - 1) // size)]


@task(name="sample", cache_policy=NO_CACHE)
def sample(cfg: RunConfig, model: Ref, source: Ref | None, grid: list[Setting]) -> dict[str, Ref]:
    """Sample every grid setting with `cfg.sample.num_workers` Ray actors; one .npz per setting."""
    key = short_hash(SCHEME, model.hash, cfg.seed, cfg.sample.n_samples, cfg.sample.shard_size)
    out_dir = store() / "samples" / key
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {s.label: out_dir / f"{s.method}-{s.label.replace(',', '-').replace('=', '')}.npz" for s in grid}
    todo = [s for s in grid if not files[s.label].exists()]
    if todo:
        ensure_ray()
        source_path = str(source.path / "test.npy") if source else None
        actors = [
            SamplerActor.remote(model.uri, cfg.seed, source_path) for _ in range(cfg.sample.num_workers)
        ]
        shards = _shards(cfg.sample.n_samples, cfg.sample.shard_size)
        jobs = [(s, i, n) for s in todo for i, n in shards]
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


def _save(shards: list[dict], path: Path) -> None:
    """Concatenate shards in order; write atomically so a crash leaves no half file."""
    arrays = {
        "x": np.concatenate([r["x"] for r in shards]),
        "nfe": np.array([r["nfe"] for r in shards], dtype=np.int64),
    }
    if shards[0]["trajectory"] is not None:
        arrays["trajectory"] = shards[0]["trajectory"]
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    partial.rename(path)
