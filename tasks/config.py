"""Run configuration schemas: pydantic models, one per graph.

A config file holds the `cpu` scale values; its `scales:` section holds dotted
overrides for the other scales (`tiny` for tests, `paper` for GPU clusters). Every
error is one line naming the offending key and what was expected.

Each graph has its own schema: a subclass of `RunConfig` whose `graph` field lists the
graph names it serves (`FlowMatchingConfig`, `DiffusionConfig`, `ScoreSDEConfig`, `NCSNConfig`). `load_config` picks the
schema by the file's `graph:` key, so a method's own keys are validated and listed in its
errors. Sections shared by every graph (data, model, train, sample, evaluate, registry)
are defined once, in `tasks.config_sections`; reading a file (scales, overrides, errors) is
`tasks.config_loading`.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Any, ClassVar, Literal, Union, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from models.checkpoint import ModelSpec
from models.likelihoods import get_likelihood
from models.parameterization import PARAMETERIZATIONS
from models.paths import make_scheduler
from models.samplers import get_sampler, settings_for, time_grid
from tasks.config_sections import (AnyPath, CNFSection, CondOTPath, ConsistencySection, FlowModelConfig, CouplingConfig, DataConfig, DDPMPath,
                                    DistillConfig, ProgressiveConfig,
                                    EvaluateConfig, ModelConfig, NCSNPath, ReflowConfig, RegisterConfig, SampleConfig,
                                    SamplerConfig, SourceConfig, Strict, SubVPPath, TrainConfig, VEPath, VPPath,
                                    MAX_SEED, _safe_name, merged_train)

SCALES = ("tiny", "cpu", "paper")


class ConfigError(ValueError):
    """A config problem, phrased as one line for the user."""



# --------------------------------------------------------------------------- one schema per graph


class RunConfig(Strict):
    """What every graph's config has. Subclasses set `graph` to the names they serve and
    `objective` to the training objective (models.objectives) they run."""

    graph: str
    name: str
    seed: Annotated[int, Field(ge=0, le=MAX_SEED, strict=True)] = 0
    data: DataConfig
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegisterConfig = RegisterConfig()

    objective: ClassVar[str] = ""
    family: ClassVar[str] = "denoiser"  # the kind of model it trains (models.checkpoint.FAMILIES)
    parameterizations: ClassVar[tuple[str, ...]] = PARAMETERIZATIONS

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _safe_name(v)

    @model_validator(mode="after")
    def _method_fits(self, info: ValidationInfo):
        if self.parameterizations and self.model.parameterization not in self.parameterizations:
            raise ValueError(f"model.parameterization: got '{self.model.parameterization}'; graph "
                             f"'{self.graph}' trains one of {', '.join(self.parameterizations)}")
        provides = self.provides()
        try:
            scheduler = self.scheduler()
        except ValueError as e:
            raise ValueError(f"path.{e}") from None
        if scheduler is not None and scheduler.noisy and self.model.parameterization != "velocity":
            raise ValueError(f"path.sigma: a path with noise around its mean (sigma > 0) trains the velocity "
                             f"parameterization only, not '{self.model.parameterization}'")
        stage_family = (info.context or {}).get("family")  # a stage's config: its grid runs on its model
        for where, (entries, family) in self.sampler_lists().items():
            family = stage_family if stage_family and where == "sample.samplers" else family
            named = {f"{where}.{i}": e for i, e in enumerate(entries)} if isinstance(entries, list) else {where: entries}
            for key, entry in named.items():
                self._sampler_fits(key, entry, self.provides(family), scheduler)
        for name in self.evaluate.likelihood:
            try:
                missing = get_likelihood(name).needs - provides
            except ValueError as e:
                raise ValueError(f"evaluate.likelihood: {e}") from None
            if missing:
                raise ValueError(f"evaluate.likelihood: '{name}' needs {_needs_phrase(missing, self)}")
        return self

    def _sampler_fits(self, where: str, entry: SamplerConfig, provides: frozenset[str], scheduler) -> None:
        missing = get_sampler(entry.method).needs - provides
        if missing:
            raise ValueError(f"{where}.method: sampler '{entry.method}' needs {_needs_phrase(missing, self)}")
        for setting in settings_for(entry.method, entry.nfe, entry.params):
            try:
                if setting.nfe:
                    time_grid(scheduler, setting.steps, setting.kwargs.get("spacing", "trailing"))
            except ValueError as e:
                raise ValueError(f"{where}.{e}") from None

    def scheduler(self):
        """The Gaussian path the model lives on (None for a family without one)."""
        return make_scheduler(self.path.scheduler, **self.path.kwargs())

    def sampler_lists(self) -> dict[str, tuple[list[SamplerConfig] | SamplerConfig, str]]:
        """Every sampler the graph runs, by the key it is set at, with the model family it runs on
        (a graph with stages adds theirs)."""
        return {"sample.samplers": (self.sample.samplers, self.family)}

    def objective_options(self, levels: int | None) -> dict[str, Any]:
        """The options of the config's objective for data of `levels` grey levels (None:
        continuous): what a graph whose objective sees the data's quantization passes to it."""
        return {}

    def stage(self, suffix: str, train: dict[str, Any] | None = None,
              samplers: list[SamplerConfig] | None = None) -> "RunConfig":
        """This config for one stage of a multi-stage graph: named `<name>-<suffix>` (its own run and
        registered model), with the stage's `train:` overrides and sampler grid."""
        update: dict[str, Any] = {"name": f"{self.name}-{suffix}"}
        if train:
            update["train"] = merged_train(self.train, train, "train")
        if samplers:
            update["sample"] = self.sample.model_copy(update={"samplers": samplers})
        return self.model_copy(update=update)

    @property
    def source_config(self) -> SourceConfig:
        """Where sampling starts: a graph's `source:` section, N(0, I) when it has none."""
        return getattr(self, "source", None) or SourceConfig()

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"gendag-{self.name}"

    def model_spec(self, data_shape: tuple[int, ...], family: str | None = None) -> ModelSpec:
        """The model this config trains, for data of `data_shape` (a stage may train another family
        around the same network, e.g. a consistency model)."""
        return ModelSpec(
            family=family or self.family,
            network=self.model.network,
            data_shape=tuple(data_shape),
            parameterization=self.model.parameterization,
            scheduler=self.path.scheduler,
            network_kwargs=dict(self.model.kwargs),
            scheduler_kwargs=self.path.kwargs(),
        )

    def provides(self, family: str | None = None) -> frozenset[str]:
        """What the trained model offers samplers (its family's list, plus a Gaussian source)."""
        extra = {"gaussian_source"} if self.source_config.name == "gaussian" else set()
        return self.model_spec((), family).provides() | extra

    def training_identity(self) -> dict:
        """Everything that changes the trained weights (data enter through their hashes)."""
        keep = self.model_dump(mode="json", exclude={"graph", "name", "data", "source", "sample", "evaluate", "registry"})
        keep["train"] = {k: v for k, v in keep["train"].items() if k not in TrainConfig.BOOKKEEPING}
        return {"objective": self.objective, **keep}

    def digest(self) -> str:
        """Content hash of everything that changes the numbers (the config hash in lineage)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _needs_phrase(missing: set[str], cfg: RunConfig) -> str:
    if not hasattr(cfg, "path"):  # a family without a Gaussian path (normalizing flows)
        return (f"a model that provides {', '.join(sorted(missing))}; a {cfg.family.replace('_', ' ')} provides "
                f"{', '.join(sorted(cfg.provides()))}")
    if "gaussian_source" in missing:
        return f"a Gaussian source (N(0, I)); this run starts from '{cfg.source_config.name}'"
    if "discrete_time" in missing:
        return f"a discrete-time (DDPM) model; this one is on the '{cfg.path.scheduler}' path"
    if "noise_levels" in missing:
        return (f"noise levels above zero down to the data (the ve or ncsn path); on the '{cfg.path.scheduler}' "
                "path sigma reaches 0")
    if "sde" in missing:
        return (f"a path with a forward SDE (vp, subvp, ve, ncsn, ddpm); on the '{cfg.path.scheduler}' path the "
                "reverse SDE's drift is infinite at the noise end")
    return f"a model that provides {', '.join(sorted(missing))}"


class FlowMatchingConfig(RunConfig):
    """Conditional flow matching on a Gaussian path, from N(0, I) or a source dataset."""

    graph: Literal["flow-matching"]
    source: SourceConfig = SourceConfig()
    path: AnyPath = CondOTPath()
    coupling: CouplingConfig = CouplingConfig()
    objective: ClassVar[str] = "flow_matching"


class DiffusionConfig(RunConfig):
    """DDPM training (discrete steps, epsilon / v / x1 prediction); `ddim` is the same training
    with a DDIM-first sampling grid."""

    graph: Literal["ddpm", "ddim"]
    path: DDPMPath = DDPMPath()
    model: ModelConfig = ModelConfig(parameterization="epsilon")
    objective: ClassVar[str] = "ddpm"
    parameterizations: ClassVar[tuple[str, ...]] = ("epsilon", "v", "x1")


class ScoreSDEConfig(RunConfig):
    """Score SDEs in continuous time (VE, VP, sub-VP), trained by denoising score matching."""

    graph: Literal["score-sde"]
    path: Annotated[Union[VEPath, VPPath, SubVPPath], Field(discriminator="scheduler")] = VPPath(scheduler="vp")
    model: ModelConfig = ModelConfig(parameterization="epsilon")
    objective: ClassVar[str] = "score_sde"
    # v is left out: its epsilon, alpha v + sigma x_t, barely depends on v where alpha ~ 0 (the noise
    # end), so the DSM loss leaves v untrained there (measured: NLL 2.85 against 0.32 for epsilon)
    parameterizations: ClassVar[tuple[str, ...]] = ("epsilon", "score")


class NCSNConfig(RunConfig):
    """A noise-conditional score network on NCSN's geometric noise levels."""

    graph: Literal["ncsn"]
    path: NCSNPath = NCSNPath()
    model: ModelConfig = ModelConfig(parameterization="epsilon")
    objective: ClassVar[str] = "ncsn"
    parameterizations: ClassVar[tuple[str, ...]] = ("epsilon", "score")


