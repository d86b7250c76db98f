"""One optimisation step and the learning-rate schedule, shared by every training loop."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from models.ema import EMA


LR_SCHEDULES = ("constant", "cosine")


def scheduled_lr(step: int, lr: float, warmup_steps: int, total_steps: int, schedule: str = "constant") -> float:
    """Learning rate at `step` (0-based): linear warm-up over `warmup_steps` (0: none), then
    `constant`, or `cosine` decay to 0 at `total_steps` (lower noise in the final weights)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid choices: {LR_SCHEDULES}")
    scale = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "cosine":
        scale *= 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    return lr * scale


def optimizer_step(
    loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, ema: EMA | None, lr: float,
    grad_clip: float | None,
) -> float:
    """Backpropagate `loss`, clip, step at `lr`, update the EMA; returns the loss value.

    `model` is the unwrapped module (its parameters are clipped and averaged); the loss may
    come from a wrapper of it, e.g. DistributedDataParallel, which syncs gradients in backward.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    if ema is not None:
        ema.update(model)
    return loss.item()
