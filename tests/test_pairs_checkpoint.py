"""Training batches are a function of the step; models round-trip through safetensors."""

import torch

from models.checkpoint import ModelSpec, load_model, save_model
from models.couplings import MinibatchOTCoupling
from models.pairs import PairSampler


def _sampler(**kw) -> PairSampler:
    data = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    return PairSampler(data, 32, seed=3, **kw)


def test_batches_depend_only_on_seed_rank_and_step() -> None:
    a = list(_sampler().stream(0, 6, prefetch=0))
    b = list(_sampler().stream(0, 6, prefetch=3))
    resumed = list(_sampler().stream(4, 6, prefetch=2))
    for x, y in zip(a, b):
        assert torch.equal(x.x0, y.x0) and torch.equal(x.x1, y.x1) and torch.equal(x.t, y.t)
    assert torch.equal(a[4].x1, resumed[0].x1) and torch.equal(a[5].t, resumed[1].t)
    other_rank = PairSampler(torch.randn(500, 2, generator=torch.Generator().manual_seed(0)), 32, seed=3, rank=1)
    assert not torch.equal(a[0].x1, other_rank.batch(0).x1)


def test_ot_coupled_batches_pair_nearby_points() -> None:
    plain = _sampler().batch(0)
    coupled = _sampler(coupling=MinibatchOTCoupling()).batch(0)
    cost = lambda b: (b.x0 - b.x1).pow(2).sum(1).mean()  # noqa: E731
    assert cost(coupled) < cost(plain)


def test_prefetch_surfaces_errors() -> None:
    sampler = _sampler()
    sampler.batch = lambda step: (_ for _ in ()).throw(RuntimeError("boom"))
    try:
        list(sampler.stream(0, 3, prefetch=2))
    except RuntimeError as e:
        assert "boom" in str(e)
    else:
        raise AssertionError("error was swallowed")


def test_model_round_trips_through_safetensors(tmp_path) -> None:
    torch.manual_seed(0)
    spec = ModelSpec("unet", (1, 8, 8), network_kwargs={"base_channels": 8, "groups": 4})
    model = spec.build()
    for p in model.parameters():
        p.data.normal_()
    save_model(model, spec, tmp_path)
    loaded = load_model(tmp_path)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    assert torch.equal(model(x, t), loaded(x, t))
    assert not any(p.suffix in (".pt", ".pkl") for p in tmp_path.iterdir())