class RectifiedFlowConfig(RunConfig):
    """Rectified flow: 1-RF (flow matching on the straight path), `reflow.rounds` reflows on
    couplings of the previous flow's ODE, then one-step distillation of the last one."""

    graph: Literal["rectified-flow"]
    source: SourceConfig = SourceConfig()
    path: CondOTPath = CondOTPath()
    coupling: CouplingConfig = CouplingConfig()  # how 1-RF pairs its training batches
    reflow: ReflowConfig = ReflowConfig()
    distill: DistillConfig = DistillConfig()
    objective: ClassVar[str] = "flow_matching"
    parameterizations: ClassVar[tuple[str, ...]] = ("velocity",)

    @model_validator(mode="after")
    def _stage_overrides(self):
        merged_train(self.train, self.reflow.train, "reflow.train")
        merged_train(self.train, self.distill.train, "distill.train")
        return self

    def sampler_lists(self) -> dict[str, tuple[list[SamplerConfig] | SamplerConfig, str]]:
        reflowed = {"reflow.samplers": (self.reflow.samplers, "denoiser")} if self.reflow.samplers else {}
        return {**super().sampler_lists(), "reflow.solver": (self.reflow.solver, "denoiser"), **reflowed,
                "distill.samplers": (self.distill.samplers, "denoiser")}

    def training_identity(self) -> dict:
        """1-RF's weights do not depend on the later stages' settings (each stage's run adds its own)."""
        identity = super().training_identity()
        return {k: v for k, v in identity.items() if k not in ("reflow", "distill")}


