"""The 2-D toy distributions: samplers with fixed seeds, and the closed-form log-density where
there is one (the NLL floor a likelihood model approaches).

Toy scales (fixed constants, never estimated from the sample, so every split shares one
transform; each coordinate ends up with roughly zero mean and standard deviation near 1):

- ``moons``: sklearn ``make_moons`` (noise 0.05), shifted by (0.5, 0.25) and divided by
  (0.87, 0.50), its population mean and standard deviation.
- ``eight_gaussians``: 8 modes evenly spaced on a circle of radius sqrt(2), std 0.1.
- ``s_curve``: the (x, z) coordinates of sklearn ``make_s_curve`` (noise 0.05), divided
  by (0.71, 1.39).
- ``checkerboard``: uniform on the 8 dark squares of a 4 x 4 board covering [-2, 2]^2
  (std about 1.15).
- ``two_spirals``: two interleaved arms of 1.5 turns, noise 0.5, divided by 4.7.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

TOY_2D = ("moons", "eight_gaussians", "s_curve", "checkerboard", "two_spirals")


def _moons(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_moons

    points, _ = make_moons(n, noise=0.05, random_state=seed)
    return (points - (0.5, 0.25)) / (0.87, 0.50)


def _s_curve(n: int, seed: int) -> np.ndarray:
    from sklearn.datasets import make_s_curve

    points, _ = make_s_curve(n, noise=0.05, random_state=seed)
    return points[:, [0, 2]] / (0.71, 1.39)


def _eight_gaussians(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    angles = rng.integers(0, 8, n) * (np.pi / 4)
    centres = np.sqrt(2.0) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centres + 0.1 * rng.standard_normal((n, 2))


def _checkerboard(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-2.0, 2.0, n)
    # y falls in [-2, -1) or [0, 1), then moves up one row where floor(x) is odd,
    # so floor(x) and floor(y) always share parity: the dark squares.
    y = rng.uniform(0.0, 1.0, n) + 2.0 * rng.integers(0, 2, n) - 2.0 + np.floor(x) % 2
    return np.stack([x, y], axis=1)


def _two_spirals(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # sqrt spreads points evenly along the arm, whose length grows with the angle
    angle = np.sqrt(rng.uniform(0.0, 1.0, n)) * 3.0 * np.pi
    arm = np.stack([-np.cos(angle) * angle, np.sin(angle) * angle], axis=1)
    sign = np.where(rng.integers(0, 2, n) == 0, 1.0, -1.0)[:, None]
    return (sign * arm + 0.5 * rng.standard_normal((n, 2))) / 4.7


TOYS: dict[str, Callable[[int, int], np.ndarray]] = {
    "moons": _moons,
    "eight_gaussians": _eight_gaussians,
    "s_curve": _s_curve,
    "checkerboard": _checkerboard,
    "two_spirals": _two_spirals,
}


def _eight_gaussians_log_density(x: np.ndarray) -> np.ndarray:
    """Equal mixture of N(c_k, 0.1^2 I), c_k = sqrt(2) (cos k pi/4, sin k pi/4): the law of
    ``_eight_gaussians``; log-sum-exp over the modes, so far-away points stay finite."""
    std = 0.1
    angles = np.arange(8) * (np.pi / 4)
    centres = np.sqrt(2.0) * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    log_modes = -0.5 * ((x[:, None, :] - centres) ** 2).sum(-1) / std**2 - np.log(2 * np.pi * std**2)
    top = log_modes.max(1)
    return top + np.log(np.exp(log_modes - top[:, None]).sum(1)) - np.log(8)


def _checkerboard_log_density(x: np.ndarray) -> np.ndarray:
    """Uniform on the 8 unit squares of [-2, 2)^2 whose floor(x), floor(y) share parity (total
    area 8, the law of ``_checkerboard``): log(1/8) there, -inf elsewhere."""
    cell = np.floor(x)
    inside = ((x >= -2.0) & (x < 2.0)).all(1) & (cell[:, 0] % 2 == cell[:, 1] % 2)
    return np.where(inside, -np.log(8.0), -np.inf)


# The toys whose density has a closed form; the others do not (moons: sklearn spaces the arc
# points evenly, so its law depends on n; s_curve, two_spirals: an integral along the curve).
_TRUE_LOG_DENSITIES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "eight_gaussians": _eight_gaussians_log_density,
    "checkerboard": _checkerboard_log_density,
}


def true_log_density(name: str, x: np.ndarray) -> np.ndarray | None:
    """log p(x) (nats, float64, one value per row of ``x`` of shape (N, 2)) under the law the
    toy dataset ``name`` is drawn from, or None where it has no closed form. The mean of
    ``-true_log_density`` over a test split is the NLL floor a model's test NLL approaches."""
    density = _TRUE_LOG_DENSITIES.get(name)
    return None if density is None else density(np.asarray(x, dtype=np.float64))
