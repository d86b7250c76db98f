"""Generate samples in parallel with Ray tasks, in fixed shards with their own seeds.

Each task runs a `models.sampling.Sampler` (one per worker process, kept for its next
shard); shard i always starts from the same draw (seeded by (seed, i)) and stochastic
samplers take their noise from that same generator, so the result does not depend on how
many workers there are or which worker ran which shard. A setting's file is named by its label, which carries the method and
every parameter that changes its output (`models.samplers.Setting`).
"""

from __future__ import annotations

import shutil
from contextlib import closing
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np
import ray
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.sampling import SamplerKey, sample_count, sample_shard, shards
from models.samplers import Setting
from tasks.config import RunConfig
from tasks.infra import NonFiniteError, Ref, file_digest, short_hash, store
from tasks.progress import note, progress_bar
from tasks.runtime import ensure_ray


SCHEME = "shards-v4"  # bump when the way shards are drawn changes: stored samples are keyed by it
DISTINCT_STARTS = "distinct-starts"  # a dataset source's starts: distinct rows within each sample set

# Ray ships the function by reference: workers import only models.sampling (torch), not Prefect.
# Tasks, not actors: a task's worker process lives on with torch imported and the model loaded
# (2 new actors took 2.3-2.6 s to answer, 2 tasks on live workers 4 ms).
shard_task = ray.remote(num_cpus=1)(sample_shard)


def sample_folder(cfg: RunConfig, model: Ref, keep_start: bool = False) -> Path:
    """Where the sample sets of a model live: keyed by the model and the sampling protocol."""
    n = cfg.sample
    start = ("with-starts",) if keep_start else ()
    if cfg.source_config.name != "gaussian":  # starts drawn without replacement (models.sampling.start_draw)
        start += (DISTINCT_STARTS,)
    return store() / "samples" / short_hash(SCHEME, model.hash, cfg.seed, n.n_samples, n.sets, n.shard_size, *start)


@task(name="sample", cache_policy=NO_CACHE)
def sample(cfg: RunConfig, model: Ref, source: Ref | None, grid: list[Setting], keep_start: bool = False) -> dict[str, Ref]:
    """Sample every grid setting with `cfg.sample.num_workers` Ray tasks at a time; one .npz per setting
    holding its sample sets one after another (see `sample_count`), and with `keep_start` the
    draw each sample started from (`x0`, row for row: what a coupling set is made of).

    Guarantees: a setting's file exists only once all its shards are finished and finite; a
    shard is kept on disk as soon as it is finished, so a rerun after a crash samples only the
    missing shards (and says how many it kept); a shard holding a NaN or an infinity stops
    sampling at once with a `NonFiniteError` naming the setting and the shard."""
    n, sets = cfg.sample.n_samples, cfg.sample.sets
    out_dir = sample_folder(cfg, model, keep_start)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {s.label: out_dir / f"{s.file_stem}.npz" for s in grid}
    plan = {s.label: shards(sample_count(s, n, sets), cfg.sample.shard_size) for s in grid}
    todo = {s.label: ShardFolder(files[s.label], len(plan[s.label])) for s in grid if not files[s.label].exists()}
    jobs = [(s, i, k) for s in grid if s.label in todo for i, k in plan[s.label] if i not in todo[s.label].finished]
    if jobs:
        _run_shards(cfg, model, source, jobs, todo, keep_start)
    for shard_folder in todo.values():
        shard_folder.assemble()
    return {s.label: Ref("samples", str(files[s.label]), file_digest(files[s.label]), model.hash) for s in grid}


def _run_shards(cfg: RunConfig, model: Ref, source: Ref | None, jobs: list, todo: dict[str, "ShardFolder"],
                keep_start: bool = False) -> None:
    """Run the missing shards as Ray tasks, `cfg.sample.num_workers` at a time, keeping each one on
    disk as it arrives."""
    ensure_ray()
    source_path = str(source.path / "test.npy") if source else None
    if source_path:
        rows = len(np.load(source_path, mmap_mode="r", allow_pickle=False))
        if rows < cfg.sample.n_samples:
            note(f"sample {cfg.name}: the source's test split holds {rows} rows, fewer than sample.n_samples = "
                 f"{cfg.sample.n_samples}: starts are drawn with replacement (set source.n_test, or a larger "
                 "source.test_path, for distinct starts)")
    key = SamplerKey(model.uri, model.hash, cfg.seed, source_path, source.hash if source else None, cfg.sample.device)
    size, traj = cfg.sample.shard_size, cfg.sample.trajectories
    calls = [(setting, shard, n, cfg.seed, traj if shard == 0 else 0, keep_start, shard * size, cfg.sample.n_samples)
             for setting, shard, n in jobs]
    kept = sum(len(f.finished) for f in todo.values())
    with progress_bar() as bar:
        if kept:
            note(f"sample {cfg.name}: {kept} shards kept from an interrupted run, {len(jobs)} to sample")
        shown = bar.add_task(f"sample {cfg.name}", total=len(jobs) + kept, completed=kept,
                             info=f"{cfg.sample.num_workers} Ray workers")
        with closing(run_shards(key, calls, cfg.sample.num_workers)) as results:
            for res in results:
                bad = int(np.size(res["x"]) - np.isfinite(res["x"]).sum())
                if bad:
                    raise NonFiniteError(f"sample {cfg.name}: {res['label']}, shard {res['shard']}: {bad} of "
                                         f"{np.size(res['x'])} values are not finite (model {model.uri})")
                todo[res["label"]].save(res)
                bar.advance(shown)


