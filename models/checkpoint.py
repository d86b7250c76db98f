"""Build a model from a plain spec, and store it as safetensors + JSON (never pickle).

A `ModelSpec` is everything needed to rebuild the network around stored weights,
so a registered model is loadable from its folder alone. Its `family` says what kind of
model it builds (`FAMILIES`): a `denoiser` (a network on a Gaussian path, for every
diffusion / flow-matching method) today; other families (normalizing flows) add a builder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from typing import Callable

from torch import nn

from models.networks import build_network
from models.parameterization import Denoiser
from models.paths import SCHEDULERS, make_scheduler

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"


@dataclass(frozen=True)
class ModelSpec:
    network: str
    data_shape: tuple[int, ...]
    parameterization: str = "velocity"
    scheduler: str = "cond_ot"
    network_kwargs: dict = field(default_factory=dict)
    scheduler_kwargs: dict = field(default_factory=dict)
    family: str = "denoiser"

    def build(self) -> nn.Module:
        import models.methods  # noqa: F401  (registers every method's model family)

        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {', '.join(FAMILIES)}")
        return FAMILIES[self.family].build(self)

    def provides(self) -> frozenset[str]:
        """What samplers and likelihoods may ask of the built model (without building it)."""
        import models.methods  # noqa: F401

        return FAMILIES[self.family].provides(self)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        raw = json.loads(text)
        raw["data_shape"] = tuple(raw["data_shape"])
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1)


@dataclass(frozen=True)
class Family:
    build: Callable[[ModelSpec], nn.Module]
    provides: Callable[[ModelSpec], frozenset[str]]


def _denoiser(spec: ModelSpec) -> Denoiser:
    net = build_network(spec.network, tuple(spec.data_shape), **spec.network_kwargs)
    return Denoiser(net, make_scheduler(spec.scheduler, **spec.scheduler_kwargs), spec.parameterization)


def _denoiser_provides(spec: ModelSpec) -> frozenset[str]:
    return Denoiser.provides | SCHEDULERS[spec.scheduler].provides


FAMILIES: dict[str, Family] = {"denoiser": Family(_denoiser, _denoiser_provides)}


def save_weights(module: torch.nn.Module, path: Path) -> None:
    """Write a state dict as safetensors (contiguous copies, so shared storage is fine)."""
    state = {k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def save_model(model: torch.nn.Module, spec: ModelSpec, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / WEIGHTS_FILE)
    (folder / SPEC_FILE).write_text(spec.to_json())
    return folder


def load_model(folder: Path) -> nn.Module:
    """Rebuild a model from a folder written by `save_model`, in eval mode."""
    folder = Path(folder)
    spec = ModelSpec.from_json((folder / SPEC_FILE).read_text())
    model = spec.build()
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    return model.eval()
