"""Sampling in fixed shards: what one sampling worker does, in plain PyTorch.

A sample set is cut into shards; shard i always starts from the same source draw
(seeded by (seed, i)), so a sample set does not depend on how many workers made it
or which worker ran which shard. Orchestration (Ray tasks, files) lives in
`tasks/sample.py`; this module is kept light so that workers start quickly.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from models.checkpoint import SPEC_FILE, ModelSpec, load_model
from models.samplers import Setting, sample_with, settings_for


def sampling_grid(samplers, baseline: bool = True) -> list[Setting]:
    """Every setting of `samplers` (items with `method`, `nfe` list and `params` dict), plus (with
    `baseline`) the untrained baseline at the largest fixed NFE: what a score is read against."""
    grid = [s for entry in samplers for s in settings_for(entry.method, entry.nfe, entry.params)]
    if not baseline:
        return grid
    fixed = [s for s in grid if s.nfe]
    best = max(fixed, key=lambda s: s.nfe) if fixed else grid[0]
    return grid + [replace(best, untrained=True)]


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


def start_draw(model, shape: tuple[int, ...], n: int, generator: torch.Generator,
               source: np.ndarray | None, first: int | None = None, set_size: int | None = None,
               seed: int = 0) -> torch.Tensor:
    """Where a shard starts: the model's prior draw, or rows of a source dataset.

    From a dataset, the shard's samples are numbers ``first .. first + n - 1`` of sample sets of
    ``set_size``: when a set fits in the source (``set_size <= len(source)``) every set's starts
    are distinct rows, a permutation of the source seeded by (seed, set), whichever shards the set
    is cut into; otherwise (or without ``first``) rows are drawn with replacement."""
    if source is None:
        return model.prior(shape, n, generator)
    if first is None or set_size is None or set_size > len(source):
        return torch.from_numpy(source)[torch.randint(len(source), (n,), generator=generator)]
    index = np.arange(first, first + n)
    rows = np.empty(n, dtype=np.int64)
    for k in np.unique(index // set_size):
        order = np.random.default_rng([seed, int(k)]).permutation(len(source))
        mine = index // set_size == k
        rows[mine] = order[index[mine] % set_size]
    return torch.from_numpy(source[rows])


class Sampler:
    """Holds one model (and its untrained twin, the baseline) in memory and samples shards.

    Shard i of a setting starts from a draw of the generator seeded by (seed, i), and
    stochastic samplers take their noise from the same generator: a shard's samples do not
    depend on the worker that makes them or on what it made before."""

    def __init__(self, model_dir: str, untrained_seed: int, source_path: str | None, threads: int = 1,
                 device: str = "cpu") -> None:
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.model = load_model(Path(model_dir)).to(self.device)
        spec = ModelSpec.from_json((Path(model_dir) / SPEC_FILE).read_text())
        torch.manual_seed(untrained_seed)  # the same initialization training started from
        self.untrained = spec.build().eval().to(self.device)
        self.shape = tuple(spec.data_shape)
        self.source = np.load(source_path, allow_pickle=False) if source_path else None

    def run(self, setting: Setting, shard: int, n: int, seed: int, trajectory: int = 0,
            keep_start: bool = False, first: int | None = None, set_size: int | None = None) -> dict:
        """Shard ``shard`` (``n`` samples, numbers ``first``.. of sets of ``set_size``: see
        ``start_draw``) of ``setting``; with ``keep_start`` its start draws too (``x0``: a coupling
        set's pairs are (x0, x))."""
        model = self.untrained if setting.untrained else self.model
        generator = torch.Generator().manual_seed(shard_seed(seed, shard))
        x = start_draw(model, self.shape, n, generator, self.source, first, set_size, seed).to(self.device)
        start = x.cpu().numpy() if keep_start else None
        out = sample_with(setting, model, x, generator, trajectory=trajectory > 0)
        traj = out.trajectory[:, :trajectory].cpu().numpy() if trajectory else None
        energy = out.energy.numpy() if out.energy is not None else None
        return {"label": setting.label, "shard": shard, "x": out.x.cpu().numpy(), "nfe": out.nfe, "rounds": out.rounds,
                "trajectory": traj, "x0": start, "energy": energy}


class SamplerKey(NamedTuple):
    """What a sampling worker builds its `Sampler` from, with the content hashes that say when a
    kept one is stale."""
    model_dir: str
    model_hash: str
    untrained_seed: int
    source_path: str | None
    source_hash: str | None
    device: str = "cpu"

    def build(self) -> Sampler:
        return Sampler(self.model_dir, self.untrained_seed, self.source_path, device=self.device)


@lru_cache(maxsize=1)
def kept_sampler(key: SamplerKey) -> Sampler:
    """The last CPU `Sampler` this process built, for its next shard of the same model: a Ray
    worker process outlives its tasks, so later shards (and later stages' sample sets of the same
    model) skip loading it. Keyed by the model's and the source's content hashes, so a folder
    holding other weights is loaded again."""
    return key.build()


def sample_shard(key: SamplerKey, setting: Setting, shard: int, n: int, seed: int, trajectory: int = 0,
                 keep_start: bool = False, first: int | None = None, set_size: int | None = None) -> dict:
    """One shard (`Sampler.run`) by the sampler `key` names: kept between calls on CPU
    (`kept_sampler`), built for the call on an accelerator (a model kept in an idle worker would
    hold its memory)."""
    worker = kept_sampler(key) if key.device == "cpu" else key.build()
    return worker.run(setting, shard, n, seed, trajectory, keep_start, first, set_size)
