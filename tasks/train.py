"""Train with Ray Train: a `TorchTrainer` of N workers (gloo + DDP on CPU).

Checkpoints (safetensors weights + EMA, optimizer state, step, loss history) are
reported every `checkpoint_every` steps into Ray storage under a run name derived
from the config and data hashes; a rerun of the same run resumes from the latest
one. A finished run is copied to `<store>/models/<run>/` and never trained again.

Guarantees:
- a worker that dies (killed, out of memory, its node lost) costs a restart, not the run:
  Ray Train restarts the worker group from the latest checkpoint, up to `max_failures`
  times, and since batches are a function of (seed, rank, step) the model ends bit-identical
  to an uninterrupted run;
- only a model that trained all its steps is kept: a non-finite loss (or weights) stops
  training at once with a `NonFiniteError` naming the step and the last good checkpoint,
  and a failure that outlasts the retries is a one-line `RunError`;
- `stop_training()` (Ctrl-C, on a run or on a table's cells side by side) stops every fit of
  this process at its next step with a checkpoint there and refuses new ones: an `Interrupted`
  error each, and the same command resumes them.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import ray

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import RunConfig
from tasks.infra import Interrupted, NonFiniteError, Ref, RunError, claimed, first_line, folder_digest, short_hash, store
from tasks.progress import ProgressBoard, note, track_progress
from tasks.runtime import ensure_ray
from tasks.train_worker import EMA_FILE, STATE_FILE, train_worker

# Restarts of the worker group after a worker failure (each resumes from the latest checkpoint).
# A `train.max_failures` config key will set it per run once the schema has one.
MAX_FAILURES = 3
@functools.cache
def stop_file() -> Path:
    """This process's request to its fits to stop (`stop_training`): a file every worker looks
    for (`train_worker.StopRequest`), under the run storage so that workers on other nodes see it."""
    path = store() / "ray" / "stops" / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    atexit.register(path.unlink, missing_ok=True)
    return path


def stop_training() -> None:
    """Stop every fit of this process at its next step (each keeps a checkpoint there) and start
    no new one."""
    stop_file().parent.mkdir(parents=True, exist_ok=True)
    stop_file().touch()


def stopping() -> bool:
    return stop_file().exists()


def run_name(cfg: RunConfig, data: Ref, source: Ref | None, inputs: dict[str, Ref] | None = None,
             pairs: Ref | None = None, objective: dict | None = None) -> str:
    """`<name>-<hash>` of everything that changes the weights: the objective and its config,
    the data and source versions (or the coupling set trained on), and every extra input (a
    teacher, the weights a stage starts from)."""
    extra = sorted((name, ref.hash) for name, ref in (inputs or {}).items())
    identity = {**cfg.training_identity(), **(objective or {})}
    ends = ("pairs", pairs.hash) if pairs else (data.hash, source.hash if source else "")
    return f"{cfg.name}-{short_hash(json.dumps(identity, sort_keys=True), *ends, *extra)}"


def finalize(checkpoint_dir: Path, folder: Path, seconds: float | None = None) -> None:
    """Keep the finished model: EMA weights as the model, plus the raw weights and losses, and
    the fit's wall time (`train_seconds` in its state: what training it cost, read again when a
    later run reuses the model)."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copy(checkpoint_dir / "model.json", partial / "model.json")
    shutil.copy(checkpoint_dir / EMA_FILE, partial / "model.safetensors")
    shutil.copy(checkpoint_dir / "model.safetensors", partial / "raw.safetensors")
    state = json.loads((checkpoint_dir / STATE_FILE).read_text())
    (partial / STATE_FILE).write_text(json.dumps({**state, "train_seconds": seconds}))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


