"""The trainable layers of discrete normalizing flows: each holds its weights and builds a
``models.bijections`` transform from them (``module()``) at every pass; ``models.normalizing_flows``
stacks them into flows. Actnorm with data-dependent initialization and the LU-parameterized
invertible 1x1 convolution (Kingma & Dhariwal 2018, Sec. 3), coupling layers (Dinh et al. 2014 and
2017), MADE (Germain et al. 2015) and the MAF / IAF layers built on it (Papamakarios et al. 2017;
Kingma et al. 2016)."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.bijections import (
    Additive, Affine, Autoregressive, Composed, Conv1x1, Coupling, Elementwise, Scale, Split,
    Transform,
)

SCALE_BOUND = 3.0  # |log-scale| of one affine coupling or autoregressive layer stays below it
# The conditioners' hidden units are ReLUs, as in the MADE, RealNVP and MAF papers: with SiLU
# (nearly linear near 0 at initialization) MAF and RealNVP on moons learnt several times slower
# (test NLL 2.25 against 1.39 after 200 Adam steps; benchmarks/flows_vs_zuko.py's setting).
ACTNORM_EPS = 1e-6  # added to the initial batch's standard deviations


def bounded(raw: Tensor) -> Tensor:
    """``SCALE_BOUND tanh(raw / SCALE_BOUND)``: about ``raw`` near 0, never past the bound."""
    return SCALE_BOUND * torch.tanh(raw / SCALE_BOUND)


def affine_law(out: Tensor) -> Affine:
    """The elementwise affine transform a network output codes: ``(shift, raw log-scale)``
    stacked along dim 1, the log-scale soft-clamped."""
    shift, raw = out.chunk(2, dim=1)
    return Affine(shift, bounded(raw))


# --------------------------------------------------------------------------- modules


class LazyTransform(nn.Module):
    """A module that builds a transform from its current weights: ``module()`` is a
    ``bijections.Transform`` (differentiable in the weights)."""

    def forward(self) -> Transform:
        raise NotImplementedError


class Chain(LazyTransform):
    """Its layers one after the other (the first applied first in the density direction)."""

    def __init__(self, *layers: LazyTransform):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self) -> Composed:
        return Composed(*(layer() for layer in self.layers))


class Fixed(LazyTransform):
    """A transform without parameters (a squeeze, a reshape) as a module."""

    def __init__(self, transform: Transform):
        super().__init__()
        self.transform = transform

    def forward(self) -> Transform:
        return self.transform


class FactorOut(LazyTransform):
    """Multi-scale factoring out (Dinh et al. 2017, Sec. 3.6): ``inner`` goes on with the first
    ``keep`` channels, the others are latent from here on."""

    def __init__(self, inner: LazyTransform, keep: int):
        super().__init__()
        self.inner, self.keep = inner, keep

    def forward(self) -> Split:
        return Split(self.inner(), self.keep)


class Conditioned(LazyTransform):
    """A transform whose parameters the network ``net`` computes from its input: each computation
    of them is one evaluation of ``net`` (once a pass of a coupling or of a MAF's density, D times
    a MAF's inverse), what ``NormalizingFlow.conditioners`` counts."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net


class _FromData(Transform):
    """A density-direction transform built from the batch it meets (data-dependent init)."""

    def __init__(self, build: Callable[[Tensor], Transform]):
        self.build = build

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.build(x).call_and_ladj(x)


class ActNorm(LazyTransform):
    """Glow's activation normalization (Kingma & Dhariwal 2018, Sec. 3.1, Table 1): a per-channel
    (per-feature on vectors) affine map ``y = s x + b`` (as ``log s`` and b), initialized from
    data so that its outputs on the initial batch have zero mean and unit variance per channel.

    ``shape`` is that of its parameters: ``(C, 1, 1)`` for images, ``(D,)`` for vectors. The
    buffer ``initialized`` is saved with the weights, so a loaded checkpoint or a resumed run
    never initializes again. Initialization is ``NormalizingFlow.data_init``'s."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.initializing = False  # set by NormalizingFlow.data_init for one pass

    def forward(self) -> Transform:
        if self.initializing and not self.initialized:
            return _FromData(self.initialize)
        return Affine(self.shift, self.log_scale)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> Affine:
        """Set ``s = 1 / std``, ``b = -mean / std`` from the batch ``x`` (statistics per channel,
        over the batch and the positions) and mark the layer initialized."""
        dims = [0, *range(2, x.dim())]
        log_scale = -torch.log(x.std(dims, correction=0) + ACTNORM_EPS)
        self.log_scale.copy_(log_scale.view_as(self.log_scale))
        self.shift.copy_((-x.mean(dims) * log_scale.exp()).view_as(self.shift))
        self.initialized.fill_(True)
        return Affine(self.shift, self.log_scale)


class InvertibleConv1x1(LazyTransform):
    """Glow's invertible 1x1 convolution over ``channels`` (Kingma & Dhariwal 2018, Sec. 3.2) in
    its LU parameterization (Eq. 10): ``W = P L (U + diag(sign(s) exp(log|s|)))`` with the
    permutation P and sign(s) fixed buffers, L unit lower triangular, U strictly upper
    triangular and log|s| trained, so log |det W| = sum log|s| costs O(C). Initialized at a
    random rotation (log |det W| = 0). On vectors it is an invertible linear map."""

    def __init__(self, channels: int):
        super().__init__()
        rotation = torch.linalg.qr(torch.randn(channels, channels)).Q
        permutation, lower, upper = torch.linalg.lu(rotation)
        s = upper.diagonal()
        self.register_buffer("permutation", permutation)
        self.register_buffer("sign_s", s.sign())
        self.lower = nn.Parameter(lower.tril(-1))
        self.upper = nn.Parameter(upper.triu(1))
        self.log_abs_s = nn.Parameter(s.abs().log())

    def weight(self) -> Tensor:
        eye = torch.eye(len(self.log_abs_s), dtype=self.lower.dtype, device=self.lower.device)
        upper = self.upper.triu(1) + torch.diag(self.sign_s * self.log_abs_s.exp())
        return self.permutation @ (self.lower.tril(-1) + eye) @ upper

    def forward(self) -> Conv1x1:
        return Conv1x1(self.weight(), self.log_abs_s.sum())


def conditioner(shape: tuple[int, ...], outputs: int, hidden: int, depth: int) -> nn.Sequential:
    """A coupling layer's network: ``depth`` hidden layers of width ``hidden`` (ReLU) from the
    masked input to ``outputs`` values per entry; linear layers on vectors ``(D,)``, 3x3
    convolutions (same padding) on images ``(C, H, W)``. Its last layer starts at zero."""
    channels = shape[0]

    def layer(n_in: int, n_out: int) -> nn.Module:
        return nn.Linear(n_in, n_out) if len(shape) == 1 else nn.Conv2d(n_in, n_out, 3, padding=1)

    widths = [channels] + [hidden] * depth
    trunk = [m for n_in, n_out in zip(widths[:-1], widths[1:]) for m in (layer(n_in, n_out), nn.ReLU())]
    last = layer(hidden, outputs * channels)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*trunk, last)


class CouplingLayer(Conditioned):
    """A coupling layer (``bijections.Coupling``): the entries where ``mask`` holds pass
    unchanged and condition, through ``net``, the elementwise transform of the others.
    Subclasses give the transform's law (``law``) and its parameters per entry (``outputs``)."""

    outputs: ClassVar[int]

    def __init__(self, mask: Tensor, shape: tuple[int, ...], hidden: int, depth: int):
        super().__init__(conditioner(shape, self.outputs, hidden, depth))
        self.register_buffer("mask", mask)

    def law(self, out: Tensor) -> Elementwise:
        raise NotImplementedError

    def forward(self) -> Coupling:
        return Coupling(self.mask, lambda kept: self.law(self.net(kept)))


class AffineCoupling(CouplingLayer):
    """RealNVP's affine coupling (Dinh et al. 2017, Eqs. 4-9; Glow's, Table 1):
    ``y = x exp(s) + t`` on the transformed entries, ``(t, s)`` the network's output on the
    masked input, ``s`` soft-clamped; ladj = sum of s over the transformed entries."""

    outputs = 2

    def law(self, out: Tensor) -> Affine:
        return affine_law(out)


class AdditiveCoupling(CouplingLayer):
    """NICE's additive coupling (Dinh et al. 2014, Sec. 3.2): ``y = x + m(masked x)`` on the
    transformed entries; volume preserving."""

    outputs = 1

    def law(self, out: Tensor) -> Additive:
        return Additive(out)


class DiagonalScaling(LazyTransform):
    """NICE's last layer (Dinh et al. 2014, Sec. 3.3): ``z = exp(s) h`` per dimension, the only
    volume change of a NICE flow."""

    def __init__(self, features: int):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(features))

    def forward(self) -> Scale:
        return Scale(self.log_scale)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 ``mask`` of shape (out, in)."""

    def __init__(self, mask: Tensor):
        super().__init__(mask.shape[1], mask.shape[0])
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


MADE_DEGREES = ("cyclic", "random")


class MADE(nn.Module):
    """Masked autoencoder for distribution estimation (Germain et al. 2015, Sec. 4): an MLP on
    ``(B, D)`` whose masked weights make outputs of input i depend on the inputs before i in
    ``order`` only (``order[0]`` first; the natural order by default).

    Input ``order[k]`` has degree k + 1; the hidden units of each of the ``depth`` layers have
    degrees in [1, D - 1]: ``cyclic`` (1, 2, ..., D - 1, 1, 2, ...) or ``random`` (the paper's:
    uniform from the previous layer's smallest degree to D - 1, torch's global RNG). A unit of
    degree m sees the units of the layer below with degree <= m, and the outputs of an input
    of degree d the last hidden units of degree < d (the paper's masks M^W and M^V), so the
    Jacobian of every output block is strictly triangular in the order. ``outputs`` values per
    input, in blocks along dim 1 (output ``j D + i`` is the j-th of input i). The masks are saved
    buffers; the last layer starts at zero."""

    def __init__(self, features: int, outputs: int = 2, hidden: int = 64, depth: int = 2,
                 order: Tensor | None = None, degrees: str = "cyclic"):
        super().__init__()
        if features < 2:
            raise ValueError(f"features: MADE needs at least 2, got {features}")
        if degrees not in MADE_DEGREES:
            raise ValueError(f"degrees: got {degrees!r}; expected one of {', '.join(MADE_DEGREES)}")
        order = torch.arange(features) if order is None else torch.as_tensor(order)
        if sorted(order.tolist()) != list(range(features)):
            raise ValueError(f"order: expected a permutation of 0..{features - 1}, got {order.tolist()}")
        input_degrees = torch.empty(features, dtype=torch.long)
        input_degrees[order] = torch.arange(1, features + 1)
        layers, below = [], input_degrees
        for _ in range(depth):
            if degrees == "cyclic":
                units = torch.arange(hidden) % (features - 1) + 1
            else:
                units = torch.randint(int(below.min()), features, (hidden,))
            layers += [MaskedLinear(units[:, None] >= below[None, :]), nn.ReLU()]
            below = units
        last = MaskedLinear(input_degrees.repeat(outputs)[:, None] > below[None, :])
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MAFLayer(Conditioned):
    """One layer of a masked autoregressive flow (Papamakarios et al. 2017, Sec. 3.1):
    ``z_i = (x_i - mu_i) exp(-alpha_i)`` with ``mu_i, alpha_i`` functions of ``x_<i`` (a MADE),
    written as ``z = x exp(s) + t`` with ``(t, s)`` the MADE's outputs (s = -alpha, soft-clamped).
    The density is one pass, a sample D passes (``bijections.Autoregressive``)."""

    def __init__(self, features: int, hidden: int, depth: int, order: Tensor | None = None):
        super().__init__(MADE(features, 2, hidden, depth, order))
        self.features = features

    def forward(self) -> Transform:
        return Autoregressive(lambda x: affine_law(self.net(x)), self.features)


class IAFLayer(MAFLayer):
    """One layer of an inverse autoregressive flow (Kingma et al. 2016, Sec. 4:
    ``z_t = mu_t + sigma_t * z_{t-1}`` with ``mu_t, sigma_t`` functions of the earlier entries of
    ``z_{t-1}``): the MAF layer's transform inverted, so the generative direction is one MADE
    pass on the latent side and the density D passes."""

    def forward(self) -> Transform:
        return super().forward().inv
