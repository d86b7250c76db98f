"""Train with Ray Train: a `TorchTrainer` of N workers (gloo + DDP on CPU).

Checkpoints (safetensors weights + EMA, optimizer state, step, loss history) are
reported every `checkpoint_every` steps into Ray storage under a run name derived
from the config and data hashes; a rerun of the same run resumes from the latest
one. A finished run is copied to `<store>/models/<run>/` and never trained again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import RunConfig
from tasks.infra import Ref, folder_digest, short_hash, store
from tasks.progress import ProgressBoard, track_progress
from tasks.runtime import ensure_ray
from tasks.train_worker import EMA_FILE, STATE_FILE, train_worker


def run_name(cfg: RunConfig, data: Ref, source: Ref | None, inputs: dict[str, Ref] | None = None) -> str:
    """`<name>-<hash>` of everything that changes the weights: the objective and its config,
    the data and source versions, and every extra input (a teacher, a coupling set)."""
    extra = sorted((name, ref.hash) for name, ref in (inputs or {}).items())
    identity = json.dumps(cfg.training_identity(), sort_keys=True)
    return f"{cfg.name}-{short_hash(identity, data.hash, source.hash if source else '', *extra)}"


def finalize(checkpoint_dir: Path, folder: Path) -> None:
    """Keep the finished model: EMA weights as the model, plus the raw weights and losses."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copy(checkpoint_dir / "model.json", partial / "model.json")
    shutil.copy(checkpoint_dir / EMA_FILE, partial / "model.safetensors")
    shutil.copy(checkpoint_dir / "model.safetensors", partial / "raw.safetensors")
    shutil.copy(checkpoint_dir / STATE_FILE, partial / STATE_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: RunConfig, data: Ref, source: Ref | None = None, inputs: dict[str, Ref] | None = None) -> Ref:
    """Train (or resume, or reuse) the model for this config and data; returns the model folder.
    `inputs` are extra model folders the objective needs (e.g. `teacher`), by name."""
    name = run_name(cfg, data, source, inputs)
    folder = store() / "models" / name
    if not (folder / STATE_FILE).exists():
        ensure_ray()
        from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        board = ProgressBoard.create(name)
        loop_config = {
            "run": cfg.model_dump(mode="json"),
            "data": data.uri,
            "source": source.uri if source else None,
            "inputs": {key: ref.uri for key, ref in (inputs or {}).items()},
            "progress": board.name,
        }
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu),
            run_config=RayRunConfig(
                name=name,
                storage_path=str(store() / "ray"),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                failure_config=FailureConfig(max_failures=0),
            ),
        )
        with track_progress(board.actor, f"train {cfg.name}", cfg.train.steps):
            result = trainer.fit()
        if result.error:
            raise result.error
        with result.checkpoint.as_directory() as d:
            finalize(Path(d), folder)
    return Ref("model", str(folder), folder_digest(folder), cfg.digest())