@task(name="train", cache_policy=NO_CACHE)
def train(cfg: RunConfig, data: Ref, source: Ref | None = None, inputs: dict[str, Ref] | None = None,
          pairs: Ref | None = None, objective: str | None = None, options: dict | None = None,
          family: str | None = None) -> Ref:
    """Train (or resume, or reuse) the model for this config and data; returns the model folder.
    `inputs` are extra model folders by name: those the objective needs (e.g. `teacher`) and
    `init`, whose weights training starts from. With `pairs` (a coupling set) batches draw its
    paired rows instead of independent data and source rows. `objective` replaces the config's
    objective, `options` are the objective's options, and `family` is the kind of model trained
    around the config's network (a stage of a multi-stage graph, e.g. a consistency model)."""
    family = family or cfg.family
    chosen = ({"objective": objective or cfg.objective, "objective_options": options or {}, "family": family}
              if objective or options else None)
    name = run_name(cfg, data, source, inputs, pairs, chosen)
    folder = store() / "models" / name
    with claimed(str(folder)):
        if (folder / STATE_FILE).exists():
            note(f"train {cfg.name}: reused the finished model {name}")
        else:
            if stopping():
                raise Interrupted(f"train {cfg.name}: interrupted before it began")
            ensure_ray()
            from ray.train import CheckpointConfig, FailureConfig, RunConfig as RayRunConfig, ScalingConfig, TrainingFailedError
            from ray.train.torch import TorchConfig, TorchTrainer

            board = ProgressBoard.create(name)
            max_failures = getattr(cfg.train, "max_failures", MAX_FAILURES)
            loop_config = {
                "run": cfg.model_dump(mode="json"),
                "data": data.uri,
                "source": source.uri if source else None,
                "inputs": {key: ref.uri for key, ref in (inputs or {}).items()},
                "pairs": pairs.uri if pairs else None,
                "objective": objective,
                "options": options or {},
                "family": family,
                "progress": board.name,
                "stop_file": str(stop_file()),
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
                    failure_config=FailureConfig(max_failures=max_failures),
                ),
            )
            with track_progress(board.actor, f"train {cfg.name}", cfg.train.steps):
                began = time.perf_counter()
                try:
                    result = _fit(trainer)
                except TrainingFailedError as e:
                    raise RunError(f"train {cfg.name}: {_first_failure(e)} (after {max_failures} restarts)") from e
                halted = ray.get(board.actor.halted.remote())
            checkpoint = result.checkpoint
            with checkpoint.as_directory() if checkpoint else nullcontext() as d:
                step = json.loads((Path(d) / STATE_FILE).read_text())["step"] if d else 0
                last = f"step {step} ({checkpoint.path})" if checkpoint else "none (no checkpoint was written yet)"
                if halted:
                    raise NonFiniteError(f"train {cfg.name}: {halted}; training stopped; last good checkpoint: {last}")
                if step != cfg.train.steps and stopping():
                    raise Interrupted(f"train {cfg.name}: interrupted at step {step} of {cfg.train.steps}; "
                                      f"checkpoint kept: {last} (the same command resumes)")
                if step != cfg.train.steps:
                    raise RunError(f"train {cfg.name}: the workers stopped at step {step} of {cfg.train.steps}; "
                                   f"last good checkpoint: {last}")
                finalize(Path(d), folder, round(time.perf_counter() - began, 1))
    return Ref("model", str(folder), folder_digest(folder), cfg.digest())


def _fit(trainer):
    """`trainer.fit()` in a helper thread, so that Ctrl-C reaches this one: it asks the workers to
    stop at their next step (`stop_training`: each keeps a checkpoint there) and waits for them.
    A fit in the main thread would get Ray Train's own SIGINT handler instead, which aborts the
    workers where they are and exits the process."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fit") as pool:
        fit = pool.submit(contextvars.copy_context().run, trainer.fit)
        try:
            return fit.result()
        except KeyboardInterrupt:
            note("interrupted: the training stops at its next step and keeps a checkpoint there")
            stop_training()
            return fit.result()


def train_seconds(model: Ref) -> float | None:
    """The wall time the model's fit took when it was trained (None: not recorded, e.g. a model
    finished before this was kept)."""
    state = Path(model.uri) / STATE_FILE
    return json.loads(state.read_text()).get("train_seconds") if state.exists() else None


def _first_failure(error) -> str:
    """One line for a Ray Train failure: the first failed worker's error (or the controller's)."""
    failures = getattr(error, "worker_failures", None) or {}
    rank, cause = min(failures.items(), key=lambda item: item[0]) if failures else ("controller", error)
    return f"worker {rank}: {first_line(cause)}"
