"""Discrete normalizing flows: NICE, RealNVP, Glow, MAF and IAF, trained by maximum likelihood.

A flow is an invertible map ``f`` from the data x to a latent z of exactly the data's shape,
with a standard-normal base: by the change of variables

    log p(x) = log N(f(x); 0, I) + log |det df/dx|

(Dinh et al. 2014, "NICE", Sec. 2), and a sample is ``f^-1(z)`` for z ~ N(0, I). The transforms
are ``models.bijections``; the layers of ``models.flow_layers`` hold their weights and build one
(``module()``) at every pass. The density direction (``encode``) is the transforms' call, the generative direction
(``decode``) their inverse. The kinds of ``build_flow``, with what each pass costs in network
evaluations (L layers, D dimensions):

- ``nice`` (Dinh et al. 2014, Secs. 3.2-3.3): additive couplings of alternating halves and a
  final diagonal scaling; L evaluations each way.
- ``realnvp`` (Dinh et al. 2017, "Density estimation using Real NVP", Eqs. 4-9, Sec. 3.6):
  affine couplings; on images checkerboard and channel-wise masks in a multi-scale architecture.
- ``glow`` (Kingma & Dhariwal 2018, Sec. 3, Table 1, Fig. 2): steps of actnorm, invertible 1x1
  convolution (LU-parameterized) and affine coupling, multi-scale on images.
- ``maf`` (Papamakarios et al. 2017, Sec. 3.1): MADE layers (Germain et al. 2015); the density
  takes L evaluations, a sample D L (one pass per dimension).
- ``iaf`` (Kingma et al. 2016, Sec. 4): the same layers inverted; a sample takes L evaluations,
  the density D L.

**Multi-scale** (Dinh et al. 2017, Sec. 3.6; Glow, Fig. 2b): a scale squeezes the image
(``(C, H, W) -> (4C, H/2, W/2)``), transforms it, and factors out half of the channels, which go
straight to the base; the other half goes on to the next scale. Each scale ends by undoing its
squeeze, so every factored-out half sits back in place and z has the data's shape (a fixed
permutation: the standard-normal base does not see it; Glow's learned prior for the factored-out
halves is left out). NICE, MAF and IAF flatten images.

**Stability.** Every conditioner network's last layer starts at zero, so every flow starts as
the identity up to its actnorms and 1x1 convolutions (Glow, Sec. 3.3), and log-scales of affine
couplings and MAF / IAF layers are soft-clamped to (-SCALE_BOUND, SCALE_BOUND) by a tanh.

**Quantized data** (``levels`` grey levels in [-1, 1]) are dequantized uniformly, in training
(the ``maximum_likelihood`` objective) as in evaluation (the ``exact`` likelihood).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from models.bijections import Reshape, Squeeze
from models.checkpoint import FAMILIES, Family, ModelSpec
from models.flow_layers import (
    ActNorm, AdditiveCoupling, AffineCoupling, Chain, Conditioned, DiagonalScaling, FactorOut, Fixed, IAFLayer,
    InvertibleConv1x1, LazyTransform, MAFLayer,
)
from models.likelihoods import bin_width, dequantize, register_likelihood
from models.objectives import Objective, register_objective
from models.samplers import Param, register_sampler

# --------------------------------------------------------------------------- the flow


class NormalizingFlow(nn.Module):
    """A transform stack (data -> latent) and a standard-normal base over the whole data shape.

    ``forward(x)`` is ``log_prob(x)`` (nats per example), so training goes through a DDP wrapper
    as ``-net(x).mean()``. ``encode`` / ``decode`` are the density and generative directions;
    ``data_init`` runs the actnorms' data-dependent initialization; ``conditioners`` lists the
    networks a pass evaluates (sampling counts its NFE on them)."""

    provides = frozenset({"log_prob", "invertible", "gaussian_source"})
    scheduler = None  # sampling reads ``model.scheduler``: a flow has no time path

    def __init__(self, transform: LazyTransform, data_shape: tuple[int, ...]):
        super().__init__()
        self.transform = transform
        self.data_shape = tuple(data_shape)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(z, log |det dz/dx|)``: the latent of each example (shaped like x) and the ladj."""
        return self.transform().call_and_ladj(x)

    def decode(self, z: Tensor) -> Tensor:
        """The generative direction: the data whose latent is ``z``."""
        return self.transform().inverse(z)

    def prior(self, shape: tuple[int, ...], n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` draws of the base N(0, I) of per-example ``shape`` (where sampling starts)."""
        return torch.randn((n, *shape), generator=generator)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        """log N(z; 0, I) summed over each example."""
        return -0.5 * (z.pow(2) + math.log(2 * math.pi)).flatten(1).sum(1)

    def log_prob(self, x: Tensor) -> Tensor:
        """log p(x) in nats per example, by the change of variables."""
        z, ladj = self.encode(x)
        return self.prior_log_prob(z) + ladj

    def forward(self, x: Tensor) -> Tensor:
        return self.log_prob(x)

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """``n`` samples: ``decode(temperature * z)`` with z ~ N(0, I) drawn from ``generator``
        (Glow's reduced temperature below 1, Kingma & Dhariwal 2018, Sec. 5)."""
        like = next(self.parameters())
        z = self.prior(self.data_shape, n, generator).to(dtype=like.dtype, device=like.device)
        return self.decode(temperature * z)

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        """Initialize every actnorm not yet initialized from the batch ``x`` in one density pass:
        each sees the outputs of the layers before it, already initialized (Glow, Sec. 3.1). A
        no-op without actnorms or when all are initialized (e.g. loaded from a checkpoint)."""
        pending = [m for m in self.modules() if isinstance(m, ActNorm) and not m.initialized]
        if not pending:
            return
        for m in pending:
            m.initializing = True
        try:
            self.encode(x)
        finally:
            for m in pending:
                m.initializing = False

    def conditioners(self) -> list[nn.Module]:
        """The networks a pass calls (couplings' and MADEs'): each call is one network evaluation."""
        return [m.net for m in self.modules() if isinstance(m, Conditioned)]


# --------------------------------------------------------------------------- architectures


def halves(n: int, flip: bool = False) -> Tensor:
    """The mask of the first ``n // 2`` entries (the others when ``flip``)."""
    return (torch.arange(n) < n // 2) ^ flip


def checkerboard(height: int, width: int, flip: bool = False) -> Tensor:
    """RealNVP's checkerboard mask (Dinh et al. 2017, Sec. 3.4), shape ``(1, H, W)``."""
    rows, cols = torch.arange(height)[:, None], torch.arange(width)[None, :]
    return (((rows + cols) % 2 == 0) ^ flip)[None]


def channel_mask(channels: int, flip: bool = False) -> Tensor:
    """RealNVP's channel-wise mask (Sec. 3.4): the first half of the channels, ``(C, 1, 1)``."""
    return halves(channels, flip)[:, None, None]


def flattened(shape: tuple[int, ...], layers: list[LazyTransform]) -> Chain:
    """``layers`` of flat vectors applied to data of ``shape`` (flattened, and back after)."""
    if len(shape) == 1:
        return Chain(*layers)
    flat = (math.prod(shape),)
    return Chain(Fixed(Reshape(shape, flat)), *layers, Fixed(Reshape(flat, shape)))


def glow_step(shape: tuple[int, ...], hidden: int, depth: int) -> Chain:
    """One step of Glow (Kingma & Dhariwal 2018, Fig. 2a): actnorm, invertible 1x1 convolution,
    affine coupling of the second half of the channels (features) given the first."""
    channels, positions = shape[0], (1,) * (len(shape) - 1)
    return Chain(ActNorm((channels, *positions)), InvertibleConv1x1(channels),
                 AffineCoupling(halves(channels).view(channels, *positions), shape, hidden, depth))


def _nice(shape, layers: int, hidden: int, depth: int) -> Chain:
    dims = math.prod(shape)
    couplings = [AdditiveCoupling(halves(dims, i % 2 == 1), (dims,), hidden, depth) for i in range(layers)]
    return flattened(shape, couplings + [DiagonalScaling(dims)])


def _realnvp_scale(shape, scales: int, layers: int, hidden: int, depth: int) -> Chain:
    """One scale of RealNVP (Dinh et al. 2017, Sec. 4.1): ``layers`` checkerboard couplings; then,
    unless it is the last scale, a squeeze, ``layers`` channel-wise couplings, and the next scale
    on half of the channels (the other half factored out)."""
    channels, height, width = shape
    board = [AffineCoupling(checkerboard(height, width, i % 2 == 1), shape, hidden, depth) for i in range(layers)]
    if scales == 1:
        return Chain(*board)
    squeezed = (4 * channels, height // 2, width // 2)
    wise = [AffineCoupling(channel_mask(4 * channels, i % 2 == 1), squeezed, hidden, depth) for i in range(layers)]
    rest = _realnvp_scale((2 * channels, height // 2, width // 2), scales - 1, layers, hidden, depth)
    return Chain(*board, Fixed(Squeeze()), *wise, FactorOut(rest, 2 * channels), Fixed(Squeeze().inv))


def _realnvp(shape, layers: int, hidden: int, depth: int, scales: int = 1) -> Chain:
    if len(shape) == 1:
        return Chain(*(AffineCoupling(halves(shape[0], i % 2 == 1), shape, hidden, depth) for i in range(layers)))
    return _realnvp_scale(shape, scales, layers, hidden, depth)


def _glow_level(shape, levels: int, steps: int, hidden: int, depth: int) -> Chain:
    """One level of Glow (Fig. 2b): squeeze, ``steps`` steps, and (but at the last level) the next
    level on half of the channels, the other half factored out."""
    channels, height, width = shape
    squeezed = (4 * channels, height // 2, width // 2)
    body = [glow_step(squeezed, hidden, depth) for _ in range(steps)]
    if levels > 1:
        body.append(FactorOut(_glow_level((2 * channels, height // 2, width // 2), levels - 1, steps, hidden, depth),
                              2 * channels))
    return Chain(Fixed(Squeeze()), *body, Fixed(Squeeze().inv))


def _glow(shape, steps: int, hidden: int, depth: int, levels: int = 1) -> Chain:
    if len(shape) == 1:
        return Chain(*(glow_step(shape, hidden, depth) for _ in range(steps)))
    return _glow_level(shape, levels, steps, hidden, depth)


def _autoregressive(layer: type[MAFLayer]):
    def build(shape, layers: int, hidden: int, depth: int) -> Chain:
        """Layers in the natural order and reversed, alternately (Papamakarios et al. 2017)."""
        dims = math.prod(shape)
        orders = [torch.arange(dims), torch.arange(dims - 1, -1, -1)]
        return flattened(shape, [layer(dims, hidden, depth, orders[i % 2]) for i in range(layers)])
    return build


#: Each kind's builder and its keyword arguments with their defaults (all positive integers).
FLOWS: dict[str, tuple[Callable[..., Chain], dict[str, int]]] = {
    "nice": (_nice, {"layers": 4, "hidden": 64, "depth": 2}),
    "realnvp": (_realnvp, {"layers": 4, "hidden": 64, "depth": 2, "scales": 2}),
    "glow": (_glow, {"steps": 4, "hidden": 64, "depth": 2, "levels": 2}),
    "maf": (_autoregressive(MAFLayer), {"layers": 4, "hidden": 64, "depth": 2}),
    "iaf": (_autoregressive(IAFLayer), {"layers": 4, "hidden": 64, "depth": 2}),
}
#: The multi-scale kinds' image-only key, and how many times n of it halve the height and width.
MULTISCALE: dict[str, tuple[str, Callable[[int], int]]] = {
    "realnvp": ("scales", lambda n: n - 1),
    "glow": ("levels", lambda n: n),
}


def _check_shape(kind: str, shape: tuple[int, ...], options: dict[str, int]) -> None:
    if not shape or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in shape):
        raise ValueError(f"data_shape: got {shape!r}; expected positive integers")
    if math.prod(shape) < 2:
        raise ValueError(f"data_shape: a flow needs at least 2 dimensions, got {shape}")
    if kind not in MULTISCALE or len(shape) == 1:
        return
    if len(shape) != 3:
        raise ValueError(f"data_shape: '{kind}' works on vectors (D,) or images (C, H, W), got {shape}")
    key, halvings = MULTISCALE[kind]
    factor = 2 ** halvings(options[key])
    if shape[1] % factor or shape[2] % factor:
        raise ValueError(f"{key}: {options[key]} needs the height and width divisible by {factor}, got {shape[1:]}")


def build_flow(kind: str, data_shape: tuple[int, ...], **kwargs) -> NormalizingFlow:
    """A flow of ``kind`` (nice, realnvp, glow, maf, iaf) on examples of ``data_shape``: vectors
    ``(D,)`` with D >= 2 or images ``(C, H, W)`` (NICE, MAF and IAF flatten any shape).

    Keywords (positive integers): ``hidden`` and ``depth``, the width and number of hidden layers
    of every conditioner network (64, 2); ``layers`` (nice, realnvp, maf, iaf; 4): couplings or
    MADE layers, for realnvp on images the couplings of each group (the paper has 3 checkerboard,
    3 channel-wise, and 4 checkerboard at the last scale); ``scales`` (realnvp on images; 2);
    ``steps`` (glow; 4): steps per level (on vectors in all); ``levels`` (glow on images; 2).
    Raises ``ValueError`` naming the offending key."""
    if kind not in FLOWS:
        raise ValueError(f"unknown flow {kind!r}; expected one of {', '.join(FLOWS)}")
    builder, defaults = FLOWS[kind]
    shape = tuple(data_shape)
    image_only = {MULTISCALE[kind][0]} if kind in MULTISCALE and len(shape) != 3 else set()
    for key, value in kwargs.items():
        if key not in defaults:
            raise ValueError(f"{key}: unknown key for flow '{kind}'; valid keys: {', '.join(defaults)}")
        if key in image_only:
            raise ValueError(f"{key}: only for images (C, H, W); data_shape is {shape}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key}: got {value!r}; expected a positive integer")
    options = {key: kwargs.get(key, default) for key, default in defaults.items() if key not in image_only}
    _check_shape(kind, shape, options)
    return NormalizingFlow(builder(shape, **options), shape)


def _build(spec: ModelSpec) -> NormalizingFlow:
    return build_flow(spec.network, tuple(spec.data_shape), **spec.network_kwargs)


FAMILIES["normalizing_flow"] = Family(_build, lambda spec: NormalizingFlow.provides)


# --------------------------------------------------------------------------- training


@register_objective("maximum_likelihood")
class MaximumLikelihood(Objective):
    """Maximum likelihood: the loss is the batch's mean negative log-likelihood in nats per
    dimension, ``-net(x).mean() / D`` (``net`` the flow or its DDP wrapper). With ``levels``
    (the data quantized to ``levels`` values in [-1, 1]) each batch is dequantized first,
    x + u with u ~ U(-delta/2, delta/2) from torch's global RNG (Theis et al. 2016, "A note on
    the evaluation of generative models"); the loss leaves out the constant log delta
    of the discrete likelihood. ``data_init`` initializes the flow's actnorms."""

    needs = frozenset({"data"})

    def __init__(self, model: nn.Module, inputs: dict[str, nn.Module] | None = None, *,
                 levels: int | None = None, **options) -> None:
        super().__init__(model, inputs, **options)
        if not isinstance(model, NormalizingFlow):
            raise ValueError(f"model: objective {self.name!r} trains a 'normalizing_flow' family model, "
                             f"got {type(model).__name__}")
        if levels is not None:
            bin_width(levels)
        self.levels = levels

    def loss(self, net: nn.Module, batch) -> Tensor:
        x, _ = dequantize(batch.x1, self.levels, None)
        return -net(x).mean() / x[0].numel()

    def data_init(self, x1: Tensor) -> None:
        """The flow's actnorm initialization on the (dequantized) batch ``x1``."""
        self.model.data_init(dequantize(x1, self.levels, None)[0])


# --------------------------------------------------------------------------- sampling and likelihood


@register_sampler("invert", {"invertible"}, {
    "temperature": Param(1.0, low=0.0, high=10.0,
                         doc="scale of the prior draw: z ~ N(0, T^2 I) (Glow's temperature; 0 gives decode(0))"),
}, adaptive=True)
def invert(model, x: Tensor, grid: Tensor, generator: torch.Generator | None = None, callback=None,
           temperature: float = 1.0) -> Tensor:
    """The flow's generative direction on the prior draw: ``model.decode(temperature * x)``.

    One pass through the flow: its NFE is the number of conditioner evaluations, e.g. 8 for a
    RealNVP of 8 couplings or an IAF of 8 layers, D times the number of layers for a MAF
    (one pass per dimension). ``grid`` is unused; ``callback`` sees the result at its end."""
    out = model.decode(temperature * x)
    if callback:
        callback(len(grid) - 1, out)
    return out


@register_likelihood("exact", {"log_prob"})
@torch.no_grad()
def exact_nll(model, x: Tensor, generator: torch.Generator | None = None, levels: int | None = None) -> Tensor:
    """Exact negative log-likelihood in nats per example by the change of variables.

    Quantized data are dequantized as for ``ode``: u drawn from ``generator`` in float64, and the
    value is -log p(x + u) - D log delta (``likelihoods.dequantize``)."""
    x, log_volume = dequantize(x, levels, generator)
    return -model.log_prob(x) - log_volume
