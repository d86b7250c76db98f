"""Invertible transforms with tractable log-determinants: the algebra of discrete normalizing flows.

A ``Transform`` is a plain object (not an ``nn.Module``) holding tensors that are already
computed (its parameters, or the function that computes them from its input); the trainable
modules of ``models.normalizing_flows`` build a fresh one from their current weights at every
pass, so gradients flow through these tensors into the weights (as zuko's ``Transform`` and
``LazyTransform``).

Every transform maps a batch ``x`` of shape ``(B, ...)`` to ``y`` and gives

    y = t(x),   x = t.inverse(y),   (y, ladj) = t.call_and_ladj(x),

with ``ladj = log |det dy/dx|`` for each example (shape ``(B,)``: examples never interact), and
``t.inv``: the inverse transform, whose call is ``t.inverse``. A density is carried by the
change of variables ``log p_X(x) = log p_Z(t(x)) + ladj(x)`` (Dinh et al. 2014, "NICE",
Sec. 2; Dinh et al. 2017, "Density estimation using Real NVP", Eqs. 1-2).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def per_example(values: Tensor) -> Tensor:
    """Sum over every dimension but the batch: elementwise log-derivatives -> ``(B,)``."""
    return values.flatten(1).sum(1)


def _no_volume_change(x: Tensor) -> Tensor:
    return x.new_zeros(len(x))


class Transform:
    """An invertible map of batches. Subclasses give ``call_and_ladj`` and ``inverse_and_ladj``
    (the inverse with log |det dx/dy|); calling and inverting without the log-determinant
    default to them."""

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(y, log |det dy/dx|)``, the second of shape ``(B,)``."""
        raise NotImplementedError

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(x, log |det dx/dy|)`` with ``x = inverse(y)``: minus the forward ladj at x."""
        raise NotImplementedError

    def __call__(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def inverse(self, y: Tensor) -> Tensor:
        return self.inverse_and_ladj(y)[0]

    @property
    def inv(self) -> Transform:
        """The inverse transform: its call is this one's inverse."""
        return Inverse(self)


class Inverse(Transform):
    """``t`` run backwards: ``Inverse(t)(y) = t.inverse(y)``."""

    def __init__(self, transform: Transform):
        self.transform = transform

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform.inverse_and_ladj(x)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self.transform.call_and_ladj(y)

    @property
    def inv(self) -> Transform:
        return self.transform


class Composed(Transform):
    """``t_n o ... o t_1``: applied first to last, inverted last to first; the ladj add up."""

    def __init__(self, *transforms: Transform):
        self.transforms = transforms

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        total = _no_volume_change(x)
        for t in self.transforms:
            x, ladj = t.call_and_ladj(x)
            total = total + ladj
        return x, total

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        total = _no_volume_change(y)
        for t in reversed(self.transforms):
            y, ladj = t.inverse_and_ladj(y)
            total = total + ladj
        return y, total


# --------------------------------------------------------------------------- elementwise


class Elementwise(Transform):
    """``y_i = f_i(x_i)`` entry by entry: the Jacobian is diagonal, so the ladj is the sum of
    ``log |f_i'(x_i)|``. Subclasses give ``__call__``, ``inverse`` and ``log_derivative``."""

    def log_derivative(self, x: Tensor) -> Tensor:
        """``log |dy_i / dx_i|`` at ``x``, shaped like ``x``."""
        raise NotImplementedError

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self(x), per_example(self.log_derivative(x))

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = self.inverse(y)
        return x, -per_example(self.log_derivative(x))


class Affine(Elementwise):
    """``y = x exp(log_scale) + shift`` (both broadcast against x): the affine coupling law of
    RealNVP (Dinh et al. 2017, Eq. 5) and Glow's actnorm (Kingma & Dhariwal 2018, Table 1)."""

    def __init__(self, shift: Tensor, log_scale: Tensor):
        self.shift, self.log_scale = shift, log_scale

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.log_scale.exp() + self.shift

    def inverse(self, y: Tensor) -> Tensor:
        return (y - self.shift) * (-self.log_scale).exp()

    def log_derivative(self, x: Tensor) -> Tensor:
        return torch.broadcast_to(self.log_scale, x.shape)


class Additive(Affine):
    """``y = x + shift``: NICE's additive coupling law (Dinh et al. 2014, Sec. 3.2), volume
    preserving (ladj = 0)."""

    def __init__(self, shift: Tensor):
        super().__init__(shift, torch.zeros_like(shift))


class Scale(Affine):
    """``y = exp(log_scale) x``: NICE's diagonal scaling layer (Dinh et al. 2014, Sec. 3.3),
    ladj = sum of log_scale."""

    def __init__(self, log_scale: Tensor):
        super().__init__(torch.zeros_like(log_scale), log_scale)


# --------------------------------------------------------------------------- conditioned


