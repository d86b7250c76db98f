"""Every method of gendag, imported once so that its objective, samplers and likelihoods are
registered. Adding a method: write its module in ``models/`` and list it here."""

from models import (  # noqa: F401
    cnf, consistency, ddim, ddpm, flow_matching, ncsn, normalizing_flows, ode_likelihood, parallel,
    progressive_distillation, rectified_flow, score_sde, solvers,
)
