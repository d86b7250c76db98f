"""The objective registry: what a training run minimises.

An ``Objective`` gets the model it trains (and any extra inputs the run was given, e.g. a
frozen teacher) and returns the loss on one batch. The Ray Train worker
(``tasks/train_worker.py``) knows nothing else about a method: it builds the model from its
spec, draws batches that hold what the objective ``needs``, calls ``loss`` through the
(possibly DDP-wrapped) network, and checkpoints the model, its EMA and the objective's own
``modules()`` (e.g. an EMA target network), restoring them on resume.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.losses import target_for
from models.paths import GaussianPath


class Objective(abc.ABC):
    """A training objective. Subclasses are registered with ``register_objective``."""

    name: ClassVar[str] = ""
    #: What each batch must hold: "data" (x1), "source" (x0: N(0, I) or a source dataset).
    needs: ClassVar[frozenset[str]] = frozenset({"data", "source"})
    #: Extra models the run must be given, by name (e.g. "teacher": a model folder). The input
    #: named "init" is not the objective's: the worker starts the model from its weights.
    inputs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, inputs: dict[str, nn.Module] | None = None, **options) -> None:
        """``inputs``: the models named by ``inputs``; ``options``: the objective's own keyword
        settings from the run config (a subclass names them in its signature)."""
        self.model = model
        if options:
            raise TypeError(f"objective {self.name!r} takes no option {sorted(options)[0]!r}")

    @abc.abstractmethod
    def loss(self, net: nn.Module, batch) -> Tensor:
        """Loss on ``batch`` (with ``x0``, ``x1``, ``t`` ~ U[0, 1)); ``net`` is the model or its
        DDP wrapper, called as ``net(x_t, t)`` for the raw output."""

    def modules(self) -> dict[str, nn.Module]:
        """Extra trained or tracked state to checkpoint beside the model (none by default)."""
        return {}

    def after_step(self) -> None:
        """Called after every optimizer step (e.g. to move an EMA target)."""

    def data_init(self, x1: Tensor) -> None:
        """Data-dependent initialization of the model from a batch of data ``x1`` (e.g. a
        normalizing flow's actnorm); nothing by default. Called once before training starts
        (not on resume), with the same rows on every worker, so every copy starts the same."""


OBJECTIVES: dict[str, type[Objective]] = {}


def register_objective(name: str):
    """Class decorator: add an objective to ``OBJECTIVES`` under ``name``."""
    def add(cls: type[Objective]) -> type[Objective]:
        cls.name = name
        OBJECTIVES[name] = cls
        return cls
    return add


def make_objective(name: str, model: nn.Module, inputs: dict[str, nn.Module] | None = None,
                   **options) -> Objective:
    import models.methods  # noqa: F401  (registers every method's objective)

    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; expected one of {', '.join(sorted(OBJECTIVES))}")
    missing = [k for k in OBJECTIVES[name].inputs if k not in (inputs or {})]
    if missing:
        raise ValueError(f"objective {name!r} needs the input {missing[0]!r} (a model folder)")
    return OBJECTIVES[name](model, inputs, **options)


class PathRegression(Objective):
    """Regress the conditional target of a Gaussian path at times drawn by ``times``.

    With ``x_t = alpha_t x1 + sigma_t x0`` the network output, in the model's
    parameterization, is fitted to what ``(x0, x1)`` imply (velocity, epsilon, x1, v or
    score): flow matching and the DDPM "simple" loss are both this, with different times.
    """

    def __init__(self, model: nn.Module, inputs: dict[str, nn.Module] | None = None, **options) -> None:
        super().__init__(model, inputs, **options)
        self.path = GaussianPath(model.scheduler)

    def times(self, u: Tensor) -> Tensor:
        """Training times from uniform draws ``u`` in [0, 1)."""
        return u

    def loss(self, net: nn.Module, batch) -> Tensor:
        sample = self.path.sample(batch.x0, batch.x1, self.times(batch.t), getattr(batch, "noise", None))
        target = target_for(self.model.parameterization, sample, self.path.scheduler)
        return F.mse_loss(net(sample.x_t, sample.t), target)


def to_device(batch, device: torch.device):
    """The batch's tensors moved to ``device`` (a no-op on the CPU)."""
    if device.type == "cpu":
        return batch
    return type(batch)(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(batch).items()})
