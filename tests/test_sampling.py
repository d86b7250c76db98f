"""models.sampling: shards, seeds and the grid that make sample sets independent of the worker count."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from models.checkpoint import ModelSpec, save_model
from models.samplers import Setting
from models.sampling import Sampler, SamplerKey, kept_sampler, sample_count, sample_shard, sampling_grid, shard_seed, shards
from models.training import optimizer_step, scheduled_lr


def test_shards_cover_the_set_exactly():
    assert shards(10, 4) == [(0, 4), (1, 4), (2, 2)]
    assert shards(8, 4) == [(0, 4), (1, 4)]
    assert sum(n for _, n in shards(1001, 125)) == 1001


def test_shard_seeds_are_distinct_and_stable():
    seeds = {shard_seed(0, i) for i in range(1000)}
    assert len(seeds) == 1000
    assert shard_seed(3, 7) == shard_seed(3, 7) != shard_seed(4, 7)


def test_grid_adds_the_untrained_baseline_at_the_largest_fixed_nfe():
    solvers = [SimpleNamespace(method="euler", nfe=[1, 100], params={}),
               SimpleNamespace(method="dopri5", nfe=None, params={"atol": 1e-4, "rtol": 1e-4})]
    grid = sampling_grid(solvers)
    assert [s.label for s in grid] == ["euler,nfe=1", "euler,nfe=100", "dopri5,atol=0.0001,rtol=0.0001",
                                       "euler,nfe=100,untrained"]
    assert grid[-1] == Setting("euler", 100, untrained=True)
    assert [sample_count(s, 500, 8) for s in grid] == [4000, 4000, 4000, 500]  # the baseline is one set


@pytest.fixture
def model_dir(tmp_path):
    torch.manual_seed(1)
    spec = ModelSpec("mlp", (2,), network_kwargs={"hidden": 16, "layers": 2})
    save_model(spec.build(), spec, tmp_path)
    return str(tmp_path)


@pytest.fixture
def ddpm_dir(tmp_path):
    torch.manual_seed(1)
    spec = ModelSpec("mlp", (2,), parameterization="epsilon", scheduler="ddpm", network_kwargs={"hidden": 16, "layers": 2},
                     scheduler_kwargs={"timesteps": 20, "beta_schedule": "cosine"})
    save_model(spec.build(), spec, tmp_path / "ddpm")
    return str(tmp_path / "ddpm")


@pytest.mark.parametrize("kind, setting", [
    ("flow", Setting("euler", 4)),
    ("ddpm", Setting("ancestral", 4, (("spacing", "trailing"), ("variance", "small")))),
    ("ddpm", Setting("ddim", 4, (("eta", 1.0), ("spacing", "trailing")))),
])
def test_a_shard_is_the_same_whatever_ran_before_it(kind, setting, model_dir, ddpm_dir):
    """Deterministic and stochastic samplers alike: a shard's samples depend on (seed, shard)
    only, not on the worker or what it sampled before (noise comes from the shard's generator)."""
    folder = model_dir if kind == "flow" else ddpm_dir
    a, b = Sampler(folder, 0, None), Sampler(folder, 0, None)
    first = a.run(setting, 1, 8, seed=5)["x"]
    b.run(setting, 0, 8, seed=5)
    b.run(Setting(setting.method, 4, setting.params, untrained=True), 3, 8, seed=5)
    np.testing.assert_array_equal(first, b.run(setting, 1, 8, seed=5)["x"])
    assert not np.array_equal(first, a.run(setting, 2, 8, seed=5)["x"])


def test_a_worker_keeps_its_sampler_for_the_same_model_only(model_dir, ddpm_dir):
    """A sampling task's shard is the shard a fresh Sampler makes; its worker reuses the Sampler
    it built while the model's hash is the same, and builds another when it is not."""
    kept_sampler.cache_clear()
    key = SamplerKey(model_dir, "hash-a", 0, None, None)
    setting = Setting("euler", 4)
    np.testing.assert_array_equal(sample_shard(key, setting, 1, 8, 5)["x"],
                                  Sampler(model_dir, 0, None).run(setting, 1, 8, seed=5)["x"])
    first = kept_sampler(key)
    assert kept_sampler(key) is first
    assert kept_sampler(key._replace(model_hash="hash-b")) is not first  # new weights in the folder
    other = sample_shard(SamplerKey(ddpm_dir, "hash-c", 0, None, None), Setting("ddim", 4), 1, 8, 5)["x"]
    assert not np.array_equal(other, sample_shard(key, setting, 1, 8, 5)["x"])


def test_untrained_baseline_is_the_initialisation_of_the_seed(model_dir, tmp_path):
    sampler = Sampler(model_dir, untrained_seed=1, source_path=None)
    trained, untrained = sampler.model.state_dict(), sampler.untrained.state_dict()
    assert all(torch.equal(trained[k], untrained[k]) for k in trained)  # the saved model was seed 1's init


def test_source_rows_are_drawn_from_the_source_file(model_dir, tmp_path):
    source = np.arange(20, dtype=np.float32).reshape(10, 2)
    np.save(tmp_path / "src.npy", source)
    out = Sampler(model_dir, 0, str(tmp_path / "src.npy")).run(Setting("euler", 1), 0, 6, seed=0, trajectory=2)
    start = out["trajectory"][0]  # (time points, samples kept, ...): the first time point
    assert len(start) == 2 and all(any(np.array_equal(row, s) for s in source) for row in start)


def test_warmup_lr_and_optimizer_step():
    assert scheduled_lr(0, 1.0, 4, 100) == 0.25 and scheduled_lr(3, 1.0, 4, 100) == 1.0
    assert scheduled_lr(0, 1.0, 0, 100) == 1.0 == scheduled_lr(99, 1.0, 0, 100)
    assert scheduled_lr(50, 1.0, 0, 100, "cosine") == pytest.approx(0.5)
    assert scheduled_lr(100, 1.0, 0, 100, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert scheduled_lr(0, 1.0, 10, 100, "cosine") == pytest.approx(0.1, rel=1e-3)
    with pytest.raises(ValueError, match="valid choices"):
        scheduled_lr(0, 1.0, 0, 10, "linear")
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=123.0)
    before = net.weight.detach().clone()
    loss = (net(torch.ones(1, 2)) ** 2).sum()
    value = optimizer_step(loss, net, opt, None, lr=0.1, grad_clip=1e-3)
    assert opt.param_groups[0]["lr"] == 0.1 and value == pytest.approx(loss.item())
    assert (net.weight - before).norm() <= 0.1 * 1e-3 + 1e-9  # clipped gradient, scaled by the step's lr
