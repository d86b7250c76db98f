"""How source and data samples are paired inside a minibatch.

Pairing by minibatch optimal transport straightens the conditional paths (lower
transport cost, fewer crossings), so fewer ODE steps suffice at sampling time.
The plan is computed on CPU with POT; ``plan_indices`` is exposed so a data loader
can compute it ahead of time and apply it later with ``x1[indices]``.
"""

from __future__ import annotations

import abc

import numpy as np
import torch
from torch import Tensor


class Coupling(abc.ABC):
    """Re-pairs a batch of sources with a batch of data samples (``generator``: where a coupling
    that draws pairs at random takes its randomness, so a batch stays a function of its step)."""

    #: Whether pairing a batch costs real work (an OT plan): then batches are worth building
    #: ahead of the training step in another thread (``models.pairs.PairSampler.stream``).
    costly: bool = False

    @abc.abstractmethod
    def __call__(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]: ...


class IndependentCoupling(Coupling):
    """Keep the pairing as drawn: the product of the marginals."""

    def __call__(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return x0, x1


class MinibatchOTCoupling(Coupling):
    """Pair each source with a data sample by the minibatch OT plan between the two batches
    (Tong et al. 2024, OT-CFM: exact OT; SB-CFM: entropic OT with ``reg = 2 sigma^2``).

    ``method="exact"`` solves the assignment with ``ot.emd`` (for equal batch sizes the plan is a
    permutation); ``"sinkhorn"`` solves entropic OT with regularisation ``reg`` (Sinkhorn's
    iteration, in the log domain where the plain one underflows), on the squared euclidean cost divided by its largest entry when ``normalize_cost``
    (so ``reg`` means the same at any scale of the data) or on the cost itself (Tong et al.'s
    ``2 sigma^2`` is in the data's units: ``normalize_cost: false``). ``pairs``: ``argmax`` gives
    each source its most likely partner (deterministic; for an exact plan, which is a
    permutation, this is the plan itself); ``sample`` draws each source's partner from its row of
    the plan, pi(j | i), so an entropic plan's pairs are distributed as the plan: both marginals
    are kept (the sources exactly, the data in expectation), where argmax would pile the sources
    onto the data points nearest to them.
    """

    METHODS = ("exact", "sinkhorn")
    PAIRS = ("argmax", "sample")

    costly = True

    def __init__(self, method: str = "exact", reg: float = 0.05, normalize_cost: bool = True, pairs: str = "argmax"):
        if method not in self.METHODS:
            raise ValueError(f"unknown OT method {method!r}; valid choices: {self.METHODS}")
        if pairs not in self.PAIRS:
            raise ValueError(f"pairs: unknown {pairs!r}; valid choices: {self.PAIRS}")
        if not reg > 0:
            raise ValueError(f"reg must be > 0, got {reg}")
        self.method, self.reg, self.normalize_cost, self.pairs = method, reg, normalize_cost, pairs

    def plan(self, x0: Tensor, x1: Tensor) -> np.ndarray:
        """The OT plan between the two batches (rows: ``x0``, columns: ``x1``), float64."""
        import ot  # POT pulls in scikit-learn: import it only where a plan is solved

        a = x0.detach().flatten(1).cpu().double().numpy()
        b = x1.detach().flatten(1).cpu().double().numpy()
        cost = ot.dist(a, b)  # squared euclidean
        wa, wb = ot.unif(len(a)), ot.unif(len(b))
        if self.method == "exact":
            return np.asarray(ot.emd(wa, wb, cost))
        if self.normalize_cost:
            cost = cost / max(cost.max(), 1e-12)
        # the plain iteration is ~100x faster than POT's log-domain one; its kernel exp(-cost / reg)
        # underflows when reg is small against the costs, and then the log domain takes over
        plan = np.asarray(ot.sinkhorn(wa, wb, cost, self.reg))
        if not np.isfinite(plan).all() or (plan.sum(1) <= 0).any():
            plan = np.asarray(ot.sinkhorn(wa, wb, cost, self.reg, method="sinkhorn_log"))
        return plan

    def plan_indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Index into ``x1`` of the partner of each row of ``x0`` (a CPU LongTensor)."""
        return self.partners(self.plan(x0, x1), generator)

    def partners(self, plan: np.ndarray, generator: torch.Generator | None = None) -> Tensor:
        """Each row's partner under ``plan``, by ``pairs`` (a CPU LongTensor)."""
        if self.pairs == "argmax":
            return torch.from_numpy(plan.argmax(axis=1))
        rows = torch.from_numpy(plan).clamp(min=0)
        empty = rows.sum(1) <= 0  # a row the solver left without mass keeps a uniform draw
        rows[empty] = 1.0
        return torch.multinomial(rows, 1, generator=generator).squeeze(1)

    def __call__(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        return x0, x1[self.plan_indices(x0, x1, generator).to(x1.device)]


COUPLINGS: dict[str, type[Coupling]] = {
    "independent": IndependentCoupling,
    "minibatch_ot": MinibatchOTCoupling,
}


def make_coupling(kind: str, **kwargs) -> Coupling:
    """Build a coupling from its config name."""
    if kind not in COUPLINGS:
        raise ValueError(f"unknown coupling {kind!r}; valid choices: {sorted(COUPLINGS)}")
    return COUPLINGS[kind](**kwargs)


def transport_cost(x0: Tensor, x1: Tensor) -> float:
    """Mean squared euclidean distance between paired rows."""
    return (x0 - x1).flatten(1).pow(2).sum(dim=1).mean().item()
