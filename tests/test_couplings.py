"""Minibatch couplings."""

import pytest
import torch

from models.couplings import (
    IndependentCoupling,
    MinibatchOTCoupling,
    make_coupling,
    transport_cost,
)


def batch(n: int = 64, shape: tuple[int, ...] = (2,), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g) * 0.5 + 1.0


def test_transport_cost_is_mean_squared_distance():
    x0 = torch.zeros(2, 2)
    x1 = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert transport_cost(x0, x1) == pytest.approx((25.0 + 1.0) / 2)


def test_independent_coupling_keeps_pairs():
    x0, x1 = batch()
    out0, out1 = IndependentCoupling()(x0, x1)
    assert out0 is x0 and out1 is x1


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
@pytest.mark.parametrize("shape", [(2,), (1, 4, 4)])
def test_ot_lowers_transport_cost(method, shape):
    x0, x1 = batch(shape=shape)
    ot0, ot1 = MinibatchOTCoupling(method=method)(x0, x1)
    assert ot0 is x0 and ot1.shape == x1.shape
    assert transport_cost(ot0, ot1) < 0.8 * transport_cost(x0, x1)


def test_exact_ot_is_a_permutation_and_sorts_in_1d():
    x0, x1 = batch(n=50, shape=(1,))
    idx = MinibatchOTCoupling("exact").plan_indices(x0, x1)
    assert idx.dtype == torch.long
    assert torch.equal(idx.sort().values, torch.arange(50))
    # In 1-D the squared-cost optimal assignment is the monotone (sorted) one.
    paired = x1[idx][x0[:, 0].argsort(), 0]
    assert torch.all(paired[1:] >= paired[:-1])


def test_plan_indices_applied_later_match_the_call():
    x0, x1 = batch()
    coupling = make_coupling("minibatch_ot")
    assert torch.equal(coupling(x0, x1)[1], x1[coupling.plan_indices(x0, x1)])


def test_factory_validates():
    assert isinstance(make_coupling("independent"), IndependentCoupling)
    assert make_coupling("minibatch_ot", method="sinkhorn", reg=0.1).reg == 0.1
    with pytest.raises(ValueError, match="minibatch_ot"):
        make_coupling("optimal")
    with pytest.raises(ValueError, match="sinkhorn"):
        MinibatchOTCoupling(method="greedy")
