"""What each Ray Train worker runs: the DDP training loop with checkpoints, for any objective.

The loop knows no method: it builds the model from the config's `ModelSpec`, the
objective from its registry name (`models.objectives`), and runs DDP, resume, checkpoints
and progress. Kept apart from the Prefect task in `tasks/train.py` so that workers import
only torch, Ray and the models (not Prefect): they start faster.

A non-finite number never reaches a checkpoint: every step, all ranks agree whether some
rank's loss was NaN or infinite, and before each checkpoint they check the weights (equal on
every rank). Either stops every rank at the same step, without a checkpoint: the worker leaves
the reason on the progress board and returns (raising would make Ray Train retry a
deterministic failure), and the driver (`tasks/train.py`) reports it with the last good
checkpoint.

The driver can ask a fit to stop (Ctrl-C, `tasks.train.stop_training`): a file (`stop_file`)
every rank looks for at most every 0.25 s, agreeing through the same all-reduce. They write a checkpoint at that step
and return; the next run resumes there, bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from models.checkpoint import load_model, save_model, save_weights
from models.couplings import make_coupling
from models.ema import EMA
from models.objectives import make_objective, to_device
from models.pairs import PairSampler
from models.training import optimizer_step, scheduled_lr
from tasks.config_loading import validate
from tasks.progress import ProgressBoard

EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "state.json"


def _load_array(folder: str, split: str = "train") -> torch.Tensor:
    return torch.from_numpy(np.load(Path(folder) / f"{split}.npy", allow_pickle=False))


def train_worker(config: dict) -> None:
    """The per-worker loop run by Ray Train (also callable in-process with num_workers=0)."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = validate(config["run"], "run config", family=config.get("family"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    # the node's cores shared among the workers on it: one worker alone uses them all
    torch.set_num_threads(cfg.train.threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank

    if config.get("pairs"):  # a coupling set: row i of x0 is paired with row i of x1
        source, data = (_load_array(config["pairs"], end) for end in ("x0", "x1"))
    else:
        data = _load_array(config["data"])
        source = _load_array(config["source"]) if config.get("source") else None
    spec = cfg.model_spec(tuple(data.shape[1:]), config.get("family"))
    model = spec.build().to(device)
    inputs = {name: load_model(Path(folder)).to(device) for name, folder in config.get("inputs", {}).items()}
    init = inputs.pop("init", None)
    if init is not None:  # start from another model's weights (reflow, distillation students)
        model.load_state_dict(init.state_dict())
    objective = make_objective(config.get("objective") or cfg.objective, model, inputs, **config.get("options", {}))
    if init is None:  # data-dependent initialization (ActNorm) from the same rows on every rank; a
        # resumed run then loads its checkpoint over it
        rows = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.train.batch_size]
        objective.data_init(data[rows].to(device))
    ema = EMA(model, decay=cfg.train.ema_decay)
    # foreach: one kernel per update over every tensor (PyTorch's default only on GPUs); the same
    # numbers as the per-tensor loop, a step's update ~15% quicker on the CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=True)
    state = {"step": 0, "losses": [], "resumed_from": []}
    placement = _placement(rank, world)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            model.load_state_dict(load_file(str(Path(d) / "model.safetensors"), device=str(device)))
            ema.shadow.load_state_dict(load_file(str(Path(d) / EMA_FILE), device=str(device)))
            for name, module in objective.modules().items():
                module.load_state_dict(load_file(str(Path(d) / f"{name}.safetensors"), device=str(device)))
            optimizer.load_state_dict(torch.load(Path(d) / OPTIMIZER_FILE, weights_only=True, map_location=device))
            state = json.loads((Path(d) / STATE_FILE).read_text())
        ema.num_updates = state["step"]  # one EMA update per step: restores the warm-up schedule
        state["resumed_from"] = state.get("resumed_from", []) + [state["step"]]
    state["workers"] = placement  # where this attempt runs (a resumed run may run elsewhere)

    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if world > 1 else model
    local_batch = max(1, cfg.train.batch_size // world)
    coupling = getattr(cfg, "coupling", None)
    pairs = PairSampler(
        data, local_batch, source=source, seed=cfg.seed, rank=rank, paired=bool(config.get("pairs")),
        noise=getattr(getattr(model, "scheduler", None), "noisy", False),
        coupling=make_coupling(coupling.kind, **coupling.kwargs) if coupling and not config.get("pairs") else None,
    )
    board = ProgressBoard.find(config.get("progress"))
    asked_to_stop = StopRequest(config.get("stop_file"))
    running, t_start, start = [], time.perf_counter(), state["step"]
    model.train()
    for batch in pairs.stream(state["step"], cfg.train.steps):
        step = batch.step + 1
        loss = objective.loss(ddp_model, to_device(batch, device))
        lr = scheduled_lr(batch.step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps, cfg.train.lr_schedule)
        running.append(optimizer_step(loss, model, optimizer, ema, lr, cfg.train.grad_clip))
        objective.after_step()
        checkpoint_due = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
        stop, reason = _should_stop(running[-1], step, rank, world, model, checkpoint_due, asked_to_stop())
        if stop == "non-finite":
            if reason and board:
                ray.get(board.halt.remote(reason), timeout=30)
            return
        interrupted = stop == "interrupted"  # finite: log and checkpoint this step, the rerun resumes here
        checkpoint_due |= interrupted
        if step % cfg.train.log_every == 0 or step == cfg.train.steps or interrupted:
            state["losses"].append([step, float(np.mean(running))])
            running = []
            if rank == 0 and board:
                rate = (step - start) / (time.perf_counter() - t_start)
                board.update.remote(step, cfg.train.steps, state["losses"][-1][1], rate)
        if checkpoint_due:
            state["step"] = step
            _report(step, state, model, ema, optimizer, spec, rank, objective.modules())
        if interrupted:
            return
    if checkpoint and start == cfg.train.steps:  # the last checkpoint was written, the model not yet
        # kept (e.g. killed in between): report it again so that the kept state records the resume
        _report(start, state, model, ema, optimizer, spec, rank, objective.modules())


def _placement(rank: int, world: int) -> list[dict[str, str]]:
    """Where every rank runs, in rank order: its Ray node and that node's address (gathered from
    every rank; on a cluster the workers of one run can land on different nodes)."""
    import ray

    mine = {"node": ray.get_runtime_context().get_node_id(), "address": ray.util.get_node_ip_address()}
    if world == 1:
        return [mine]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    return everyone


class StopRequest:
    """Whether the driver asked this fit to stop (its `stop_file` exists), looked up at most every
    `every` seconds: on a cluster's shared storage one lookup can cost a millisecond, a step of a
    small network a few."""

    def __init__(self, path: str | None, every: float = 0.25):
        self.path, self.every, self.last, self.seen = path, every, float("-inf"), False

    def __call__(self) -> bool:
        now = time.monotonic()
        if self.path and not self.seen and now - self.last >= self.every:
            self.last, self.seen = now, os.path.exists(self.path)
        return self.seen


def _should_stop(loss: float, step: int, rank: int, world: int, model: torch.nn.Module, checkpoint_due: bool,
                 asked: bool) -> tuple[str, str]:
    """(stop, why), `stop` the same on every rank: "" (go on), "non-finite" or "interrupted".
    Training stops when any rank's loss is not finite (one all-reduce of the flags), or, before
    a checkpoint (one is due, or the stop asks for one), when the weights are not (they are
    equal on every rank); or, with finite numbers, when some rank was `asked` to stop. `why` is
    empty on a rank that only learnt it from another one."""
    why = "" if np.isfinite(loss) else f"the training loss is {loss} at step {step} (rank {rank})"
    flags = torch.tensor([float(bool(why)), float(asked)])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    if flags[0].item():
        return "non-finite", why
    interrupted = bool(flags[1].item())
    if (checkpoint_due or interrupted) and not all(torch.isfinite(p).all() for p in model.parameters()):
        return "non-finite", f"the weights are not finite after step {step}" if rank == 0 else ""
    return ("interrupted" if interrupted else ""), ""


def _report(step, state, model, ema, optimizer, spec, rank, extra) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    import ray.train

    metrics = {"step": step, "loss": state["losses"][-1][1] if state["losses"] else float("nan")}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        save_model(model, spec, Path(d))
        save_weights(ema.shadow, Path(d) / EMA_FILE)
        for name, module in extra.items():
            save_weights(module, Path(d) / f"{name}.safetensors")
        torch.save(optimizer.state_dict(), Path(d) / OPTIMIZER_FILE)
        (Path(d) / STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
