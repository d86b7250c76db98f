"""Point-cloud distances against cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from models.metrics import mmd_rbf, precision_recall, wasserstein2


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


def test_precision_and_recall_on_known_clouds() -> None:
    """Samples of the same law score near 1 on both; samples that drop half the modes keep
    their precision and lose half the recall; samples off the data lose precision."""
    rng = np.random.default_rng(5)
    modes = np.array([[-4.0, 0.0], [4.0, 0.0]])
    real = modes[rng.integers(0, 2, 2000)] + 0.3 * rng.standard_normal((2000, 2))
    same = modes[rng.integers(0, 2, 2000)] + 0.3 * rng.standard_normal((2000, 2))
    one_mode = modes[np.zeros(2000, dtype=int)] + 0.3 * rng.standard_normal((2000, 2))
    scores = precision_recall(same, real)
    assert scores["precision"] > 0.95 and scores["recall"] > 0.95
    dropped = precision_recall(one_mode, real)
    assert dropped["precision"] > 0.95 and dropped["recall"] == pytest.approx(0.5, abs=0.03)
    assert precision_recall(real + [0.0, 3.0], real) == {"precision": 0.0, "recall": 0.0}
    tiny = np.zeros((3, 2))
    with pytest.raises(ValueError, match="more than k=3 points"):
        precision_recall(tiny, real)


def test_precision_counts_a_point_on_a_ball_edge() -> None:
    """One real point's ball reaches its 3rd neighbour: a fake point at that distance is inside."""
    real = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]])
    assert precision_recall(np.array([[0.0, 3.0], [10.0, 0.0], [20.0, 0.0], [30.0, 0.0]]), real)["precision"] == 0.25


def test_scoring_blocks_and_summary():
    from models.metrics import scoring_blocks, summarize_blocks

    real = np.arange(40, dtype=float)[:, None]
    samples = {"nfe=4": np.arange(100, 130, dtype=float)[:, None], "baseline": np.full((10, 1), 7.0)}
    blocks = scoring_blocks(real, samples, n=10, sets=3, seed=0)
    assert sorted(blocks) == [
        ("baseline", 0), ("floor", 0), ("floor", 1), ("floor", 2), ("nfe=4", 0), ("nfe=4", 1), ("nfe=4", 2)
    ]
    np.testing.assert_array_equal(blocks[("nfe=4", 1)][:, 0], np.arange(110, 120))
    assert not np.array_equal(blocks[("floor", 0)], blocks[("floor", 1)])  # different random subsets
    scores = {key: {"m": float(x.mean())} for key, x in blocks.items()}
    metrics = summarize_blocks(scores)
    assert metrics["m@nfe=4"] == pytest.approx(114.5)  # blocks average 104.5, 114.5, 124.5
    assert metrics["m_sd@nfe=4"] == pytest.approx(10.0)
    assert metrics["m@baseline"] == 7.0  # one set: a mean and no spread
    assert set(metrics) == {"m@nfe=4", "m_sd@nfe=4", "m_floor", "m_sd_floor", "m@baseline"}
    assert set(summarize_blocks({("floor", 0): {"m": 1.0}})) == {"m_floor"}
    for bad in (np.zeros((25, 1)), np.zeros((40, 1)), np.zeros((5, 1))):  # partial set, too many, too few
        with pytest.raises(ValueError, match="expected 1 to 3 whole sets of 10"):
            scoring_blocks(real, {"x": bad}, n=10, sets=3, seed=0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_points_are_refused_not_scored(bad: float) -> None:
    """A NaN cloud once read as W2 = 0 (exact OT on a NaN cost matrix)."""
    x = np.random.default_rng(3).standard_normal((40, 2))
    y = x.copy()
    y[7, 1] = bad
    for score in (wasserstein2, mmd_rbf):
        with pytest.raises(ValueError, match="1 of 80 coordinates are not finite"):
            score(y, x)
