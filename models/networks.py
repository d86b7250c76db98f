"""Time-conditioned networks.

Each maps ``(x, t)``, with ``t`` of shape ``(B,)`` in [0, 1], to a tensor shaped like ``x``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SinusoidalTimeEmbedding(nn.Module):
    """Transformer-style sin/cos features of ``t``.

    ``t`` is multiplied by ``scale`` first: with ``t`` in [0, 1] the low frequencies
    would otherwise barely change across the whole interval.
    """

    def __init__(self, dim: int, scale: float = 1000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2) / (dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)
        self.scale = scale

    def forward(self, t: Tensor) -> Tensor:
        args = self.scale * t.reshape(-1, 1).to(self.freqs.dtype) * self.freqs
        return torch.cat([args.sin(), args.cos()], dim=-1)


def _time_mlp(time_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        SinusoidalTimeEmbedding(time_dim),
        nn.Linear(time_dim, out_dim),
        nn.SiLU(),
        nn.Linear(out_dim, out_dim),
    )


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "silu": nn.SiLU, "selu": nn.SELU, "relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "elu": nn.ELU,
}
TIME_INPUTS = ("sinusoidal", "concat")


class MLP(nn.Module):
    """Vector field on flat vectors ``(B, dim)``; the time features are concatenated to the input.

    ``layers`` counts the linear layers of the trunk (at least 2), ``activation`` follows each but
    the last (``ACTIVATIONS``). ``time_input``: ``sinusoidal`` (sin/cos features of ``t`` through
    their own two-layer MLP, ``time_dim`` wide) or ``concat`` (``t`` itself as one more input, as
    in Tong et al. 2024's 2-D experiments: 3 hidden layers of 64, SELU, is ``hidden: 64,
    layers: 4, activation: selu, time_input: concat``).
    """

    def __init__(self, dim: int, hidden: int = 256, layers: int = 4, time_dim: int = 64,
                 activation: str = "silu", time_input: str = "sinusoidal"):
        super().__init__()
        if layers < 2:
            raise ValueError(f"MLP needs layers >= 2, got {layers}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: unknown {activation!r}; valid choices: {', '.join(ACTIVATIONS)}")
        if time_input not in TIME_INPUTS:
            raise ValueError(f"time_input: unknown {time_input!r}; valid choices: {', '.join(TIME_INPUTS)}")
        self.time = _time_mlp(time_dim, time_dim) if time_input == "sinusoidal" else None
        widths = [dim + (time_dim if self.time is not None else 1)] + [hidden] * (layers - 1)
        trunk: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:]):
            trunk += [nn.Linear(w_in, w_out), ACTIVATIONS[activation]()]
        self.trunk = nn.Sequential(*trunk, nn.Linear(hidden, dim))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        features = self.time(t) if self.time is not None else t.reshape(-1, 1)
        return self.trunk(torch.cat([x, features.to(x.dtype)], dim=-1))


class FlattenWrapper(nn.Module):
    """Lets a flat-vector network act on ``(B, *data_shape)`` tensors."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x.flatten(1), t).view_as(x)


class ResBlock(nn.Module):
    """Two GroupNorm-SiLU-conv layers, the time embedding added in between."""

    def __init__(self, c_in: int, c_out: int, time_dim: int, groups: int, dropout: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(time_dim, c_out)
        self.norm2 = nn.GroupNorm(groups, c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class UNet(nn.Module):
    """Small U-Net for square images (side 8 to 32, odd intermediate sizes allowed).

    Downsampling uses stride-2 convs; upsampling is nearest interpolation to the
    skip's exact size, so 28 -> 14 -> 7 -> 4 comes back to 28.  The output conv
    starts at zero, so training starts from the zero field.

    With ``channels_last`` (the default) weights and activations are kept channels-last (NHWC):
    oneDNN's convolutions on these small images run about 10% faster that way, a training step
    and a forward alike (``benchmarks/unet_layout.py``); the output is returned contiguous.
    """

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        channel_mults: tuple[int, ...] = (1, 2),
        num_res_blocks: int = 1,
        time_dim: int = 128,
        groups: int = 8,
        dropout: float = 0.0,
        channels_last: bool = True,
    ):
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        chans = [base_channels * m for m in channel_mults]
        if any(c % groups for c in chans):
            raise ValueError(f"channels {chans} must be multiples of groups={groups}")

        def blocks(c_first: int, c: int) -> nn.ModuleList:
            widths = [c_first] + [c] * num_res_blocks
            pairs = zip(widths[:-1], widths[1:])
            return nn.ModuleList(ResBlock(a, b, time_dim, groups, dropout) for a, b in pairs)

        self.time = _time_mlp(time_dim, time_dim)
        self.stem = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList(blocks(c_prev, c) for c_prev, c in zip(chans[:1] + chans[:-1], chans))
        self.downsample = nn.ModuleList(nn.Conv2d(c, c, 3, stride=2, padding=1) for c in chans[:-1])
        self.mid = ResBlock(chans[-1], chans[-1], time_dim, groups, dropout)
        rev = chans[::-1]
        self.up = nn.ModuleList(blocks(c_deep + c, c) for c_deep, c in zip(rev[:1] + rev[:-1], rev))
        self.out = nn.Sequential(
            nn.GroupNorm(groups, chans[0]), nn.SiLU(), nn.Conv2d(chans[0], in_channels, 3, padding=1)
        )
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)
        self.to(memory_format=self.memory_format)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        temb = self.time(t).to(x.dtype)
        h = self.stem(x.contiguous(memory_format=self.memory_format))
        skips = []
        for level, level_blocks in enumerate(self.down):
            for block in level_blocks:
                h = block(h, temb)
            skips.append(h)
            if level < len(self.downsample):
                h = self.downsample[level](h)
        h = self.mid(h, temb)
        for level_blocks in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[-2:], mode="nearest")  # identity at equal size
            h = torch.cat([h, skip], dim=1)
            for block in level_blocks:
                h = block(h, temb)
        return self.out(h).contiguous()


NETWORKS: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet}


def build_network(kind: str, data_shape: tuple[int, ...], **kwargs) -> nn.Module:
    """Build a network for samples of shape ``data_shape`` (without the batch dim)."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network {kind!r}; valid choices: {sorted(NETWORKS)}")
    data_shape = tuple(data_shape)
    if kind == "mlp":
        net = MLP(math.prod(data_shape), **kwargs)
        return FlattenWrapper(net) if len(data_shape) > 1 else net
    if len(data_shape) != 3:
        raise ValueError(f"unet needs data_shape (channels, height, width), got {data_shape}")
    return UNet(in_channels=data_shape[0], **kwargs)
