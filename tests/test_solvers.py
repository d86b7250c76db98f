"""ODE solvers: accuracy, transport of an exact Gaussian flow, NFE accounting."""

import math

import pytest
import torch

from models.solvers import FIXED_STEP_METHODS, solve_ode, steps_for_nfe

M = torch.tensor([1.0, -2.0], dtype=torch.float64)
S = torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=torch.float64)
EYE = torch.eye(2, dtype=torch.float64)


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Exact marginal velocity of x_t = t x1 + (1-t) x0, x0 ~ N(0, I), x1 ~ N(M, S) independent.

    u_t(x) = E[x1 - x0 | x_t = x] = M + (t S - (1-t) I) C_t^{-1} (x - t M), C_t = t^2 S + (1-t)^2 I.
    """
    s = t[0].item()
    cov = s**2 * S + (1 - s) ** 2 * EYE
    gain = (s * S - (1 - s) * EYE) @ torch.linalg.inv(cov)
    return M + ((x - s * M)[:, None, :] * gain).sum(-1)  # batched gain @ x, without BLAS threads


def whitened_normal(n: int, seed: int = 0) -> torch.Tensor:
    """Samples whose empirical mean is 0 and covariance I exactly: the flow is affine,
    so the moments it produces are then exact up to the solver's error."""
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x = x - x.mean(0)
    chol = torch.linalg.cholesky(x.T @ x / n)
    return torch.linalg.solve_triangular(chol, x.T, upper=False).T


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.mean(0)
    return mean, (x - mean).T @ (x - mean) / len(x)


@pytest.mark.parametrize(
    "method,kwargs", [("rk4", {"steps": 20}), ("dopri5", {"atol": 1e-7, "rtol": 1e-7})]
)
def test_exact_gaussian_flow_reaches_target_moments(method, kwargs):
    out = solve_ode(gaussian_velocity, whitened_normal(4000), method=method, **kwargs)
    mean, cov = moments(out.x)
    torch.testing.assert_close(mean, M, atol=1e-4, rtol=0)
    torch.testing.assert_close(cov, S, atol=1e-4, rtol=0)


def test_exact_gaussian_flow_with_raw_samples_within_sampling_error():
    x0 = torch.randn(4000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    mean, cov = moments(solve_ode(gaussian_velocity, x0, method="rk4", steps=20).x)
    torch.testing.assert_close(mean, M, atol=0.1, rtol=0)
    torch.testing.assert_close(cov, S, atol=0.1, rtol=0)


def test_single_euler_step_misses_the_covariance():
    # u_0(x) = M - x, so one Euler step collapses every sample onto M.
    _, cov = moments(solve_ode(gaussian_velocity, whitened_normal(4000), method="euler", steps=1).x)
    assert (cov - S).abs().max() > 0.5


def test_backward_integration_inverts_forward():
    x0 = whitened_normal(100, seed=1)
    x1 = solve_ode(gaussian_velocity, x0, method="rk4", steps=40).x
    back = solve_ode(gaussian_velocity, x1, method="rk4", steps=40, t0=1.0, t1=0.0).x
    torch.testing.assert_close(back, x0, atol=1e-5, rtol=0)


FIELDS = {  # name -> (velocity, exact x(1) from x(0) = 1)
    "autonomous": (lambda x, t: x, math.e),
    "time_dependent": (lambda x, t: x * (1 + t[:, None]), math.exp(1.5)),
}


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize(
    "method,order,steps", [("euler", 1, 64), ("midpoint", 2, 16), ("heun", 2, 16), ("rk4", 4, 8)]
)
def test_order_of_accuracy(field, method, order, steps):
    velocity, exact = FIELDS[field]
    x0 = torch.ones(1, 1, dtype=torch.float64)

    def error(n: int) -> float:
        return abs(solve_ode(velocity, x0, method=method, steps=n).x.item() - exact)

    observed = math.log2(error(steps) / error(2 * steps))
    assert abs(observed - order) < 0.2, observed


class CountingField:
    def __init__(self):
        self.calls = 0
        self.times: list[torch.Tensor] = []

    def __call__(self, x, t):
        self.calls += 1
        self.times.append(t)
        return -x


@pytest.mark.parametrize(
    "method,nfe,steps", [("euler", 8, 8), ("midpoint", 8, 4), ("heun", 8, 4), ("rk4", 4, 1)]
)
def test_fixed_step_nfe_is_exact(method, nfe, steps):
    field = CountingField()
    out = solve_ode(field, torch.zeros(3, 2), method=method, nfe=nfe, return_trajectory=True)
    assert out.nfe == field.calls == nfe
    assert steps_for_nfe(method, nfe) == steps
    assert out.trajectory.shape == (steps + 1, 3, 2)
    assert all(t.shape == (3,) for t in field.times)


def test_dopri5_reports_its_calls_deterministically():
    counts = []
    for _ in range(2):
        field = CountingField()
        out = solve_ode(
            field, torch.ones(3, 2), method="dopri5", return_trajectory=True, trajectory_points=5
        )
        assert out.nfe == field.calls > 0
        counts.append(out.nfe)
        torch.testing.assert_close(out.x, torch.full((3, 2), math.exp(-1.0)), atol=1e-4, rtol=0)
        assert out.trajectory.shape == (5, 3, 2)
    assert counts[0] == counts[1]


def test_trajectory_starts_at_x0_and_ends_at_x():
    x0 = torch.randn(4, 2)
    out = solve_ode(lambda x, t: -x, x0, method="heun", steps=5, return_trajectory=True)
    assert torch.equal(out.trajectory[0], x0) and torch.equal(out.trajectory[-1], out.x)
    assert solve_ode(lambda x, t: -x, x0, method="heun", steps=5).trajectory is None


def test_solver_runs_without_grad():
    w = torch.ones(2, requires_grad=True)
    out = solve_ode(lambda x, t: x * w, torch.ones(3, 2), method="euler", steps=2)
    assert not out.x.requires_grad


def test_nfe_validation():
    with pytest.raises(ValueError, match=r"rk4.*multiple of 4"):
        steps_for_nfe("rk4", 6)
    with pytest.raises(ValueError, match="multiple of 2"):
        steps_for_nfe("midpoint", 0)
    with pytest.raises(ValueError):
        solve_ode(lambda x, t: x, torch.ones(1, 1), method="euler", steps=2, nfe=2)
    with pytest.raises(ValueError):
        solve_ode(lambda x, t: x, torch.ones(1, 1), method="dopri5", nfe=10)
    with pytest.raises(ValueError, match="euler"):
        solve_ode(lambda x, t: x, torch.ones(1, 1), method="leapfrog")
    assert set(FIXED_STEP_METHODS) == {"euler", "midpoint", "heun", "rk4"}
