"""Progressive distillation (models/progressive_distillation.py) against an exact teacher.

The teacher is the exact denoiser of Gaussian data x1 ~ N(M, S) (tests/test_diffusion.py's
pattern): on a Gaussian path x_t ~ N(alpha M, C_t), C_t = alpha^2 S + sigma^2 I,
E[x1 | x_t] = M + alpha S C_t^{-1} (x_t - alpha M) and E[eps | x_t] = sigma C_t^{-1} (x_t - alpha M).
Its DDIM steps are first-order, so its one-step and two-step maps differ: the distillation target
is not the teacher's own prediction. The "ideal student" outputs the objective's target itself.
"""

import copy

import pytest
import torch
from torch import nn

from models.networks import build_network
from models.objectives import make_objective
from models.pairs import Batch
from models.parameterization import Denoiser, coefficients, from_pivot
from models.paths import CondOTScheduler, DDPMScheduler, VEScheduler, VPScheduler
from models.progressive_distillation import ddim_step, implied_x1
from models.samplers import sample_with, settings_for

D = torch.float64
M = torch.tensor([1.0, -2.0], dtype=D)
LAM, U = torch.linalg.eigh(torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=D))

pytestmark = pytest.mark.usefixtures("one_thread")


class ExactPrediction(nn.Module):
    """forward(x, t): the exact E[x1 | x_t], E[eps | x_t] of the Gaussian data, in ``parameterization``."""

    def __init__(self, scheduler, parameterization: str):
        super().__init__()
        self.scheduler, self.parameterization = scheduler, parameterization

    def forward(self, x, t):
        s = coefficients(self.scheduler, t, x)
        centred = (x - s.alpha * M) @ U / (s.alpha**2 * LAM + s.sigma**2)
        return from_pivot(M + (centred * s.alpha * LAM) @ U.T, (centred * s.sigma) @ U.T, s, self.parameterization)


class IdealStudent(nn.Module):
    """forward(x, t): the objective's target at grid time t (plus ``offset`` in x1), in ``parameterization``."""

    def __init__(self, objective, parameterization: str, offset: float = 0.0):
        super().__init__()
        self.objective, self.parameterization, self.offset = objective, parameterization, offset

    def forward(self, x, t):
        i = (t[:, None] - self.objective.grid[None, :].to(t)).abs().argmin(1)
        assert torch.allclose(self.objective.grid[i].to(t), t, atol=1e-12), "evaluated off the student's grid"
        x1 = self.objective.target(x, i) + self.offset
        s = coefficients(self.objective.model.scheduler, t, x)
        return from_pivot(x1, (x - s.alpha * x1) / s.sigma, s, self.parameterization)


# path, student steps N, teacher's parameterization, student's parameterization
CASES = {
    "ddpm": (lambda: DDPMScheduler("linear", 1000), 4, "epsilon", "v"),
    "cond_ot": (CondOTScheduler, 3, "velocity", "x1"),
    "vp": (VPScheduler, 2, "x1", "v"),
    "ve": (lambda: VEScheduler(0.01, 50.0), 2, "epsilon", "x1"),
}


def exact(scheduler, parameterization: str) -> Denoiser:
    return Denoiser(ExactPrediction(scheduler, parameterization), scheduler, parameterization)


def distillation(case: str):
    """(objective, teacher) for a case; the student is the exact teacher in its own parameterization."""
    make_scheduler, n, teacher_param, student_param = CASES[case]
    scheduler = make_scheduler()
    teacher, student = exact(scheduler, teacher_param), exact(scheduler, student_param)
    return make_objective("progressive_distillation", student, {"teacher": teacher}, student_steps=n), teacher


def gaussian_batch(n: int, seed: int = 0, dtype=D) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x1 = M.to(dtype) + torch.randn(n, 2, generator=g, dtype=dtype) @ torch.diag(LAM.sqrt().to(dtype)) @ U.T.to(dtype)
    return Batch(0, torch.randn(n, 2, generator=g, dtype=dtype), x1, torch.rand(n, generator=g, dtype=dtype))


