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

import torch
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


def bin_width(levels: int) -> float:
    """delta = 2 / (levels - 1): the spacing of ``levels`` evenly spaced values in [-1, 1]."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"levels: got {levels!r}; expected an integer >= 2 (or None for continuous data)")
    return 2.0 / (levels - 1)


def dequantize(x: Tensor, levels: int | None, generator: torch.Generator | None) -> tuple[Tensor, float]:
    """Uniform dequantization of data quantized to ``levels`` values in [-1, 1] (bins of width
    delta = 2 / (levels - 1)): ``(x + u, D log delta)`` with u ~ U(-delta/2, delta/2)^D drawn
    from ``generator`` (torch's global RNG when None) in float64 whatever the data's dtype (so
    a float32 and a float64 run share u), then cast to x's.

    A continuous density p gives ``-log p(x + u) - D log delta`` nats: an upper bound on
    -log P(bin of x) in expectation over u (Jensen), comparable with discrete likelihoods.
    Continuous data (``levels`` None) come back as they are, with a correction of 0.
    """
    if levels is None:
        return x, 0.0
    delta = bin_width(levels)
    noise = torch.rand(x.shape, generator=generator, dtype=torch.float64).to(dtype=x.dtype, device=x.device)
    return x + (noise - 0.5) * delta, x[0].numel() * math.log(delta)


def bits_per_dim(nats: float, dims: int) -> float:
    """Nats per example -> bits per dimension."""
    return nats / (dims * math.log(2))


def nll_per_example(model_dir: str, name: str, x, levels: int | None, seed: int, batch_size: int = 250,
                    threads: int | None = 1):
    """Test NLL (nats) of each row of ``x`` (a numpy array) under the model in ``model_dir`` by
    the estimator ``name``, as a float64 numpy array; a plain function so a Ray worker (or a
    report's density map) can run it without importing the orchestration. ``threads``: torch's
    thread count for the process (None: leave it)."""
    from pathlib import Path

    import numpy as np

    from models.checkpoint import load_model

    if threads:
        torch.set_num_threads(threads)
    model = load_model(Path(model_dir))
    fn = get_likelihood(name).fn
    generator = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(np.asarray(x, dtype=np.float32))
    with torch.no_grad():
        nats = torch.cat([fn(model, data[i:i + batch_size], generator=generator, levels=levels).double()
                          for i in range(0, len(data), batch_size)])
    return nats.numpy()


def mean_and_se(values) -> dict[str, float]:
    """The mean of per-example values and its standard error over examples (0 for one)."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "se": float(values.std(ddof=1) / len(values) ** 0.5) if len(values) > 1 else 0.0}


def estimate_nll(model_dir: str, name: str, x, levels: int | None, seed: int, batch_size: int = 250,
                 threads: int = 1) -> dict:
    """Mean test NLL (nats per example) by ``nll_per_example``, with its standard error over
    examples, and the per-example values (``nats``, in the order of ``x``: for differences
    paired on the same examples)."""
    nats = nll_per_example(model_dir, name, x, levels, seed, batch_size, threads)
    return {**mean_and_se(nats), "nats": nats.tolist()}