def run_shards(key: SamplerKey, calls: list[tuple], workers: int) -> Iterator[dict]:
    """`Sampler.run(*call)` for each of `calls` by the sampler `key` names
    (`models.sampling.sample_shard`), as Ray tasks, `workers` at a time (a GPU each on cuda);
    results as they finish. Closing it early (a failure, Ctrl-C) cancels the shards still running."""
    remote = shard_task.options(num_gpus=1 if key.device == "cuda" else 0)
    waiting = iter(calls)
    running = [remote.remote(key, *call) for call in islice(waiting, workers)]
    try:
        while running:
            done, running = ray.wait(running, num_returns=1)
            running += [remote.remote(key, *call) for call in islice(waiting, 1)]
            yield ray.get(done[0])
    finally:
        for ref in running:
            ray.cancel(ref)


class ShardFolder:
    """The finished shards of a setting whose file is not written yet: `<file stem>.shards/<i>.npz`,
    each written atomically, so a shard on disk is always a whole one. Once every shard is there
    they are assembled, in order, into the setting's file (atomically), and the folder goes.
    A shard holds `x`, `nfe` (network evaluations per sample) and `rounds` (sequential network
    calls); the setting's file holds `x` concatenated and `nfe`, `rounds` one per shard. A shard or
    file from before rounds were stored has none: each call was one evaluation, rounds == nfe.
    An ODE sampler's shard also holds `energy`, the path energy of each sample (one row each)."""

    def __init__(self, file: Path, count: int) -> None:
        self.file, self.count = file, count
        self.folder = file.with_name(file.name.removesuffix(".npz") + ".shards")
        self.finished = {int(p.stem) for p in self.folder.glob("*.npz") if p.stem.isdigit()}  # not *.partial.npz

    def save(self, result: dict) -> None:
        arrays = {"x": result["x"], "nfe": np.int64(result["nfe"]), "rounds": np.int64(result["rounds"])}
        for key in ("trajectory", "x0", "energy"):
            if result.get(key) is not None:
                arrays[key] = result[key]
        self.folder.mkdir(exist_ok=True)
        write_npz(self.folder / f"{result['shard']}.npz", arrays)
        self.finished.add(result["shard"])

    def assemble(self) -> None:
        """Concatenate the shards in order into the setting's file; needs every shard."""
        missing = set(range(self.count)) - self.finished
        assert not missing, f"{self.file.name}: shards {sorted(missing)} are not finished"
        parts = []
        for i in range(self.count):
            with np.load(self.folder / f"{i}.npz", allow_pickle=False) as f:
                parts.append({k: f[k] for k in f.files})
        arrays = {"x": np.concatenate([p["x"] for p in parts]), "nfe": np.array([p["nfe"] for p in parts], dtype=np.int64),
                  "rounds": np.array([p.get("rounds", p["nfe"]) for p in parts], dtype=np.int64)}
        if "trajectory" in parts[0]:
            arrays["trajectory"] = parts[0]["trajectory"]
        for key in ("x0", "energy"):  # one row per sample (kept only when every shard has it)
            if all(key in p for p in parts):
                arrays[key] = np.concatenate([p[key] for p in parts])
        write_npz(self.file, arrays)
        shutil.rmtree(self.folder)


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `path` whole or not at all: into a `.partial.npz` next to it (removed if the write
    fails, e.g. on a full disk), then renamed into place."""
    partial = path.with_name(path.name + ".partial.npz")
    try:
        np.savez(partial, **arrays)
    except BaseException as e:
        partial.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file
            e.filename = str(path)
        raise
    partial.rename(path)