def ideal(objective, offset: float = 0.0) -> Denoiser:
    """The student that outputs the target, in the parameterization of the objective's student."""
    param = objective.model.parameterization
    return Denoiser(IdealStudent(objective, param, offset), objective.model.scheduler, param)


# ------------------------------------------------------------------ 1: the target, the loss


@pytest.mark.parametrize("case", CASES)
def test_one_student_step_with_the_target_is_two_teacher_steps(case):
    objective, teacher = distillation(case)
    n = objective.student_steps
    x = torch.randn(6, 2, dtype=D, generator=torch.Generator().manual_seed(1)) * 2
    for k in range(n):
        i = torch.full((6,), k)
        t_a, t_mid, t_b = objective.times(i, x)
        two = ddim_step(teacher, ddim_step(teacher, x, t_a, t_mid), t_mid, t_b)
        target = objective.target(x, i)
        one = ddim_step(Denoiser(lambda _x, _t: target, teacher.scheduler, "x1"), x, t_a, t_b)
        assert torch.allclose(one, two, rtol=0, atol=1e-10), (k, (one - two).abs().max())
        assert (target - teacher.x1(x, t_a)).abs().max() > 1e-4  # not the teacher's own estimate
        if k == n - 1 and case != "ve":  # the last step reaches sigma = 0: the target is the teacher's x1
            assert torch.allclose(target, two, rtol=0, atol=1e-12)
            assert torch.allclose(target, teacher.x1(ddim_step(teacher, x, t_a, t_mid), t_mid), atol=1e-12)


