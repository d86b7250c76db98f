"""Reflow coupling sets: pairs (z, x = ODE(z)) of a trained flow, made by Ray workers, versioned by DVC.

A coupling set is `data/couplings/<run>-<hash>/` holding `x0.npy` (the draws z), `x1.npy` (where
the flow's ODE takes them, row for row) and `manifest.json` (its lineage: the model's hash, the
solver setting, its NFE, the seed, the pair count), `dvc add`-ed and pushed like a dataset. Its
name hashes exactly those inputs, so asking again for the same model and settings reuses it.

The pairs are made by the sampling task's Ray tasks (`tasks/sample.py`) in shards with per-shard
seeds, so a set is the same for any number of workers. The draws use a seed of their own per
round, not the evaluation's, so no flow is scored from the draws it was trained on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import ray
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.sampling import shard_seed
from models.samplers import settings_for
from tasks.config import RunConfig
from tasks.data import publish, pulled_hash, tracked_hash
from tasks.infra import Ref, claimed, home, short_hash
from tasks.progress import note
from tasks.runtime import ensure_ray
from tasks.sample import sample

SCHEME = "couplings-v1"  # bump when what a coupling set holds changes


def coupling_seed(seed: int, round_: int) -> int:
    """The seed of round k's draws: its own stream, apart from the evaluation's (seed, shard) ones."""
    return shard_seed(seed, 1_000_000 + round_)


@task(name="couplings", cache_policy=NO_CACHE)
def generate_couplings(cfg: RunConfig, model: Ref, source: Ref | None, round_: int) -> Ref:
    """The coupling set of `model` for reflow round `round_` (settings from `cfg.reflow`)."""
    r = cfg.reflow
    setting = settings_for(r.solver.method, r.solver.nfe, r.solver.params)[0]
    seed = coupling_seed(cfg.seed, round_)
    folder = home() / "data" / "couplings" / (
        f"{cfg.name}-{short_hash(SCHEME, model.hash, setting.label, r.pairs, seed, r.shard_size)}")
    with claimed(str(folder)):
        digest = tracked_hash(folder) or pulled_hash(folder)
        if digest is not None:
            note(f"couplings {cfg.name} round {round_}: reused the coupling set {folder.name}")
            return Ref("couplings", str(folder), digest, model.hash)
        protocol = cfg.sample.model_copy(update={"n_samples": r.pairs, "sets": 1, "shard_size": r.shard_size,
                                                 "num_workers": r.num_workers, "trajectories": 0})
        maker = cfg.model_copy(update={"name": f"{cfg.name}-couplings-{round_}", "seed": seed, "sample": protocol})
        made = sample.fn(maker, model, source, [setting], keep_start=True)[setting.label]
        with np.load(made.path, allow_pickle=False) as f:
            x0, x1, nfe = f["x0"], f["x"], f["nfe"]
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        np.save(partial / "x0.npy", x0, allow_pickle=False)
        np.save(partial / "x1.npy", x1, allow_pickle=False)
        manifest = {"model": model.uri, "model_hash": model.hash, "solver": setting.label, "nfe": float(nfe.mean()),
                    "seed": seed, "round": round_, "pairs": int(len(x0)), "shard_size": r.shard_size}
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=1))
        made.path.unlink()  # the pairs live on in the coupling set
        return Ref("couplings", str(folder), publish(partial, folder), model.hash)


def coupling_manifest(pairs: Ref) -> dict:
    return json.loads((pairs.path / "manifest.json").read_text())


def _straightness(model_dir: str, source_path: str | None, points: int, steps: int, seed: int) -> float:
    import torch

    from models.checkpoint import SPEC_FILE, ModelSpec, load_model
    from models.rectified_flow import straightness
    from models.sampling import start_draw

    torch.set_num_threads(1)
    model = load_model(Path(model_dir))
    shape = tuple(ModelSpec.from_json((Path(model_dir) / SPEC_FILE).read_text()).data_shape)
    source = np.load(source_path, allow_pickle=False) if source_path else None
    return straightness(model, start_draw(model, shape, points, torch.Generator().manual_seed(seed), source), steps)[0]


@task(name="straightness", cache_policy=NO_CACHE)
def measure_straightness(cfg: RunConfig, model: Ref, source: Ref | None) -> float:
    """Straightness of a flow (`models.rectified_flow.straightness`) on `reflow.straightness_points`
    draws of its own (the prior, or the source's test rows), in a Ray task."""
    ensure_ray()
    r = cfg.reflow
    run = ray.remote(num_cpus=1)(_straightness)
    source_path = str(source.path / "test.npy") if source else None
    return ray.get(run.remote(model.uri, source_path, r.straightness_points, r.straightness_steps,
                              shard_seed(cfg.seed, 2_000_000)))
