"""The likelihood registry: test NLL estimators, one name each.

A likelihood function has the shape ``fn(model, x, generator, levels) -> nats`` (one value
per example, the negative log-likelihood or an upper bound on it) and declares what it needs
from the model (e.g. ``discrete_time`` for the DDPM bound). ``levels`` is the data's
quantization (17 grey levels for the digits, 256 for 8-bit images, None for continuous
points): an estimator of a discrete likelihood uses it, a continuous density dequantizes with
it. ``bits_per_dim`` turns nats per example into the unit image papers report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from torch import Tensor


@dataclass(frozen=True)
class LikelihoodSpec:
    name: str
    fn: Callable[..., Tensor]
    needs: frozenset[str]
    description: str = ""


LIKELIHOODS: dict[str, LikelihoodSpec] = {}


def register_likelihood(name: str, needs: set[str]):
    def add(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        LIKELIHOODS[name] = LikelihoodSpec(name, fn, frozenset(needs), doc[0] if doc else "")
        return fn
    return add


def get_likelihood(name: str) -> LikelihoodSpec:
    import models.methods  # noqa: F401  (registers every method's estimators)

    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; expected one of {', '.join(sorted(LIKELIHOODS))}")
    return LIKELIHOODS[name]


def bits_per_dim(nats: float, dims: int) -> float:
    """Nats per example -> bits per dimension."""
    return nats / (dims * math.log(2))


def estimate_nll(model_dir: str, name: str, x, levels: int | None, seed: int, batch_size: int = 250,
                 threads: int = 1) -> dict[str, float]:
    """Mean test NLL (nats per example) of the model in ``model_dir`` by the estimator ``name``
    over the rows of ``x`` (a numpy array), with its standard error over examples; a
    plain function so a Ray worker can run it without importing the orchestration."""
    from pathlib import Path

    import numpy as np
    import torch

    from models.checkpoint import load_model

    torch.set_num_threads(threads)
    model = load_model(Path(model_dir))
    fn = get_likelihood(name).fn
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.asarray(x, dtype=np.float32))
    with torch.no_grad():
        nats = torch.cat([fn(model, data[i:i + batch_size], generator=generator, levels=levels).double()
                          for i in range(0, len(data), batch_size)])
    return {"mean": float(nats.mean()), "se": float(nats.std() / len(nats) ** 0.5) if len(nats) > 1 else 0.0}
