"""Train with Ray Train: a `TorchTrainer` of N workers (gloo + DDP on CPU).

Checkpoints (safetensors weights + EMA, optimizer state, step, loss history) are
reported every `checkpoint_every` steps into Ray storage under a run name derived
from the config and data hashes; a rerun of the same run resumes from the latest
one. A finished run is copied to `<store>/models/<run>/` and never trained again.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file

from models.checkpoint import ModelSpec, save_model, save_weights
from models.couplings import make_coupling
from models.ema import EMA
from models.losses import flow_matching_loss
from models.paths import GaussianPath
from models.pairs import PairSampler
from tasks.config import RunConfig
from tasks.infra import Ref, folder_digest, short_hash, store
from tasks.progress import ProgressBoard, track_progress
from tasks.runtime import ensure_ray

EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


def model_spec(cfg: RunConfig, data_shape: tuple[int, ...]) -> ModelSpec:
    return ModelSpec(
        network=cfg.model.network,
        data_shape=tuple(data_shape),
        parameterization=cfg.model.parameterization,
        scheduler=cfg.path.scheduler,
        network_kwargs=dict(cfg.model.kwargs),
        scheduler_kwargs=dict(cfg.path.kwargs),
    )


def _load_array(folder: str, split: str = "train") -> torch.Tensor:
    return torch.from_numpy(np.load(Path(folder) / f"{split}.npy", allow_pickle=False))


def _lr_at(step: int, cfg: RunConfig) -> float:
    warm = cfg.train.warmup_steps
    return cfg.train.lr * min(1.0, (step + 1) / warm) if warm else cfg.train.lr


def train_worker(config: dict) -> None:
    """The per-worker loop run by Ray Train (also callable in-process with num_workers=0)."""
    import ray.train
    import ray.train.torch

    cfg = RunConfig.model_validate(config["run"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    data = _load_array(config["data"])
    source = _load_array(config["source"]) if config.get("source") else None
    spec = model_spec(cfg, tuple(data.shape[1:]))
    model = spec.build()
    ema = EMA(model, decay=cfg.train.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    state = {"step": 0, "losses": [], "resumed_from": []}

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(str(Path(d) / "model.safetensors")))
            ema.shadow.load_state_dict(load_file(str(Path(d) / EMA_FILE)))
            optimizer.load_state_dict(torch.load(Path(d) / OPTIMIZER_FILE, weights_only=True))
            state = json.loads((Path(d) / STATE_FILE).read_text())
        ema.num_updates = state["step"]  # one EMA update per step: restores the warm-up schedule
        state["resumed_from"] = state.get("resumed_from", []) + [state["step"]]

    ddp_model = ray.train.torch.prepare_model(model) if world > 1 else model
    path = GaussianPath(model.scheduler)
    local_batch = max(1, cfg.train.batch_size // world)
    pairs = PairSampler(
        data, local_batch, source=source, seed=cfg.seed, rank=rank,
        coupling=make_coupling(cfg.coupling.kind, **cfg.coupling.kwargs),
    )
    board = ProgressBoard.find(config.get("progress"))
    running, t_start, start = [], time.perf_counter(), state["step"]
    model.train()
    for batch in pairs.stream(state["step"], cfg.train.steps):
        step = batch.step + 1
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(batch.step, cfg)
        loss = flow_matching_loss(ddp_model, path, batch.x0, batch.x1, t=batch.t, parameterization=model.parameterization)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        ema.update(model)
        running.append(loss.item())
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            state["losses"].append([step, float(np.mean(running))])
            running = []
            if rank == 0 and board:
                rate = (step - start) / (time.perf_counter() - t_start)
                board.update.remote(step, cfg.train.steps, state["losses"][-1][1], rate)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            state["step"] = step
            _report(step, state, model, ema, optimizer, spec, rank)


def _report(step, state, model, ema, optimizer, spec, rank) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    metrics = {"step": step, "loss": state["losses"][-1][1] if state["losses"] else float("nan")}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_model(model, spec, Path(d))
        save_weights(ema.shadow, Path(d) / EMA_FILE)
        torch.save(optimizer.state_dict(), Path(d) / OPTIMIZER_FILE)
        (Path(d) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


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
