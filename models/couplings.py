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
    """Re-pairs a batch of sources with a batch of data samples."""

    @abc.abstractmethod
    def __call__(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]: ...


class IndependentCoupling(Coupling):
    """Keep the pairing as drawn: the product of the marginals."""

    def __call__(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        return x0, x1


class MinibatchOTCoupling(Coupling):
    """Pair each source with the data sample the minibatch OT plan sends it to.

    ``method="exact"`` solves the assignment with ``ot.emd`` (for equal batch sizes the
    plan is a permutation); ``"sinkhorn"`` uses entropic OT with regularisation ``reg``
    relative to the largest cost.  Each row of the plan is turned into a partner by its
    argmax, which keeps the coupling deterministic.
    """

    METHODS = ("exact", "sinkhorn")

    def __init__(self, method: str = "exact", reg: float = 0.05):
        if method not in self.METHODS:
            raise ValueError(f"unknown OT method {method!r}; valid choices: {self.METHODS}")
        self.method, self.reg = method, reg

    def plan_indices(self, x0: Tensor, x1: Tensor) -> Tensor:
        """Index into ``x1`` of the partner of each row of ``x0`` (a CPU LongTensor)."""
        import ot  # POT pulls in scikit-learn: import it only where a plan is solved

        a = x0.detach().flatten(1).cpu().double().numpy()
        b = x1.detach().flatten(1).cpu().double().numpy()
        cost = ot.dist(a, b)  # squared euclidean
        wa, wb = ot.unif(len(a)), ot.unif(len(b))
        if self.method == "exact":
            plan = ot.emd(wa, wb, cost)
        else:
            # Scaling the cost makes ``reg`` meaningful whatever the data's scale.
            plan = ot.sinkhorn(wa, wb, cost / max(cost.max(), 1e-12), self.reg, method="sinkhorn_log")
        return torch.from_numpy(np.asarray(plan).argmax(axis=1))

    def __call__(self, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor]:
        return x0, x1[self.plan_indices(x0, x1).to(x1.device)]


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
