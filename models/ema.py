"""Exponential moving average of a model's weights, used for sampling.

Averaging the weights over the last ~1/(1-decay) steps smooths out SGD noise and
usually gives better samples than the raw weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class EMA:
    """Shadow copy of ``model`` whose parameters track ``decay * shadow + (1 - decay) * model``.

    With ``warmup`` the decay used at the ``n``-th update (``n`` = updates done before,
    starting at 0) is ``min(decay, (1 + n) / (10 + n))``: early on the shadow follows the
    model closely instead of staying anchored to the random initialisation.
    Buffers (e.g. normalisation statistics) are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must lie in [0, 1], got {decay}")
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        self._shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @property
    def shadow(self) -> nn.Module:
        """The averaged model, ready for sampling."""
        return self._shadow

    def current_decay(self) -> float:
        """Decay the next ``update`` will apply."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow one step towards ``model``."""
        decay = self.current_decay()
        params = dict(model.named_parameters())
        for name, p in self._shadow.named_parameters():
            p.lerp_(params[name].detach(), 1.0 - decay)
        buffers = dict(model.named_buffers())
        for name, b in self._shadow.named_buffers():
            b.copy_(buffers[name])
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model``."""
        model.load_state_dict(self._shadow.state_dict())

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": self._shadow.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.warmup = state["decay"], state["warmup"]
        self.num_updates = state["num_updates"]
        self._shadow.load_state_dict(state["shadow"])
