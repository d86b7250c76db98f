"""Consistency models (models/consistency.py) against closed forms.

The data are test_ode_likelihood's Gaussian PLANE, x1 ~ N(M, S), whose exact denoisers
(``path_model``) are the teachers. Their probability-flow map between any two times is affine
(C_t = alpha^2 S + sigma^2 I all commute): x_b = alpha_b M + C_b^{1/2} C_a^{-1/2} (x_a - alpha_a M).
The map to t_end is the ideal consistency function (``FlowMap``); the teacher's own denoiser
E[x1 | x_t] is a wrong one.
"""

import math

import pytest
import torch

from test_ode_likelihood import PLANE, path_model

from models.checkpoint import FAMILIES, ModelSpec, load_model, save_model
from models.consistency import (ConsistencyDistillation, ConsistencyModel, ConsistencyTraining, ct_decay, ct_steps,
                                discretization, student_from)
from models.networks import MLP
from models.objectives import OBJECTIVES
from models.pairs import Batch
from models.parameterization import PARAMETERIZATIONS, Denoiser
from models.paths import make_scheduler, time_batch
from models.samplers import SAMPLERS, Setting, sample_with, time_grid

D = torch.float64
PATHS = ("cond_ot", "vp", "ve", "ddpm", "subvp")

pytestmark = pytest.mark.usefixtures("one_thread")


def flow_map(x: torch.Tensor, scheduler, t: torch.Tensor, t_to: float) -> torch.Tensor:
    """The exact probability-flow map of PLANE's path from the times ``t`` (B,) to ``t_to``."""
    a, b = scheduler(t.double()), scheduler(torch.tensor(t_to, dtype=D))
    lam, basis = PLANE.eigenvalues, PLANE.basis
    gain = ((b.alpha**2 * lam + b.sigma**2) / (a.alpha[:, None] ** 2 * lam + a.sigma[:, None] ** 2)).sqrt()
    return b.alpha * PLANE.mean + ((x - a.alpha[:, None] * PLANE.mean) @ basis * gain) @ basis.T


class FlowMap(ConsistencyModel):
    """The ideal consistency function of PLANE: the exact flow map to t_end."""

    def consistency(self, x, t):
        t = time_batch(t, x)
        return torch.where((t >= self.t_end)[:, None], x, flow_map(x, self.scheduler, t, self.t_end))


def mlp_model(scheduler="cond_ot", parameterization="velocity", seed=0) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(MLP(2, 32, 3, time_dim=16), make_scheduler(scheduler), parameterization).double()


