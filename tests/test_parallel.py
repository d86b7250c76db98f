"""models.parallel (ParaDiGMS Picard sampling) on the exact Gaussian model of test_diffusion, and
the accounting of rounds (sequential network calls) beside NFE from sample_with to the metrics.

The reference is always the sequential sampler on the same grid from the same draws: Picard
converges to its fixed point, so the bound is C * tol with C = 4 (the largest ratio measured,
max abs difference / tol, is 3.0: picard_ddim on CondOT, N = 100, whole-grid window, tol = 1e-3;
picard_euler stays below 0.2).
"""

import numpy as np
import pytest
import torch

from models.parallel import picard
from models.paths import CondOTScheduler, DDPMScheduler
from models.samplers import sample_with, settings_for
from models.sampling import Sampler
from tasks.evaluate import _load_samples, cost_metrics
from tasks.infra import Ref
from tasks.sample import ShardFolder
from test_diffusion import D, exact_model, setting, whitened_normal
from test_sampling import ddpm_dir  # noqa: F401 (a fixture)

SEQUENTIAL = {"picard_euler": "euler", "picard_ddim": "ddim"}
PATHS = {"ddpm": lambda: DDPMScheduler("linear", 1000), "cond_ot": CondOTScheduler}
C = 4.0

pytestmark = pytest.mark.usefixtures("one_thread")