def test_implied_x1_inverts_a_ddim_step():
    sched = VPScheduler()
    x_a, x1, eps = torch.randn(3, 5, 2, dtype=D, generator=torch.Generator().manual_seed(2))
    s_a, s_b = (coefficients(sched, t, x_a) for t in (0.3, 0.6))
    x_a = s_a.alpha * x1 + s_a.sigma * eps
    assert torch.allclose(implied_x1(x_a, s_b.alpha * x1 + s_b.sigma * eps, s_a, s_b), x1, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
def test_loss_vanishes_for_the_ideal_student_only(case):
    objective, _ = distillation(case)
    batch = gaussian_batch(64)
    assert float(objective.loss(ideal(objective), batch)) < 1e-20
    # a student off by 0.1 in x1 pays at least 0.1^2: the truncated-SNR weight is >= 1
    assert float(objective.loss(ideal(objective, offset=0.1), batch)) >= 0.01 * (1 - 1e-9)
    # the teacher's own one-step predictions are not the two-step map
    assert float(objective.loss(objective.model, batch)) > 1e-6


def test_loss_weights_the_x1_error_by_truncated_snr():
    objective, _ = distillation("cond_ot")  # N = 3: t_i = 0, 1/3, 2/3, SNR = 0, 1/4, 4
    for u, weight in ((0.1, 1.0), (0.5, 1.0), (0.9, 4.0)):
        batch = gaussian_batch(8)
        batch.t = torch.full((8,), u, dtype=D)
        assert float(objective.loss(ideal(objective, offset=0.1), batch)) == pytest.approx(weight * 0.01, rel=1e-9)


# ------------------------------------------------------------------ 2: grids and inputs


def test_grids_nest_on_ddpm():
    objective, _ = distillation("ddpm")  # T = 1000, N = 4: the teacher visits every 125th step
    steps = lambda grid: torch.round((1 - grid) * 1000).long().tolist()  # noqa: E731
    assert steps(objective.grid) == [1000, 750, 500, 250, 0]
    assert steps(objective.teacher_grid) == [1000, 875, 750, 625, 500, 375, 250, 125, 0]


@pytest.mark.parametrize("student_steps", [6, 0, 2.0, True])
def test_bad_student_steps_are_one_line(student_steps):
    sched = DDPMScheduler("cosine", 10)  # 6 student steps need 12 teacher steps of 10
    teacher = exact(sched, "epsilon")
    with pytest.raises(ValueError, match="^student_steps: ") as err:
        make_objective("progressive_distillation", copy.deepcopy(teacher), {"teacher": teacher},
                       student_steps=student_steps)
    assert "\n" not in str(err.value)


def test_grids_that_do_not_nest_are_refused(monkeypatch):
    # trailing grids of 2N <= T steps always nest (the same real times, rounded): break time_grid to see the check
    monkeypatch.setattr("models.progressive_distillation.time_grid",
                        lambda scheduler, steps: torch.linspace(0.0, 1.0, steps + 1, dtype=D) ** (1 + steps))
    teacher = exact(CondOTScheduler(), "v")
    with pytest.raises(ValueError, match="^student_steps: the grid of 2 steps is not every other point") as err:
        make_objective("progressive_distillation", copy.deepcopy(teacher), {"teacher": teacher}, student_steps=2)
    assert "\n" not in str(err.value)


def test_teacher_on_another_path_is_refused():
    teacher, student = exact(VPScheduler(), "v"), exact(CondOTScheduler(), "v")
    with pytest.raises(ValueError, match="^teacher: "):
        make_objective("progressive_distillation", student, {"teacher": teacher}, student_steps=2)
    with pytest.raises(TypeError, match="takes no option 'eta'"):
        make_objective("progressive_distillation", student, {"teacher": student}, student_steps=2, eta=0.0)


# ------------------------------------------------------------------ 3: training a network


@pytest.mark.parametrize("scheduler", [CondOTScheduler(), DDPMScheduler("linear", 1000)], ids=["cond_ot", "ddpm"])
def test_mlp_student_learns_and_the_teacher_stays_frozen(scheduler):
    torch.manual_seed(0)
    teacher = Denoiser(build_network("mlp", (2,), hidden=32, layers=3, time_dim=8), scheduler, "v")
    student = copy.deepcopy(teacher)  # as the worker does: the student starts from the teacher
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    objective = make_objective("progressive_distillation", student, {"teacher": teacher}, student_steps=2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3, weight_decay=0.0)
    probe = gaussian_batch(512, seed=99, dtype=torch.float32)
    with torch.no_grad():
        before = float(objective.loss(student, probe))
    for step in range(60):
        optimizer.zero_grad()
        loss = objective.loss(student, gaussian_batch(256, seed=step, dtype=torch.float32))
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        optimizer.step()
    with torch.no_grad():
        after = float(objective.loss(student, probe))
    assert after < 0.25 * before, (before, after)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, frozen[k]) for k, v in teacher.state_dict().items())


def test_teacher_is_called_without_grad():
    teacher = Denoiser(build_network("mlp", (2,), hidden=8, layers=2, time_dim=4), CondOTScheduler(), "v")
    student = copy.deepcopy(teacher)
    objective = make_objective("progressive_distillation", student, {"teacher": teacher}, student_steps=2)
    teacher.requires_grad_(True)  # even if someone turns its gradients back on
    objective.loss(objective.model, gaussian_batch(16, dtype=torch.float32)).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())


# ------------------------------------------------------------------ 4, 5: sampling the student


@pytest.mark.parametrize("case", CASES)
def test_ideal_student_at_n_steps_samples_as_the_teacher_at_2n(case):
    objective, teacher = distillation(case)
    n = objective.student_steps
    (coarse,), (fine,) = (settings_for("ddim", [k], {}) for k in (n, 2 * n))
    x = teacher.prior((2,), 32, torch.Generator().manual_seed(3)).to(D)
    student = sample_with(coarse, ideal(objective), x)
    assert student.nfe == n
    reference = sample_with(fine, teacher, x).x
    assert torch.allclose(student.x, reference, rtol=0, atol=1e-10), (student.x - reference).abs().max()
    # the test can fail: the teacher's own n steps land elsewhere
    assert (sample_with(coarse, teacher, x).x - reference).abs().max() > 1e-4