class Coupling(Transform):
    """A coupling layer (Dinh et al. 2014, Sec. 3.1; in masked form Dinh et al. 2017, Eq. 9):
    the entries where ``mask`` is True stay, the others go through the elementwise transform
    ``meta(x masked)`` computes from the kept ones only,

        y = mask * x + (1 - mask) * meta(mask * x)(x),

    so the Jacobian is triangular with the transformed entries' derivatives on its diagonal, and
    the inverse recomputes the same ``meta`` from ``y``'s kept entries (they equal x's).
    ``mask`` broadcasts against the batch (without its batch dimension)."""

    def __init__(self, mask: Tensor, meta: Callable[[Tensor], Elementwise]):
        self.mask, self.meta = mask, meta

    def _law(self, kept: Tensor) -> Elementwise:
        return self.meta(torch.where(self.mask, kept, 0.0))

    def _ladj(self, law: Elementwise, x: Tensor) -> Tensor:
        return per_example(torch.where(self.mask, 0.0, law.log_derivative(x)))

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        law = self._law(x)
        return torch.where(self.mask, x, law(x)), self._ladj(law, x)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        law = self._law(y)
        x = torch.where(self.mask, y, law.inverse(y))
        return x, -self._ladj(law, x)


class Autoregressive(Transform):
    """An autoregressive transform (Papamakarios et al. 2017, "Masked Autoregressive Flow",
    Sec. 3.1): ``meta(x)`` is an elementwise transform whose parameters for entry i depend on
    the entries before i in some order only (a MADE), so ``y = meta(x)(x)`` takes one pass and
    has a triangular Jacobian.

    The inverse solves ``meta(x)(x) = y`` by fixed-point passes from x = 0: each pass
    ``x <- meta(x).inverse(y)`` gets one more entry right in the order (the first entry's
    parameters are constants), so ``passes = D`` passes are exact. Sampling a MAF, or the
    density of an IAF, costs D network evaluations. The inverse's ladj reuses the last pass:
    its parameters came from an x whose first D - 1 entries were already exact."""

    def __init__(self, meta: Callable[[Tensor], Elementwise], passes: int):
        self.meta, self.passes = meta, passes

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.meta(x).call_and_ladj(x)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = torch.zeros_like(y)
        for _ in range(self.passes):
            law = self.meta(x)
            x = law.inverse(y)
        return x, -per_example(law.log_derivative(x))


# --------------------------------------------------------------------------- linear and shape


class Permutation(Transform):
    """``y[:, i] = x[:, order[i]]`` along dim 1 (features, or channels of images); ladj = 0.
    ``Permutation.reversal(n)`` is the reversal NICE and RealNVP stack between couplings."""

    def __init__(self, order: Tensor):
        self.order = order

    @classmethod
    def reversal(cls, n: int) -> Permutation:
        return cls(torch.arange(n - 1, -1, -1))

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, self.order.to(x.device)], _no_volume_change(x)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y[:, torch.argsort(self.order).to(y.device)], _no_volume_change(y)


class Conv1x1(Transform):
    """The invertible 1x1 convolution (Kingma & Dhariwal 2018, "Glow", Sec. 3.2): ``y = W x``
    over dim 1 at every position of ``(B, C, *spatial)`` (a plain invertible linear map of
    vectors when there are no spatial dims), ladj = h w log |det W| (Eq. 9).
    ``log_abs_det`` is log |det W| when known (the LU parameterization, Eq. 10), else it
    comes from ``slogdet``."""

    def __init__(self, weight: Tensor, log_abs_det: Tensor | None = None):
        self.weight = weight
        self.log_abs_det = torch.linalg.slogdet(weight).logabsdet if log_abs_det is None else log_abs_det

    def _apply(self, matrix: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        positions = math.prod(x.shape[2:])
        return torch.einsum("ij,bj...->bi...", matrix, x), (positions * self.log_abs_det).expand(len(x))

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply(self.weight, x)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, ladj = self._apply(torch.linalg.inv(self.weight), y)
        return x, -ladj


class Squeeze(Transform):
    """Space to depth (Dinh et al. 2017, Sec. 3.6): ``(B, C, H, W) -> (B, 4C, H/2, W/2)``, each
    2x2 square of a channel becoming 4 channels; a permutation, ladj = 0."""

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_unshuffle(x, 2), _no_volume_change(x)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return F.pixel_shuffle(y, 2), _no_volume_change(y)


class Reshape(Transform):
    """Each example from ``shape`` to ``new_shape`` (e.g. an image flattened to a vector)."""

    def __init__(self, shape: tuple[int, ...], new_shape: tuple[int, ...]):
        if math.prod(shape) != math.prod(new_shape):
            raise ValueError(f"cannot reshape {shape} to {new_shape}")
        self.shape, self.new_shape = tuple(shape), tuple(new_shape)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x.reshape(len(x), *self.new_shape), _no_volume_change(x)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return y.reshape(len(y), *self.shape), _no_volume_change(y)


class Split(Transform):
    """The multi-scale factoring out (Dinh et al. 2017, Sec. 3.6): ``inner`` transforms the first
    ``keep`` channels (dim 1); the others are factored out as they are, so they reach the base
    distribution directly, in place."""

    def __init__(self, inner: Transform, keep: int):
        self.inner, self.keep = inner, keep

    def _through(self, apply, x: Tensor) -> tuple[Tensor, Tensor]:
        on, out = x[:, :self.keep], x[:, self.keep:]
        on, ladj = apply(on)
        return torch.cat([on, out], 1), ladj

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._through(self.inner.call_and_ladj, x)

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._through(self.inner.inverse_and_ladj, y)