def run(method, n, model, x, **params):
    return sample_with(setting(method, n, **params), model, x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", SEQUENTIAL)
@pytest.mark.parametrize("window", [1, 2, 16, 50, 1000])
def test_picard_matches_the_sequential_sampler(path, method, window):
    """N = 50, tol = 1e-3 and 1e-4: max abs difference to euler / ddim (eta = 0) <= 4 tol; a window
    of 1 is the sequential sampler (one point a round: N rounds and N evaluations, to 1e-12); a
    larger one takes fewer rounds than N, at least N evaluations and at most `window` a round
    (counting, on DDPM, picard_euler's final jump as one round, as euler counts it in its N)."""
    model, x, n = exact_model(PATHS[path]()), whitened_normal(64), 50
    reference = run(SEQUENTIAL[method], n, model, x)
    assert reference.rounds == reference.nfe == n
    for tol in (1e-3, 1e-4) if window > 1 else (1e-3,):
        out = run(method, n, model, x, window=window, tol=tol)
        error = (out.x - reference.x).abs().max().item()
        if window == 1:
            assert error <= 1e-12 and out.rounds == out.nfe == n, (error, out.rounds, out.nfe)
        else:
            assert error <= C * tol, error
            assert out.rounds < n <= out.nfe <= window * out.rounds, (out.rounds, out.nfe)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("method", SEQUENTIAL)
def test_a_whole_grid_window_takes_few_rounds(path, method):
    """N = 100, window = N, default tol (1e-3): rounds <= N / 4 (measured 6 to 12), evaluations >= N
    (312 to 573) and the result within 4 tol of the sequential sampler's."""
    model, x, n = exact_model(PATHS[path]()), whitened_normal(64), 100
    out = run(method, n, model, x, window=n)
    assert out.rounds <= n / 4 and out.nfe >= n, (out.rounds, out.nfe)
    assert (out.x - run(SEQUENTIAL[method], n, model, x).x).abs().max().item() <= C * 1e-3


@pytest.mark.parametrize("method", SEQUENTIAL)
def test_zero_tolerance_gives_the_sequential_values_in_at_most_n_rounds(method):
    """tol = 0 accepts a point only after every point before it stopped moving exactly: the
    sequential result (to 1e-12), still in at most N rounds, one point settled at least a round."""
    model, x, n = exact_model(), whitened_normal(16), 30
    out = run(method, n, model, x, window=n, tol=0.0)
    assert (out.x - run(SEQUENTIAL[method], n, model, x).x).abs().max().item() <= 1e-12
    assert out.rounds <= n < out.nfe


def test_every_round_accepts_at_least_one_point():
    """A network term that never settles (a new random value each call) still ends in exactly
    `steps` rounds with one point accepted a round, each reported once, in order."""
    noise = torch.Generator().manual_seed(0)
    calls, seen = [], []

    def network_part(points, first):
        calls.append((first, len(points)))
        return torch.randn(points.shape, generator=noise, dtype=points.dtype)

    picard(torch.zeros(3, 2, dtype=D), [1.0] * 10, network_part, [1.0] * 11, window=4, tol=1e-3,
           callback=lambda i, _: seen.append(i))
    assert calls == [(i, min(4, 10 - i)) for i in range(10)] and seen == list(range(1, 11))


@pytest.mark.parametrize("method", SEQUENTIAL)
def test_trajectory_and_determinism(method):
    """The trajectory holds the N + 1 grid points, each within 4 tol of the sequential one, and ends
    at the output; the result is the same bit for bit whatever the generator (nothing is drawn)."""
    model, x, n = exact_model(), whitened_normal(32), 20
    st = setting(method, n, window=8)
    out = sample_with(st, model, x, torch.Generator().manual_seed(0), trajectory=True)
    reference = sample_with(setting(SEQUENTIAL[method], n), model, x, trajectory=True)
    assert out.trajectory.shape == reference.trajectory.shape == (n + 1, 32, 2)
    assert torch.equal(out.trajectory[-1], out.x)
    assert (out.trajectory - reference.trajectory).abs().max().item() <= C * 1e-3
    assert torch.equal(out.x, sample_with(st, model, x, torch.Generator().manual_seed(1)).x)


def test_window_is_an_integer_and_labels_carry_the_parameters():
    with pytest.raises(ValueError, match="^window: .*an integer"):
        settings_for("picard_ddim", [10], {"window": 2.5})
    with pytest.raises(ValueError, match="^window:"):
        settings_for("picard_euler", [10], {"window": 0})
    (st,) = settings_for("picard_ddim", [50], {"window": 8, "tol": 1e-4})
    assert set(st.label.split(",")) == {"picard_ddim", "nfe=50", "window=8", "tol=0.0001", "spacing=trailing"}
    assert st.kwargs["window"] == 8 and isinstance(st.kwargs["window"], int)


# ------------------------------------------------------------------ accounting: rounds beside NFE


def test_sample_with_counts_rows_as_evaluations_and_calls_as_rounds():
    """An independent hook on the network: rounds = its calls, nfe = rows it saw / batch size
    (a window call of p * B rows counts p); sequential samplers: rounds == nfe == N."""
    model, x = exact_model(), whitened_normal(8)
    rows = []  # rows of each network call
    hook = model.net.register_forward_pre_hook(lambda _, args: rows.append(len(args[0])) and None)
    try:
        for method, params in [("euler", {}), ("ddim", {}), ("picard_euler", {"window": 4}),
                               ("picard_ddim", {"window": 10})]:
            rows.clear()
            out = run(method, 10, model, x, **params)
            assert (out.rounds, out.nfe) == (len(rows), sum(rows) / 8), method
            if method in SEQUENTIAL.values():
                assert out.rounds == out.nfe == 10
            else:
                assert out.rounds < 10 < out.nfe, (method, out.rounds, out.nfe)
    finally:
        hook.remove()


def test_a_shard_reports_rounds(ddpm_dir):  # noqa: F811 (the fixture)
    """Sampler.run (what a Ray sampling worker returns) carries rounds: equal to nfe for ddim;
    for its Picard version at most N, and fewer than the evaluations."""
    sampler = Sampler(ddpm_dir, 0, None)
    (ddim,) = settings_for("ddim", [8], {})
    (parallel,) = settings_for("picard_ddim", [8], {"window": 8})
    sequential, picard_run = sampler.run(ddim, 0, 4, seed=1), sampler.run(parallel, 0, 4, seed=1)
    assert sequential["rounds"] == sequential["nfe"] == 8
    assert picard_run["rounds"] <= 8 < picard_run["nfe"]  # untrained: no point settles early (8 rounds, 36 NFE)


def shard(i, nfe, rounds=None):
    result = {"label": "s", "shard": i, "x": np.full((2, 2), float(i), np.float32), "nfe": nfe, "trajectory": None}
    return result if rounds is None else result | {"rounds": rounds}


def test_shard_folder_keeps_rounds_and_reads_files_without_them(tmp_path):
    """Round trip: each shard's rounds next to its nfe in the setting's file. A shard file from
    before rounds were stored (no `rounds`) counts rounds == nfe, and so does a setting file."""
    file = tmp_path / "picard.npz"
    folder = ShardFolder(file, 3)
    folder.save(shard(0, 120, 9))
    folder.save(shard(1, 130, 10))
    np.savez(folder.folder / "2.npz", x=shard(2, 50)["x"], nfe=np.int64(50))  # an old shard
    ShardFolder(file, 3).assemble()
    x, nfe, rounds, energy = _load_samples(Ref("samples", str(file), "h"))
    assert x.shape == (6, 2) and nfe.tolist() == [120, 130, 50] and rounds.tolist() == [9, 10, 50]
    assert energy is None  # no path energy stored: not an ODE sampler's shards
    old = tmp_path / "old.npz"
    np.savez(old, x=x, nfe=np.array([10, 10]))
    assert _load_samples(Ref("samples", str(old), "h"))[2].tolist() == [10, 10]


def test_cost_metrics_name_rounds_where_they_differ_from_nfe():
    picard_label = "picard_ddim,nfe=50,window=16,tol=0.001,spacing=trailing"
    assert cost_metrics(picard_label, np.array([180, 190]), np.array([12, 13])) == {
        f"nfe@{picard_label}": 185.0, f"rounds@{picard_label}": 12.5}
    assert cost_metrics("euler,nfe=10", np.array([10, 10]), np.array([10, 10])) == {}
    assert cost_metrics("dopri5,atol=0.001", np.array([40, 44]), np.array([40, 44])) == {"nfe@dopri5,atol=0.001": 42.0}
