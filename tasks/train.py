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


def run_name(cfg: RunConfig, data: Ref, source: Ref | None) -> str:
    relevant = cfg.model_dump(include={"seed", "path", "model", "coupling", "train"}, mode="json")
    relevant["train"].pop("checkpoint_every"), relevant["train"].pop("log_every")
    return f"{cfg.name}-{short_hash(json.dumps(relevant, sort_keys=True), data.hash, source.hash if source else '')}"


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
def train(cfg: RunConfig, data: Ref, source: Ref | None = None) -> Ref:
    """Train (or resume, or reuse) the model for this config and data; returns the model folder."""
    name = run_name(cfg, data, source)
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
            "progress": board.name,
        }
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=loop_config,
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=False),
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
