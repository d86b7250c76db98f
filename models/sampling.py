"""Sampling in fixed shards: what one sampling worker does, in plain PyTorch.

A sample set is cut into shards; shard i always starts from the same source draw
(seeded by (seed, i)), so a sample set does not depend on how many workers made it
or which worker ran which shard. Orchestration (Ray actors, files) lives in
`tasks/sample.py`; this module is kept light so that workers start quickly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import SPEC_FILE, ModelSpec, load_model
from models.solvers import solve_ode


@dataclass(frozen=True)
class Setting:
    """One point of the sampling grid."""

    method: str
    nfe: int | None = None  # None for adaptive solvers
    atol: float = 1e-5
    rtol: float = 1e-5
    untrained: bool = False  # the same network at initialization: the baseline

    @property
    def label(self) -> str:
        base = f"nfe={self.nfe}" if self.nfe else "adaptive"
        return f"{base},untrained" if self.untrained else base


def sampling_grid(solvers) -> list[Setting]:
    """Every (method, NFE) of `solvers` (items with method, nfe list or None, atol, rtol), plus the
    untrained baseline at the largest fixed NFE: what a score is read against."""
    grid = [Setting(s.method, n, s.atol, s.rtol) for s in solvers for n in (s.nfe or [None])]
    fixed = [s for s in grid if s.nfe]
    best = max(fixed, key=lambda s: s.nfe) if fixed else grid[0]
    return grid + [Setting(best.method, best.nfe, best.atol, best.rtol, untrained=True)]


# The untrained baseline's gap to a trained model dwarfs any spread between sample sets, and it
# costs as much to sample as the largest fixed NFE: one set of it is enough.
BASELINE_SETS = 1


def sample_count(setting: Setting, n_samples: int, sets: int) -> int:
    """Samples drawn at a setting: `sets` sets of `n_samples` (BASELINE_SETS for the baseline)."""
    return n_samples * (BASELINE_SETS if setting.untrained else sets)


def shard_seed(seed: int, shard: int) -> int:
    """Independent streams per shard (numpy's SeedSequence), not consecutive small seeds."""
    return int(np.random.SeedSequence([seed, shard]).generate_state(1)[0])


def shards(n: int, size: int) -> list[tuple[int, int]]:
    """(shard index, shard size) covering n samples in shards of at most `size`."""
    return [(i, min(size, n - i * size)) for i in range((n + size - 1) // size)]


def source_draw(shape: tuple[int, ...], n: int, seed: int, source: np.ndarray | None) -> torch.Tensor:
    """n starting points: N(0, I) of `shape`, or rows of a source dataset drawn with replacement."""
    g = torch.Generator().manual_seed(seed)
    if source is None:
        return torch.randn((n, *shape), generator=g)
    return torch.from_numpy(source)[torch.randint(len(source), (n,), generator=g)]


class Sampler:
    """Holds one model (and its untrained twin, the baseline) in memory and integrates shards."""

    def __init__(self, model_dir: str, untrained_seed: int, source_path: str | None, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.model = load_model(Path(model_dir))
        spec = ModelSpec.from_json((Path(model_dir) / SPEC_FILE).read_text())
        torch.manual_seed(untrained_seed)  # the same initialization training started from
        self.untrained = spec.build().eval()
        self.shape = tuple(spec.data_shape)
        self.source = np.load(source_path, allow_pickle=False) if source_path else None

    def run(self, setting: Setting, shard: int, n: int, seed: int, trajectory: int = 0) -> dict:
        model = self.untrained if setting.untrained else self.model
        x0 = source_draw(self.shape, n, shard_seed(seed, shard), self.source)
        sol = solve_ode(
            model.velocity, x0, method=setting.method, nfe=setting.nfe,
            atol=setting.atol, rtol=setting.rtol, return_trajectory=trajectory > 0,
        )
        traj = sol.trajectory[:, :trajectory].numpy() if trajectory else None
        return {"label": setting.label, "shard": shard, "x": sol.x.numpy(), "nfe": sol.nfe, "trajectory": traj}
