"""Flow matching loss."""

import pytest
import torch
from torch import nn

from models.losses import flow_matching_loss, target_for
from models.networks import MLP
from models.parameterization import Denoiser
from models.paths import GaussianPath, VPScheduler, make_scheduler


class _Zero(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x)


def test_zero_velocity_network_loss_is_mean_squared_displacement():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(64, 3, generator=g), torch.randn(64, 3, generator=g) + 2.0
    path = GaussianPath(make_scheduler("cond_ot"))
    loss = flow_matching_loss(Denoiser(_Zero(), path.scheduler), path, x0, x1, generator=g)
    torch.testing.assert_close(loss, (x1 - x0).pow(2).mean())


def test_targets_per_parameterization():
    scheduler = VPScheduler()
    path = GaussianPath(scheduler)
    g = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    sample = path.sample(x0, x1, torch.linspace(0.1, 0.9, 6))
    sigma = scheduler(sample.t).sigma[:, None]
    torch.testing.assert_close(target_for("velocity", sample, scheduler), sample.dx_t)
    torch.testing.assert_close(target_for("epsilon", sample, scheduler), x0)
    torch.testing.assert_close(target_for("x1", sample, scheduler), x1)
    torch.testing.assert_close(target_for("score", sample, scheduler), -x0 / sigma)


@pytest.fixture
def single_thread():
    """Tiny matmuls: intra-op threads only add overhead, badly so on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("parameterization", ["velocity", "epsilon"])
def test_training_reduces_loss(parameterization, single_thread):
    torch.manual_seed(0)
    path = GaussianPath(make_scheduler("cond_ot"))
    model = Denoiser(MLP(2, hidden=64, layers=3, time_dim=16), path.scheduler, parameterization)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    eval_x0, eval_x1 = torch.randn(512, 2, generator=g), torch.randn(512, 2, generator=g) * 0.3 + 3.0
    eval_t = torch.rand(512, generator=g)

    def eval_loss() -> float:
        with torch.no_grad():
            return flow_matching_loss(model, path, eval_x0, eval_x1, t=eval_t).item()

    before = eval_loss()
    for _ in range(100):
        x0, x1 = torch.randn(64, 2, generator=g), torch.randn(64, 2, generator=g) * 0.3 + 3.0
        loss = flow_matching_loss(model, path, x0, x1, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before