def gaussian_batch(n: int, seed: int, step: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(step, torch.randn(n, 2, generator=g, dtype=D), PLANE.sample(n, seed + 1),
                 torch.rand(n, generator=g, dtype=D))


def moments(x):
    mean = x.mean(0)
    return mean, (x - mean).T @ (x - mean) / len(x)


def whitened_normal(n, seed=0):
    """Draws with empirical mean 0 and covariance I exactly."""
    x = torch.randn(n, 2, dtype=D, generator=torch.Generator().manual_seed(seed))
    x = x - x.mean(0)
    return torch.linalg.solve_triangular(torch.linalg.cholesky(x.T @ x / n), x.T, upper=False).T


# ------------------------------------------------------------------ 1: boundary condition, scalings


@pytest.mark.parametrize("path", PATHS)
def test_boundary_condition_is_exact_and_the_scalings_finite(path):
    """f(x, t_end) == x bit for bit for random networks of every parameterization, in float32 and
    float64; c_skip, c_out are finite on the sampler's grid and the training discretization (CondOT's
    t = 0 included), within [0, 1], and continuous into the boundary (c_skip -> 1, c_out -> 0)."""
    for parameterization in PARAMETERIZATIONS:
        model = ConsistencyModel(mlp_model(path, parameterization))
        for dtype in (torch.float32, D):
            x = torch.randn(16, 2, dtype=dtype)
            assert torch.equal(model.to(dtype)(x, model.t_end), x)
    grid = torch.cat([time_grid(model.scheduler, 40), discretization(model, 40)])
    c_skip, c_out = model.scalings(grid)
    assert torch.isfinite(c_skip).all() and torch.isfinite(c_out).all()
    assert (c_skip >= 0).all() and (c_skip <= 1).all() and (c_out >= 0).all() and (c_out <= 1).all()
    near = model.scalings(torch.tensor([model.t_end * (1 - 1e-9)], dtype=D))
    assert abs(float(near[0]) - 1) < 1e-4 and float(near[1]) < 1e-4
    x = torch.randn(8, 2, dtype=D)
    assert torch.isfinite(model(x, 0.0)).all()


def test_scalings_are_the_papers_on_the_network_the_denoiser_implies():
    """c_skip x + c_out D = alpha_end (c_skip^CM y + c_out^CM G) with y = x / alpha, s = sigma / alpha
    and G = (D - c_skip^EDM y) / c_out^EDM: the paper's Appendix C student of the EDM network whose
    denoiser is D. And far from the data end the student made from a teacher is its denoiser."""
    model = ConsistencyModel(mlp_model("vp", "epsilon"))
    t = torch.linspace(0.05, 0.95, 19, dtype=D)
    out = model.scheduler(t)
    s, s0, sd = out.sigma / out.alpha, model.s_end, model.sigma_data
    x, d = torch.randn(19, dtype=D), torch.randn(19, dtype=D)
    y = x / out.alpha
    g = (d - sd**2 / (s**2 + sd**2) * y) / (s * sd / (s**2 + sd**2).sqrt())
    paper = model.alpha_end * (sd**2 / ((s - s0) ** 2 + sd**2) * y + sd * (s - s0) / (s**2 + sd**2).sqrt() * g)
    c_skip, c_out = model.scalings(t)
    torch.testing.assert_close(c_skip * x + c_out * d, paper, rtol=1e-12, atol=1e-12)

    teacher = mlp_model("cond_ot", seed=3)
    student = student_from(teacher)
    x = torch.randn(64, 2, dtype=D)
    with torch.no_grad():
        for t in (0.0, 0.3, 0.5, 0.9):  # f = alpha_end (1 - s0 / s) D + O(s0 / s) y: relative error O(s0)
            d = teacher.x1(x, t)
            assert (student(x, t) - d).abs().max() < 3 * student.s_end * d.abs().max()  # measured 1-1.3 s0


# ------------------------------------------------------------------ 2: distillation loss


@pytest.mark.parametrize("path", ["cond_ot", "vp", "ve", "ddpm"])
def test_the_exact_flow_map_has_no_distillation_loss(path):
    """With the exact teacher, CD at N = 100 (Heun) gives the ideal consistency function a loss
    below 1e-8 (measured 1e-12 .. 5e-10: Heun's local error squared, ~N^-6) and its Euler loss
    is 100x larger (~N^-4); the teacher's denoiser as f has a loss above 1e-5 (measured 2e-4).
    Swapping t_n and t_{n+1} (a teacher step towards the noise) would fail all three."""
    batch = gaussian_batch(4096, seed=0)

    def loss(cls, solver):
        objective = ConsistencyDistillation(cls(path_model(path)), {"teacher": path_model(path)}, steps=100,
                                            solver=solver, target_decay=0.0)
        return float(objective.loss(objective.model, batch))

    ideal = loss(FlowMap, "heun")
    assert ideal < 1e-8
    assert loss(FlowMap, "euler") > 100 * ideal
    assert loss(ConsistencyModel, "heun") > 1e-5


# ------------------------------------------------------------------ 3: target network, gradients


def test_target_moves_by_exactly_mu_and_gradients_reach_only_the_student():
    """After one step the target is mu old + (1 - mu) online; the loss's gradients reach every
    student parameter and neither the teacher's nor the target's."""
    teacher = mlp_model("cond_ot", seed=1)
    student = student_from(teacher)
    objective = ConsistencyDistillation(student, {"teacher": teacher}, steps=8, target_decay=0.9)
    target = objective.modules()["target"]
    assert target.state_dict().keys() == student.state_dict().keys() == teacher.state_dict().keys()
    old = {k: v.clone() for k, v in target.state_dict().items()}
    objective.loss(student, gaussian_batch(64, seed=2)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in [*teacher.parameters(), *target.parameters()])
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    objective.after_step()
    new = student.state_dict()
    assert any(not torch.equal(old[k], new[k]) for k in old)
    for k, v in target.state_dict().items():
        torch.testing.assert_close(v, 0.9 * old[k] + 0.1 * new[k], rtol=0, atol=1e-14)


def test_family_checkpoints_and_teacher_weights_load_into_a_student(tmp_path):
    """The 'consistency' family builds a ConsistencyModel providing 'consistency'; it saves and
    loads as any model, and a teacher's checkpoint loads straight into it."""
    spec = ModelSpec("mlp", (2,), "velocity", "cond_ot", {"hidden": 16, "layers": 2}, family="consistency")
    assert spec.provides() == {"consistency"} and "consistency" in FAMILIES
    model = spec.build()
    assert isinstance(model, ConsistencyModel)
    loaded = load_model(save_model(model, spec, tmp_path / "cm"))
    x = torch.randn(8, 2)
    torch.testing.assert_close(loaded(x, 0.3), model(x, 0.3))
    teacher_spec = ModelSpec("mlp", (2,), "velocity", "cond_ot", {"hidden": 16, "layers": 2})
    teacher = load_model(save_model(teacher_spec.build(), teacher_spec, tmp_path / "teacher"))
    student = spec.build()
    student.load_state_dict(teacher.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(student.parameters(), teacher.parameters()))
    assert {"consistency_distillation", "consistency_training"} <= set(OBJECTIVES) and "consistency" in SAMPLERS


# ------------------------------------------------------------------ 4: sampler


def test_one_step_from_the_exact_flow_map_gives_the_data_at_t_end():
    """CondOT (the prior is the marginal at t = 0): one f of whitened draws (moments 0, I exactly)
    has the moments of the marginal at t_end, N(alpha M, alpha^2 S + sigma^2 I), to 1e-10."""
    model = FlowMap(path_model("cond_ot"))
    out = sample_with(Setting("consistency", nfe=1), model, whitened_normal(4096), torch.Generator().manual_seed(0))
    marginal = PLANE.marginal(model.scheduler, model.t_end)
    mean, cov = moments(out.x)
    torch.testing.assert_close(mean, marginal.mean, rtol=0, atol=1e-10)
    torch.testing.assert_close(cov, marginal.covariance_matrix, rtol=0, atol=1e-10)


def test_multistep_from_the_exact_flow_map_keeps_the_marginal():
    """Re-noising the exact x_{t_end} to t and mapping back (4 steps) stays at the marginal at
    t_end: mean and covariance within 4 standard errors on 20000 draws."""
    model = FlowMap(path_model("cond_ot"))
    n = 20000
    x = model.prior((2,), n, torch.Generator().manual_seed(1)).double()
    out = sample_with(Setting("consistency", nfe=4), model, x, torch.Generator().manual_seed(2))
    marginal = PLANE.marginal(model.scheduler, model.t_end)
    cov_true = marginal.covariance_matrix
    var = torch.diagonal(cov_true)
    mean, cov = moments(out.x)
    assert ((mean - marginal.mean).abs() <= 4 * (var / n).sqrt()).all(), mean
    assert ((cov - cov_true).abs() <= 4 * ((var[:, None] * var[None] + cov_true**2) / n).sqrt()).all(), cov


@pytest.mark.parametrize("path", ["cond_ot", "ddpm"])
def test_multistep_costs_one_network_call_a_step_and_follows_the_seed(path):
    """n steps are n network calls (counted on model.net) and n + 1 trajectory points; the same
    generator seed gives the same samples, another seed other samples (n > 1)."""
    model = ConsistencyModel(mlp_model(path)).eval()
    x = model.prior((2,), 32, torch.Generator().manual_seed(0)).double()
    for n in (1, 2, 5):
        run = lambda seed: sample_with(Setting("consistency", nfe=n), model, x,  # noqa: E731
                                       torch.Generator().manual_seed(seed), trajectory=True)
        a, b, c = run(1), run(1), run(2)
        assert a.nfe == a.rounds == n and len(a.trajectory) == n + 1
        assert torch.equal(a.x, b.x) and torch.isfinite(a.x).all()
        assert torch.equal(a.x, c.x) == (n == 1)


# ------------------------------------------------------------------ 5: a short consistency training


def gaussian_w2(x: torch.Tensor) -> float:
    """Squared W2 between the Gaussian of x's moments and PLANE (Bures formula)."""
    mean, cov = moments(x)
    lam, basis = PLANE.eigenvalues, PLANE.basis
    root = basis @ torch.diag(lam.sqrt()) @ basis.T
    cross = torch.linalg.eigvalsh(root @ cov @ root).clamp(min=0).sqrt().sum()
    return float(((mean - PLANE.mean) ** 2).sum() + torch.trace(PLANE.cov + cov) - 2 * cross)


def test_consistency_training_improves_one_step_samples():
    """300 CT steps (Adam, batch 256, N from 2 to 21) halve the one-step samples' Gaussian W2^2 to
    PLANE (measured 5.4 -> 2.2; the ratio is 0.39 .. 0.41 over four initial seeds)."""
    model = ConsistencyModel(mlp_model("cond_ot", seed=0))
    prior = model.prior((2,), 4000, torch.Generator().manual_seed(5)).double()
    one_step = lambda: sample_with(Setting("consistency", nfe=1), model, prior).x  # noqa: E731
    before = gaussian_w2(one_step())
    steps = 300
    objective = ConsistencyTraining(model, total_steps=steps, s1=20, mu0=0.9)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for k in range(steps):
        loss = objective.loss(model, gaussian_batch(256, seed=1000 + 2 * k, step=k))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.after_step()
    assert gaussian_w2(one_step()) < 0.5 * before


# ------------------------------------------------------------------ 6: schedules


def test_ct_schedules():
    """N(0) = s0, N(K) = s1 + 1 (and after K); mu(0) = mu0; both non-decreasing, mu < 1."""
    K = 1000
    n = [ct_steps(k, K, 2, 150) for k in range(0, K + 1, 10)]
    mu = [ct_decay(k, K, 2, 150, 0.9) for k in range(0, K + 1, 10)]
    assert n[0] == 2 and n[-1] == 151 and ct_steps(2 * K, K, 2, 150) == 151
    assert all(a <= b for a, b in zip(n, n[1:])) and all(a <= b < 1 for a, b in zip(mu, mu[1:]))
    assert mu[0] == pytest.approx(0.9) and mu[-1] == pytest.approx(math.exp(2 * math.log(0.9) / 151))
    assert ct_decay(K, K, 2, 150, 0.0) == 0.0


def test_discretizations_run_from_the_noise_to_t_end():
    model = ConsistencyModel(mlp_model("vp"))
    for spacing in ("uniform", "karras"):
        grid = discretization(model, 18, spacing)
        assert grid[0] == 0 and grid[-1] == model.t_end and (grid.diff() > 0).all()
    s = model.scheduler(discretization(model, 18, "karras"))
    levels = (s.sigma / s.alpha) ** (1 / 7)  # Karras: uniform in s^(1/rho)
    torch.testing.assert_close(levels.diff(), levels.diff().mean().expand(17), rtol=1e-6, atol=0)


# ------------------------------------------------------------------ 7: bad options


@pytest.mark.parametrize("cls,options,name", [
    (ConsistencyDistillation, {"solver": "rk45"}, "solver"),
    (ConsistencyDistillation, {"distance": "lpips"}, "distance"),
    (ConsistencyDistillation, {"steps": 1}, "steps"),
    (ConsistencyDistillation, {"target_decay": 1.5}, "target_decay"),
    (ConsistencyDistillation, {"spacing": "karras"}, "spacing"),  # CondOT: s(0) is infinite
    (ConsistencyTraining, {}, "total_steps"),
    (ConsistencyTraining, {"total_steps": 10, "s0": 1}, "s0"),
    (ConsistencyTraining, {"total_steps": 10, "mu0": 1.0}, "mu0"),
    (ConsistencyTraining, {"total_steps": 10, "distance": "l1"}, "distance"),
])
def test_bad_options_name_themselves(cls, options, name):
    teacher = mlp_model("cond_ot")
    with pytest.raises(ValueError) as error:
        cls(student_from(teacher), {"teacher": teacher}, **options)
    assert str(error.value).startswith(f"{name}: ") and "\n" not in str(error.value)


def test_a_teacher_on_another_path_or_a_plain_denoiser_is_refused():
    teacher = mlp_model("cond_ot")
    with pytest.raises(ValueError, match="^teacher: "):
        ConsistencyDistillation(ConsistencyModel(mlp_model("vp")), {"teacher": teacher})
    with pytest.raises(ValueError, match="^model: "):
        ConsistencyTraining(teacher, total_steps=10)
