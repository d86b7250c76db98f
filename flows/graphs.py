"""Every task graph gendag knows, declared once.

A `Graph` names the graph, says what it does, points at its default config and at the
Prefect flow body that composes it. Its config schema is the `tasks.config.RunConfig`
subclass whose `graph` field lists the name. The command line (`gendag run`, `gendag list`),
config validation and `dvc.yaml` (`gendag dvc`) all read this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from tasks.config import RunConfig, schemas


@dataclass(frozen=True)
class Graph:
    name: str
    description: str
    default_config: str  # a config name under configs/
    configs: tuple[str, ...]  # the configs `dvc repro` runs at cpu scale (one stage each)
    body: str = "flows.pipeline:train_and_evaluate"  # module:function of the flow body

    @property
    def schema(self) -> type[RunConfig]:
        return schemas()[self.name]

    def flow(self):
        """The Prefect flow of this graph (imports Prefect and the tasks: call it late)."""
        from prefect import flow

        module, function = self.body.split(":")
        return flow(name=self.name, validate_parameters=False)(getattr(importlib.import_module(module), function))


GRAPHS: dict[str, Graph] = {g.name: g for g in (
    Graph("flow-matching",
          "Conditional flow matching on a Gaussian path (CondOT / VP / VE), from N(0, I) or a source "
          "dataset, independent or minibatch-OT pairs; ODE samplers",
          "flow-matching/gaussians-to-moons",
          ("flow-matching/gaussians-to-moons", "flow-matching/digits")),
    Graph("ddpm",
          "DDPM: discrete-time diffusion (linear / cosine betas), epsilon / v / x1 prediction, ancestral "
          "sampling, DDIM and the probability-flow ODE, variational bound in bits/dim",
          "ddpm/moons", ("ddpm/moons", "ddpm/eight-gaussians", "ddpm/digits")),
    Graph("ddim",
          "DDIM sampling of a DDPM-trained model: S-step subsequences, eta from 0 (deterministic) to 1, "
          "the sigma-hat variant, trailing / leading / quadratic spacing",
          "ddim/moons", ("ddim/moons", "ddim/digits")),
    Graph("ncsn",
          "NCSN: a noise-conditional score network on geometric noise levels, multi-level denoising score "
          "matching, annealed Langevin dynamics (and every score / ODE sampler)",
          "ncsn/eight-gaussians", ("ncsn/eight-gaussians", "ncsn/digits")),
    Graph("score-sde",
          "Score SDEs (VE, VP, sub-VP): continuous-time denoising score matching; reverse-SDE "
          "Euler-Maruyama, reverse diffusion, predictor-corrector, probability-flow ODE with its exact "
          "likelihood, Picard-parallel sampling",
          "score-sde/vp", ("score-sde/ve", "score-sde/vp", "score-sde/subvp",
                           "score-sde/ve-digits", "score-sde/vp-digits", "score-sde/subvp-digits")),
    Graph("rectified-flow",
          "Rectified flow: 1-RF, reflow rounds on couplings of the previous flow's ODE (made by Ray workers, "
          "versioned by DVC), one-step distillation; straightness and quality at every NFE for each stage",
          "rectified-flow/moons", ("rectified-flow/moons", "rectified-flow/digits"),
          body="flows.stages:rectified_flow"),
    Graph("progressive-distillation",
          "Progressive distillation: a DDIM teacher (trained here or models:/name@alias) and K rounds of "
          "students, each starting from its teacher and learning two of its DDIM steps in one",
          "progressive-distillation/moons", ("progressive-distillation/moons", "progressive-distillation/digits"),
          body="flows.stages:progressive_distillation"),
    Graph("consistency-distillation",
          "Consistency distillation: a consistency model from a teacher's probability-flow ODE (Euler / Heun "
          "steps, EMA target, L2 or pseudo-Huber), sampled in one or a few steps",
          "consistency-distillation/moons", ("consistency-distillation/moons", "consistency-distillation/digits"),
          body="flows.stages:consistency"),
    Graph("consistency-training",
          "Consistency training: a consistency model without a teacher (the N(k), mu(k) schedules)",
          "consistency-training/moons", ("consistency-training/moons", "consistency-training/digits"),
          body="flows.stages:consistency"),
    Graph("nice",
          "NICE: additive coupling layers and a diagonal scaling, trained by exact maximum likelihood",
          "nice/moons", ("nice/moons", "nice/eight-gaussians", "nice/breast-cancer", "nice/digits")),
    Graph("realnvp",
          "RealNVP: affine coupling (alternating / checkerboard and channel masks), multi-scale squeeze and "
          "split for images; exact likelihood, one-pass sampling",
          "realnvp/moons", ("realnvp/moons", "realnvp/eight-gaussians", "realnvp/breast-cancer", "realnvp/digits")),
    Graph("glow",
          "Glow: actnorm (data-dependent init), invertible 1x1 convolution (LU), affine coupling, multi-scale",
          "glow/digits", ("glow/moons", "glow/eight-gaussians", "glow/digits")),
    Graph("maf",
          "MAF: masked autoregressive flow (MADE masks): density in one pass, sampling dimension by dimension",
          "maf/moons", ("maf/moons", "maf/eight-gaussians", "maf/breast-cancer", "maf/digits")),
    Graph("iaf",
          "IAF: inverse autoregressive flow: one-pass sampling, density dimension by dimension",
          "iaf/moons", ("iaf/moons", "iaf/eight-gaussians", "iaf/digits")),
    Graph("cnf",
          "Continuous normalizing flow: a velocity field trained by maximum likelihood through its ODE (exact "
          "trace or Hutchinson), kinetic / Jacobian regularization (RNODE), adaptive-solver NLL with its NFE",
          "cnf/moons", ("cnf/moons", "cnf/eight-gaussians", "cnf/digits")),
)}
