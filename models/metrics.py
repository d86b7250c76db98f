"""Distances between point clouds, for the 2-D toy datasets."""

from __future__ import annotations

import numpy as np
import torch

# The network simplex needs many more pivots than POT's default (100k) to converge on
# 10,000 x 10,000 problems; stopping early would silently return a worse plan.
EMD_MAX_ITER = 100_000_000
W2_REFERENCE_POINTS = 10_000
MMD_POINTS = 2_000  # MMD is O(n^2): scored on the first 2,000 points of each cloud
NEIGHBOURS = 3  # k of the k-NN balls of precision and recall (Kynkaanniemi et al. 2019's choice)


def reference_set(test: np.ndarray, kind: str, n_reference: int | None = None) -> np.ndarray:
    """What samples are scored against: the held-out split, capped at `n_reference` (by default
    all of it for images, 10,000 points for point clouds)."""
    return test[: n_reference or (W2_REFERENCE_POINTS if kind == "points" else len(test))]


def _as_float64_points(points: np.ndarray) -> np.ndarray:
    """Points as float64 rows; NaN or infinite coordinates are refused (exact OT would read a NaN
    cloud as at distance 0 from anything)."""
    array = np.asarray(points, dtype=np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"{int(array.size - np.isfinite(array).sum())} of {array.size} coordinates are not finite")
    return array.reshape(len(array), -1)


def wasserstein2(x: np.ndarray, y: np.ndarray) -> float:
    """Exact 2-Wasserstein distance between two uniform empirical measures (sizes may differ).

    Solves the optimal transport linear programme with POT; memory grows with
    len(x) * len(y) (about 4.6 GB peak for 10,000 x 10,000 points).
    """
    import ot  # heavy import (scikit-learn): only where W2 is computed

    x, y = _as_float64_points(x), _as_float64_points(y)
    cost = ot.dist(x, y, metric="sqeuclidean")
    a = np.full(len(x), 1.0 / len(x))
    b = np.full(len(y), 1.0 / len(y))
    squared = ot.emd2(a, b, cost, numItermax=EMD_MAX_ITER)
    return float(np.sqrt(max(float(squared), 0.0)))


def point_scores(x: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """What a point-cloud sample set scores: exact W2 against the whole reference, MMD on the
    first MMD_POINTS of each."""
    return {
        "w2": wasserstein2(x, reference),
        "mmd": mmd_rbf(x[:MMD_POINTS], reference[:MMD_POINTS]),
        **precision_recall(x[:MMD_POINTS], reference[:MMD_POINTS]),
    }


def precision_recall(fake: np.ndarray, real: np.ndarray, k: int = NEIGHBOURS) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al., NeurIPS 2019, Eq. 1-2): each cloud's
    manifold is the union of balls around its points reaching their k-th nearest neighbour in
    the same cloud; precision is the share of `fake` points inside the real manifold (quality),
    recall the share of `real` points inside the fake one (coverage: a dropped mode lowers it)."""
    a = torch.from_numpy(_as_float64_points(fake))
    b = torch.from_numpy(_as_float64_points(real))
    if min(len(a), len(b)) <= k:
        raise ValueError(f"precision and recall need more than k={k} points in each cloud, got {len(a)} and {len(b)}")

    def radii(points: torch.Tensor) -> torch.Tensor:  # the k-th neighbour but itself (distance 0)
        return torch.cdist(points, points).kthvalue(k + 1, dim=1).values

    across = torch.cdist(a, b)  # fake x real
    return {
        "precision": float((across <= radii(b)[None, :]).any(dim=1).double().mean()),
        "recall": float((across <= radii(a)[:, None]).any(dim=0).double().mean()),
    }


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidths: torch.Tensor, chunk: int) -> float:
    """Sum over all pairs of the multi-bandwidth RBF kernel, a block of rows at a time."""
    total = torch.zeros((), dtype=torch.float64)
    scales = (-0.5 / bandwidths**2).view(-1, 1, 1)
    for start in range(0, len(a), chunk):
        squared = torch.cdist(a[start : start + chunk], b).square()
        total += torch.exp(scales * squared).sum()
    return float(total)


def mmd_rbf(
    x: np.ndarray,
    y: np.ndarray,
    bandwidths: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0),
    chunk: int = 1024,
) -> float:
    """Unbiased MMD^2 with a sum of RBF kernels; chunked so 10k x 10k never builds a full matrix.

    A sum over several bandwidths avoids tuning one bandwidth per dataset.
    """
    xt = torch.from_numpy(_as_float64_points(x))
    yt = torch.from_numpy(_as_float64_points(y))
    bw = torch.tensor(bandwidths, dtype=torch.float64)
    n, m, k = len(xt), len(yt), len(bandwidths)
    # each self-pair contributes exp(0) = 1 per bandwidth; the unbiased estimate leaves them out
    within_x = (_kernel_sum(xt, xt, bw, chunk) - n * k) / (n * (n - 1))
    within_y = (_kernel_sum(yt, yt, bw, chunk) - m * k) / (m * (m - 1))
    across = _kernel_sum(xt, yt, bw, chunk) / (n * m)
    return within_x + within_y - 2.0 * across


def scoring_blocks(real: np.ndarray, samples: dict[str, np.ndarray], n: int, sets: int, seed: int) -> dict:
    """What a sample-quality protocol scores, keyed (label, k): every sample array cut into its
    consecutive blocks of n (1 to `sets` of them), and `sets` random subsets of n real examples
    under the label "floor"."""
    rng = np.random.default_rng(seed)
    blocks = {("floor", k): real[rng.permutation(len(real))[:n]] for k in range(sets)}
    for label, x in samples.items():
        count, rest = divmod(len(x), n)
        if rest or not 1 <= count <= sets:
            raise ValueError(f"sample set {label!r} has {len(x)} samples; expected 1 to {sets} whole sets of {n}")
        blocks |= {(label, k): x[k * n:(k + 1) * n] for k in range(count)}
    return blocks


def summarize_blocks(scores: dict) -> dict[str, float]:
    """Per-block scores {(label, k): {metric: value}} -> `<metric>@<label>` (mean over the label's
    blocks), `<metric>_floor` for the real data, and where a label has more than one block the
    spread `<metric>_sd@<label>` / `<metric>_sd_floor` (sample standard deviation)."""
    def key(metric: str, label: str) -> str:
        return f"{metric}_floor" if label == "floor" else f"{metric}@{label}"

    by_label: dict[str, list[dict]] = {}
    for (label, _), values in sorted(scores.items(), key=lambda item: item[0][1]):
        by_label.setdefault(label, []).append(values)
    metrics: dict[str, float] = {}
    for label, per_set in by_label.items():
        for name in per_set[0]:
            values = [v[name] for v in per_set]
            metrics[key(name, label)] = float(np.mean(values))
            if len(values) > 1:
                metrics[key(f"{name}_sd", label)] = float(np.std(values, ddof=1))
    return metrics
