"""The options that express Tong et al. 2024's 2-D setup (issue 14's cfm-2d): the MLP's activation
and time input, the sigma paths, entropic-OT pairs drawn from the plan, an npy test file, starts
without replacement and the normalized path energy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.couplings import MinibatchOTCoupling
from models.data import DatasetError, DatasetSpec, load_dataset
from models.losses import target_for
from models.networks import MLP, build_network
from models.pairs import PairSampler
from models.parameterization import Denoiser
from models.paths import GaussianPath, make_scheduler
from models.samplers import sample_with, settings_for
from models.sampling import start_draw
from tasks.config import ConfigError
from tasks.config_loading import load_config
from tasks.config_sections import CondOTPath, DataConfig
from tasks.evaluate import energy_scores

CFM2D = "configs/flow-matching/cfm-2d"


# --------------------------------------------------------------------------- the network


def test_mlp_selu_with_time_concatenated():
    net = build_network("mlp", (2,), hidden=64, layers=4, activation="selu", time_input="concat")
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(3, 64), (64, 64), (64, 64), (64, 2)]
    assert sum(isinstance(m, nn.SELU) for m in net.modules()) == 3
    assert not any(isinstance(m, nn.SiLU) for m in net.modules())
    x = torch.randn(4, 2)
    # t is the third input of the first layer, nothing else
    w, b = linears[0].weight, linears[0].bias
    t = torch.full((4,), 0.3)
    first = torch.cat([x, t[:, None]], 1) @ w.T + b
    assert torch.allclose(net.trunk[0](torch.cat([x, t[:, None]], 1)), first)
    assert not torch.allclose(net(x, t), net(x, torch.full((4,), 0.7)))


def test_mlp_defaults_unchanged():
    net = MLP(2)
    assert net.time is not None and net.trunk[0].in_features == 2 + 64
    assert any(isinstance(m, nn.SiLU) for m in net.trunk)


@pytest.mark.parametrize("kwargs, word", [({"activation": "swish"}, "activation"), ({"time_input": "fourier"}, "time_input")])
def test_mlp_bad_options_name_the_key(kwargs, word):
    with pytest.raises(ValueError, match=word):
        MLP(2, **kwargs)


# --------------------------------------------------------------------------- the paths


def _pairs(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g) + 3,
            torch.rand(n, generator=g) * 0.98 + 0.01, torch.randn(n, 2, generator=g))


def test_lipman_fm_path_closed_form():
    x0, x1, t, _ = _pairs()
    sample = GaussianPath(make_scheduler("cond_ot", sigma_min=0.1)).sample(x0, x1, t)
    tt = t[:, None]
    assert torch.allclose(sample.x_t, tt * x1 + (1 - 0.9 * tt) * x0)
    assert torch.allclose(sample.dx_t, x1 - 0.9 * x0)
    # Lipman et al. Eq. 21, written in x_t: u = (x1 - (1 - sigma_min) x_t) / (1 - (1 - sigma_min) t)
    assert torch.allclose(sample.dx_t, (x1 - 0.9 * sample.x_t) / (1 - 0.9 * tt), atol=1e-5)


def test_constant_sigma_path_closed_form():
    x0, x1, t, eps = _pairs()
    scheduler = make_scheduler("cond_ot", sigma=0.1)
    sample = GaussianPath(scheduler).sample(x0, x1, t, eps)
    tt = t[:, None]
    assert torch.allclose(sample.x_t, tt * x1 + (1 - tt) * x0 + 0.1 * eps)
    assert torch.allclose(sample.dx_t, x1 - x0)
    assert torch.equal(target_for("velocity", sample, scheduler), sample.dx_t)


def test_brownian_bridge_path_closed_form():
    x0, x1, t, eps = _pairs()
    sample = GaussianPath(make_scheduler("cond_ot", sigma=0.5, sigma_schedule="brownian_bridge")).sample(x0, x1, t, eps)
    tt = t[:, None]
    mu = tt * x1 + (1 - tt) * x0
    assert torch.allclose(sample.x_t, mu + 0.5 * torch.sqrt(tt * (1 - tt)) * eps)
    # Tong et al. 2024, Eq. 21: u_t = (1 - 2t) / (2 t (1 - t)) (x - mu_t) + x1 - x0
    assert torch.allclose(sample.dx_t, (1 - 2 * tt) / (2 * tt * (1 - tt)) * (sample.x_t - mu) + x1 - x0, atol=1e-4)


def test_noisy_path_needs_its_noise_and_the_velocity_parameterization():
    x0, x1, t, _ = _pairs()
    path = GaussianPath(make_scheduler("cond_ot", sigma=0.1))
    with pytest.raises(ValueError, match="noise"):
        path.sample(x0, x1, t)
    with pytest.raises(ValueError, match="velocity"):
        target_for("epsilon", path.sample(x0, x1, t, torch.zeros_like(x1)), path.scheduler)
    with pytest.raises(ConfigError, match="path.sigma"):
        load_config(f"{CFM2D}/gaussian-to-moons.yaml", overrides=["model.parameterization=epsilon"])


def test_sigma_zero_is_the_plain_line_and_new_keys_change_no_hash():
    plain, zero = make_scheduler("cond_ot"), make_scheduler("cond_ot", sigma=0.0, sigma_min=0.0)
    t = torch.rand(7)
    assert all(torch.equal(a, b) for a, b in zip(vars(plain(t)).values(), vars(zero(t)).values()))
    assert not zero.noisy
    # keys at their defaults are left out of the dump: every existing config keeps its hashes
    assert CondOTPath().model_dump() == {"scheduler": "cond_ot"}
    assert CondOTPath(sigma=0.1).kwargs() == {"sigma": 0.1}
    assert "test_path" not in DataConfig(name="moons").model_dump()
    assert repr(DatasetSpec("moons")) == ("DatasetSpec(name='moons', n_train=None, n_test=None, path=None, "
                                          "image_size=None, channels=None, download=False, seed=0)")


def test_pair_sampler_noise_is_drawn_last():
    data = torch.randn(100, 2)
    plain = PairSampler(data, 16, seed=3).batch(5)
    noisy = PairSampler(data, 16, seed=3, noise=True).batch(5)
    assert plain.noise is None and noisy.noise.shape == (16, 2)
    assert all(torch.equal(getattr(plain, k), getattr(noisy, k)) for k in ("x0", "x1", "t"))


# --------------------------------------------------------------------------- the pairs


def test_exact_plan_sampled_is_the_permutation():
    x0, x1, _, _ = _pairs(48)
    argmax = MinibatchOTCoupling().plan_indices(x0, x1)
    sampled = MinibatchOTCoupling(pairs="sample").plan_indices(x0, x1, torch.Generator().manual_seed(0))
    assert torch.equal(argmax, sampled) and len(set(argmax.tolist())) == 48


def test_sinkhorn_pairs_drawn_from_the_plan_keep_both_marginals():
    """SB-CFM's pairs (x0, x1) ~ pi: every source once; each data point chosen as often as its
    column of the plan says (1/n of the pairs), where argmax piles sources onto few points."""
    n, draws = 24, 400
    x0, x1, _, _ = _pairs(n, seed=1)
    sb = MinibatchOTCoupling("sinkhorn", reg=2 * 0.5**2, normalize_cost=False, pairs="sample")
    plan = sb.plan(x0, x1)
    assert np.allclose(plan.sum(1), 1 / n, atol=1e-6) and np.allclose(plan.sum(0), 1 / n, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(n)
    for _ in range(draws):
        counts += np.bincount(sb.partners(plan, g).numpy(), minlength=n)
    assert np.abs(counts / draws - 1).max() < 0.25  # each data point is used once per batch on average
    greedy = np.bincount(MinibatchOTCoupling("sinkhorn", reg=0.5, normalize_cost=False).partners(plan), minlength=n)
    assert greedy.max() >= 2  # argmax of an entropic plan does not keep the data's marginal
    with pytest.raises(ValueError, match="pairs"):
        MinibatchOTCoupling(pairs="best")


# --------------------------------------------------------------------------- the npy test file


def test_npy_test_file(tmp_path):
    np.save(tmp_path / "train.npy", np.random.default_rng(0).standard_normal((50, 2)))
    np.save(tmp_path / "test.npy", np.random.default_rng(1).standard_normal((30, 2)))
    splits = load_dataset(DatasetSpec("npy", path=str(tmp_path / "train.npy"), test_path=str(tmp_path / "test.npy"), n_test=20))
    assert splits.train.shape == (50, 2) and splits.test.shape == (20, 2)
    assert np.allclose(splits.test, np.load(tmp_path / "test.npy")[:20])


@pytest.mark.parametrize("write, message", [
    (lambda p: np.save(p, np.zeros((10, 3))), "data.test_path: .* holds items of shape \\(3,\\)"),
    (lambda p: p.write_text("x,y\n1,2\n"), "data.test_path: .* is not a .npy file"),
    (lambda p: np.save(p, np.array([{"a": 1}, {"b": 2}], dtype=object), allow_pickle=True), "data.test_path: .* Python objects"),
    (lambda p: None, "data.test_path: .* does not exist"),
])
def test_npy_test_file_errors_are_one_line(tmp_path, write, message):
    np.save(tmp_path / "train.npy", np.zeros((10, 2)))
    write(tmp_path / "test.npy")
    with pytest.raises(DatasetError, match=message) as err:
        load_dataset(DatasetSpec("npy", path=str(tmp_path / "train.npy"), test_path=str(tmp_path / "test.npy")))
    assert "\n" not in str(err.value)


def test_test_path_only_for_npy():
    with pytest.raises(ValueError, match="test_path"):
        DataConfig(name="moons", test_path="x.npy")


# --------------------------------------------------------------------------- starts and the path energy


def _shard_starts(source, total, shard, set_size, seed=0):
    return torch.cat([start_draw(None, (2,), min(shard, total - f), torch.Generator().manual_seed(f), source, f,
                                 set_size, seed) for f in range(0, total, shard)])


def test_starts_without_replacement_whatever_the_shards():
    source = np.random.default_rng(0).standard_normal((10_000, 2)).astype(np.float32)
    a = _shard_starts(source, 10_000, 1000, 10_000)
    assert len(np.unique(a.numpy(), axis=0)) == 10_000
    assert torch.equal(a, _shard_starts(source, 10_000, 2500, 10_000))
    two_sets = _shard_starts(source, 8000, 3000, 4000)  # sets of 4000: distinct within each set
    assert all(len(np.unique(two_sets[k * 4000:(k + 1) * 4000].numpy(), axis=0)) == 4000 for k in range(2))


def test_starts_with_replacement_when_the_source_is_smaller():
    source = np.random.default_rng(0).standard_normal((1000, 2)).astype(np.float32)
    starts = _shard_starts(source, 5000, 1000, 5000)
    assert len(starts) == 5000 and len(np.unique(starts.numpy(), axis=0)) <= 1000


class _Constant(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x, t):
        return self.c.expand_as(x)


def test_npe_of_a_straight_line_flow_is_zero():
    """A constant velocity c moves every point along a straight line at constant speed: path
    energy |c|^2, which is W2^2 between a cloud and its translate (the OT map is the shift)."""
    model = Denoiser(_Constant([1.5, -2.0]), make_scheduler("cond_ot"))
    x0 = torch.randn(200, 2)
    (setting,) = settings_for("euler", [10], {})
    out = sample_with(setting, model, x0)
    assert torch.allclose(out.x, x0 + torch.tensor([1.5, -2.0]), atol=1e-5)
    assert torch.allclose(out.energy, torch.full((200,), 1.5**2 + 2.0**2, dtype=torch.float64))
    scores = energy_scores(out.x.numpy(), out.energy.numpy(), floor=6.25, n=100)
    assert scores[0]["npe"] == pytest.approx(0.0, abs=1e-6) and scores[1]["pe"] == pytest.approx(6.25)
    # a curved flow costs more: NPE > 0
    assert energy_scores(out.x.numpy(), out.energy.numpy() * 1.2, floor=6.25, n=200)[0]["npe"] == pytest.approx(0.2)


def test_no_energy_for_samplers_off_the_ode():
    model = Denoiser(_Constant([1.0, 0.0]), make_scheduler("cond_ot"))
    (setting,) = settings_for("dopri5", [], {"atol": 1e-3, "rtol": 1e-3})
    assert sample_with(setting, model, torch.randn(5, 2)).energy is None


def test_cfm2d_configs_load_with_every_method():
    methods = {
        "I-CFM": ["coupling.kind=independent"],
        "RF": ["coupling.kind=independent", "path.sigma=0"],
        "SB-CFM": ["path.sigma_schedule=brownian_bridge", "coupling.kwargs.method=sinkhorn", "coupling.kwargs.reg=0.02",
                   "coupling.kwargs.normalize_cost=false", "coupling.kwargs.pairs=sample"],
    }
    for task in ("gaussian-to-8gaussians", "8gaussians-to-moons", "gaussian-to-moons", "gaussian-to-scurve"):
        cfg = load_config(f"{CFM2D}/{task}.yaml")
        assert cfg.path.sigma == 0.1 and cfg.coupling.kind == "minibatch_ot" and cfg.model.kwargs["activation"] == "selu"
        for overrides in methods.values():
            load_config(f"{CFM2D}/{task}.yaml", overrides=overrides)
    fm = load_config(f"{CFM2D}/gaussian-to-moons.yaml", overrides=["path.sigma=0", "path.sigma_min=0.1", "coupling.kind=independent"])
    assert fm.scheduler().sigma_min == 0.1 and not fm.scheduler().noisy
