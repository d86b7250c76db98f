"""Flow matching: the conditional flow matching objective.

Lipman et al. 2023, "Flow Matching for Generative Modeling", Eq. 9 (CFM loss) with Gaussian
conditional paths (Sec. 4; CondOT is Eq. 20); with a source dataset and independent or
minibatch-OT pairs, Tong et al. 2024 (I-CFM / OT-CFM). Sampling integrates the learned
velocity with the ODE samplers of ``models.solvers``.
"""

from __future__ import annotations

from models.objectives import PathRegression, register_objective


@register_objective("flow_matching")
class FlowMatching(PathRegression):
    """t ~ U[0, 1]; the target is the conditional velocity (or any parameterization of it)."""
