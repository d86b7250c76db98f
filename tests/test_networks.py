"""Networks: shapes, time dependence, determinism, factory."""

import pytest
import torch

from models.networks import MLP, SinusoidalTimeEmbedding, UNet, build_network


def test_time_embedding_shape_and_values():
    emb = SinusoidalTimeEmbedding(8)(torch.tensor([0.0, 0.5]))
    assert emb.shape == (2, 8)
    torch.testing.assert_close(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    assert not torch.allclose(emb[0], emb[1])


def test_mlp_shape_and_time_dependence():
    torch.manual_seed(0)
    net = MLP(2, hidden=32, layers=3, time_dim=16)
    x = torch.randn(5, 2)
    out = net(x, torch.zeros(5))
    assert out.shape == (5, 2)
    assert not torch.allclose(out, net(x, torch.ones(5)))


def test_mlp_wrapper_on_images():
    net = build_network("mlp", (1, 8, 8), hidden=32)
    x = torch.randn(3, 1, 8, 8)
    assert net(x, torch.rand(3)).shape == x.shape


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size,mults", [(8, (1, 2)), (28, (1, 2, 2, 2)), (32, (1, 2, 2))])
def test_unet_shapes(channels, size, mults):
    net = build_network("unet", (channels, size, size), base_channels=16, channel_mults=mults)
    x = torch.randn(2, channels, size, size)
    assert net(x, torch.rand(2)).shape == x.shape


def test_unet_default_size_and_time_dependence():
    torch.manual_seed(0)
    net = UNet()
    assert 100_000 <= sum(p.numel() for p in net.parameters()) <= 400_000
    x = torch.randn(2, 1, 8, 8)
    assert torch.count_nonzero(net(x, torch.rand(2))) == 0  # zero-initialised output conv
    torch.nn.init.normal_(net.out[-1].weight)
    assert not torch.allclose(net(x, torch.zeros(2)), net(x, torch.ones(2)))


@pytest.mark.parametrize("kind,shape", [("mlp", (2,)), ("unet", (1, 8, 8))])
def test_deterministic_given_seed(kind, shape):
    def make():
        torch.manual_seed(123)
        net = build_network(kind, shape)
        for p in net.parameters():  # the UNet output conv starts at zero: make outputs non-trivial
            p.data.add_(0.01 * torch.randn_like(p))
        return net

    x, t = torch.ones(2, *shape), torch.full((2,), 0.3)
    assert torch.equal(make()(x, t), make()(x, t))


def test_build_network_errors():
    with pytest.raises(ValueError, match="unet"):
        build_network("transformer", (2,))
    with pytest.raises(TypeError, match="widths"):
        build_network("mlp", (2,), widths=3)
    with pytest.raises(ValueError):
        build_network("unet", (64,))
    with pytest.raises(ValueError, match="groups"):
        UNet(base_channels=12)


def test_unet_channels_last_is_only_a_layout():
    """The UNet keeps its weights channels-last for speed; the same weights laid out the usual
    way give the same field, and the output comes back contiguous (checkpoints, views)."""
    torch.manual_seed(0)
    net = UNet(in_channels=1, base_channels=8, channel_mults=(1, 2), groups=4).double()
    torch.nn.init.normal_(net.out[-1].weight)  # the output conv starts at zero
    assert net.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.rand(5, dtype=torch.float64)
    out = net(x, t)
    assert out.is_contiguous()
    net.to(memory_format=torch.contiguous_format)
    assert torch.allclose(out, net(x, t), atol=1e-10)
