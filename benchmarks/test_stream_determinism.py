"""Batch k is identical however it is built: inline, one prefetch thread, or a pool of threads.

Kept next to the benchmark that relies on it (benchmarks/ot_coupling.py); run with
`.venv/bin/pytest -q benchmarks/test_stream_determinism.py`.
"""

import itertools

import pytest
import torch

from models.couplings import MinibatchOTCoupling
from models.pairs import PairSampler


def _sampler(**kw) -> PairSampler:
    g = torch.Generator().manual_seed(0)
    data, source = torch.randn(500, 2, generator=g), torch.randn(300, 2, generator=g) * 0.3
    return PairSampler(data, 64, source=source, coupling=MinibatchOTCoupling(), seed=3, **kw)


def _same(a, b) -> bool:
    return a.step == b.step and all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x0", "x1", "t"))


@pytest.mark.parametrize("prefetch,workers", [(2, 1), (4, 2), (1, 3), (8, 4)])
def test_ot_batches_identical_whichever_way_they_are_built(prefetch, workers) -> None:
    inline = list(_sampler().stream(0, 12, prefetch=0))
    built = list(_sampler().stream(0, 12, prefetch=prefetch, workers=workers))
    resumed = list(_sampler().stream(7, 12, prefetch=prefetch, workers=workers))
    assert [b.step for b in built] == list(range(12))
    assert all(_same(a, b) for a, b in zip(inline, built))
    assert all(_same(a, b) for a, b in zip(inline[7:], resumed))


def test_pool_surfaces_errors_and_stops_early() -> None:
    sampler = _sampler()
    real = sampler.batch
    sampler.batch = lambda step: real(step) if step < 3 else (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        list(sampler.stream(0, 6, prefetch=4, workers=2))
    stream = _sampler().stream(0, 10_000, prefetch=4, workers=2)
    assert [b.step for b in itertools.islice(stream, 3)] == [0, 1, 2]
    stream.close()  # abandons the rest without building 10,000 batches
