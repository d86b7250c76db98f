"""Point-cloud distances against cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics import mmd_rbf, wasserstein2


def test_w2_between_point_masses_is_their_distance() -> None:
    assert wasserstein2(np.array([[0.0, 0.0]]), np.array([[3.0, 4.0]])) == pytest.approx(5.0)


def test_w2_of_a_shifted_copy_is_the_shift_length() -> None:
    x = np.random.default_rng(0).standard_normal((300, 2))
    assert wasserstein2(x, x + [0.3, -0.4]) == pytest.approx(0.5, abs=1e-6)
    assert wasserstein2(x, x) == pytest.approx(0.0, abs=1e-6)


def test_w2_allows_unequal_sizes() -> None:
    base = np.random.default_rng(1).standard_normal((50, 2))
    assert wasserstein2(np.tile(base, (3, 1)), np.tile(base, (2, 1))) == pytest.approx(0.0, abs=1e-6)
    assert wasserstein2(np.zeros((3, 2)), np.ones((7, 2))) == pytest.approx(np.sqrt(2.0))


def test_w2_between_gaussian_samples_is_near_the_mean_shift() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1000, 2))
    y = rng.standard_normal((1000, 2)) + [2.0, 0.0]
    assert wasserstein2(x, y) == pytest.approx(2.0, abs=0.1)


def test_mmd_separates_distributions() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((1000, 2)), rng.standard_normal((1000, 2))
    same = mmd_rbf(x, y)
    shifted = mmd_rbf(x, y + [1.0, 0.0])
    assert abs(same) < 5e-3
    assert shifted > 0.1 and shifted > 20 * abs(same)
    assert mmd_rbf(x, y + [1.0, 0.0], chunk=97) == pytest.approx(shifted, rel=1e-9)


def test_mmd_unbiased_for_unequal_sizes() -> None:
    rng = np.random.default_rng(4)
    values = [mmd_rbf(rng.standard_normal((200, 2)), rng.standard_normal((300, 2))) for _ in range(20)]
    assert abs(np.mean(values)) < 2e-3
    assert min(values) < 0 < max(values)  # the unbiased estimate straddles zero