class _TeacherGraph(RunConfig):
    """A graph whose students learn from a teacher: taken from the registry (`teacher:
    models:/<name>@<alias>`) or trained first by the graph from the `model`, `path` and `train`
    sections (flow matching on a continuous path, DDPM on the discrete one)."""

    teacher: str | None = None

    @field_validator("teacher")
    @classmethod
    def _reference(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"models:/[^@/]+(@[\w-]+|/\d+)", v):
            raise ValueError(f"got {v!r}; expected models:/<name>@<alias> or models:/<name>/<version>")
        return v

    @property
    def objective(self) -> str:  # type: ignore[override]
        return "ddpm" if self.path.scheduler == "ddpm" else "flow_matching"

    def training_identity(self) -> dict:
        """The teacher's weights do not depend on the students' settings."""
        identity = super().training_identity()
        return {k: v for k, v in identity.items() if k not in ("distill", "consistency", "teacher")}


class ProgressiveDistillationConfig(_TeacherGraph):
    """Progressive distillation: DDIM students halving the teacher's steps round by round."""

    graph: Literal["progressive-distillation"]
    path: Annotated[Union[CondOTPath, VPPath, DDPMPath], Field(discriminator="scheduler")] = CondOTPath()
    distill: ProgressiveConfig = ProgressiveConfig()
    parameterizations: ClassVar[tuple[str, ...]] = ("velocity", "x1", "v")  # epsilon cannot give x1 where alpha = 0

    @model_validator(mode="after")
    def _rounds_fit(self):
        merged_train(self.train, self.distill.train, "distill.train")
        steps = self.distill.teacher_steps
        if steps % 2 ** self.distill.rounds:
            raise ValueError(f"distill.teacher_steps: {steps} cannot be halved {self.distill.rounds} times "
                             f"(distill.rounds); expected a multiple of {2 ** self.distill.rounds}")
        return self

    def sampler_lists(self) -> dict[str, tuple[list[SamplerConfig] | SamplerConfig, str]]:
        return {**super().sampler_lists(), "distill.teacher_steps": (self.distill.ddim(self.distill.ladder()), "denoiser")}


class ConsistencyConfig(_TeacherGraph):
    """Consistency models: distilled from a teacher's probability-flow ODE, or trained alone."""

    graph: Literal["consistency-distillation", "consistency-training"]
    path: AnyPath = CondOTPath()
    consistency: ConsistencySection = ConsistencySection()
    parameterizations: ClassVar[tuple[str, ...]] = ("velocity", "x1", "v", "epsilon")

    @model_validator(mode="after")
    def _stage_fits(self):
        merged_train(self.train, self.consistency.train, "consistency.train")
        if self.graph == "consistency-training" and self.teacher:
            raise ValueError("teacher: consistency training learns without a teacher; "
                             "use the consistency-distillation graph")
        return self

    def sampler_lists(self) -> dict[str, tuple[list[SamplerConfig] | SamplerConfig, str]]:
        student = {"consistency.samplers": (self.consistency.samplers, "consistency")}
        return student if self.graph == "consistency-training" else {**super().sampler_lists(), **student}


class NormalizingFlowConfig(RunConfig):
    """A normalizing flow trained by maximum likelihood: NICE, RealNVP, Glow, MAF or IAF, as the
    graph names it, with its architecture in `model.kwargs` (`models.normalizing_flows.build_flow`).
    Quantized data (the digits) are dequantized uniformly in training and in the test NLL."""

    graph: Literal["nice", "realnvp", "glow", "maf", "iaf"]
    model: FlowModelConfig = FlowModelConfig()
    sample: SampleConfig = SampleConfig(samplers=[SamplerConfig(method="invert")])
    evaluate: EvaluateConfig = EvaluateConfig(likelihood=["exact"])
    objective: ClassVar[str] = "maximum_likelihood"
    family: ClassVar[str] = "normalizing_flow"
    parameterizations: ClassVar[tuple[str, ...]] = ()  # no network output to convert

    def scheduler(self):
        return None

    def model_spec(self, data_shape: tuple[int, ...], family: str | None = None) -> ModelSpec:
        return ModelSpec(family=family or self.family, network=self.graph, data_shape=tuple(data_shape),
                         network_kwargs=dict(self.model.kwargs))

    def training_identity(self) -> dict:
        return {"flow": self.graph, **super().training_identity()}

    def objective_options(self, levels: int | None) -> dict[str, Any]:
        return {"levels": levels} if levels else {}


class CNFConfig(RunConfig):
    """A continuous normalizing flow: a velocity network trained by maximum likelihood through
    its ODE (`models.cnf`), with RNODE's kinetic and Jacobian regularizers; sampled by every ODE
    sampler and scored by the ODE likelihood, like a flow-matching model."""

    graph: Literal["cnf"]
    path: CondOTPath = CondOTPath()  # only its N(0, I) prior at t = 0 is used: no path is regressed
    cnf: CNFSection = CNFSection()
    evaluate: EvaluateConfig = EvaluateConfig(likelihood=["ode"])
    objective: ClassVar[str] = "cnf"
    parameterizations: ClassVar[tuple[str, ...]] = ("velocity",)

    def objective_options(self, levels: int | None) -> dict[str, Any]:
        return {**self.cnf.model_dump(), **({"levels": levels} if levels else {})}


def schemas() -> dict[str, type[RunConfig]]:
    """Graph name -> its config schema, from every subclass of `RunConfig`."""
    found, todo = {}, list(RunConfig.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        for name in get_args(cls.model_fields["graph"].annotation):
            found[name] = cls
    return found
