"""The sections of a run config every graph shares (data, source, path, model, coupling,
train, sample, evaluate, registry), as strict pydantic models; `tasks.config` composes them
into one schema per graph and loads YAML into it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, field_validator,
                      model_serializer, model_validator)

from models.couplings import COUPLINGS
from models.data import DATASETS, DatasetSpec
from models.networks import NETWORKS
from models.parameterization import PARAMETERIZATIONS
from models.paths import BETA_SCHEDULES, SIGMA_SCHEDULES
from models.samplers import settings_for
from models.solvers import FIXED_STEP_METHODS
from models.training import LR_SCHEDULES


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OmitsNewDefaults(Strict):
    """A section whose `OPTIONAL` fields are left out of its dump while at their defaults: a key
    added later then changes no existing config's hashes (run names, data versions, caches)."""

    OPTIONAL: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit_defaults(self, handler):
        dumped = handler(self)
        for name in self.OPTIONAL:
            if getattr(self, name) == type(self).model_fields[name].default:
                dumped.pop(name, None)
        return dumped


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"got {value!r}; expected a number, not a boolean")
    return value


PositiveInt = Annotated[int, Field(gt=0, strict=True)]
Float = Annotated[float, BeforeValidator(_not_bool)]  # YAML's 1e-3 is a string: floats stay lax otherwise
PositiveFloat = Annotated[Float, Field(gt=0)]
MAX_SEED = 2**32 - 1  # what every seeded library (numpy, torch, scikit-learn) accepts


def _safe_name(value: str) -> str:
    """A name that is also a folder name and an MLflow registered-model name."""
    if not value or not all(c.isalnum() or c in "-_." for c in value) or set(value) <= {"."}:
        raise ValueError(f"'{value}' must be letters, digits, '-', '_' or '.' (not only dots)")
    return value


class _DatasetFields(OmitsNewDefaults):
    n_train: PositiveInt | None = None
    n_test: PositiveInt | None = None
    path: str | None = None
    test_path: str | None = None  # npy: a separate held-out file (then `path` is all training data)
    image_size: PositiveInt | None = None
    channels: Literal[1, 3] | None = None
    download: StrictBool = False

    @model_validator(mode="after")
    def _path_when_needed(self):
        if self.name in ("npy", "image_folder") and not self.path:
            raise ValueError(f"dataset '{self.name}' needs a path (a .npy file or an image folder)")
        if self.test_path and self.name != "npy":
            raise ValueError(f"test_path: only an npy dataset takes a separate test file, not '{self.name}'")
        return self

    OPTIONAL: ClassVar[tuple[str, ...]] = ("test_path",)


class DataConfig(_DatasetFields):
    name: Literal[DATASETS]  # type: ignore[valid-type]

    def spec(self, seed: int) -> DatasetSpec:
        """What `models.data` loads for this section (a path made absolute: it names the version)."""
        fields = self.model_dump()
        for key in ("path", "test_path"):
            if fields.get(key):
                fields[key] = str(Path(fields[key]).expanduser().resolve())
        return DatasetSpec(**fields, seed=seed)


class SourceConfig(_DatasetFields):
    """The t=0 end of the path: standard normal, or any dataset (flow matching needs no Gaussian)."""

    name: Literal[("gaussian",) + DATASETS] = "gaussian"  # type: ignore[valid-type]

    def as_data(self) -> DataConfig | None:
        return None if self.name == "gaussian" else DataConfig(**self.model_dump())


# --------------------------------------------------------------------------- paths (typed per scheduler)


class _Path(OmitsNewDefaults):
    def kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if k != "scheduler"}


class CondOTPath(_Path):
    """x_t = t x1 + (1 - t) x0 (rectified flow / conditional OT); `sigma_min`: Lipman et al. 2023's
    FM path (Eq. 20); `sigma` > 0: Tong et al. 2024's Gaussian noise around the line, constant
    (I-CFM, OT-CFM) or a Brownian bridge's sigma sqrt(t (1 - t)) (SB-CFM); `models.paths`."""

    scheduler: Literal["cond_ot"] = "cond_ot"
    sigma_min: Annotated[Float, Field(ge=0, lt=1)] = 0.0
    sigma: Annotated[Float, Field(ge=0)] = 0.0
    sigma_schedule: Literal[SIGMA_SCHEDULES] = "constant"  # type: ignore[valid-type]

    OPTIONAL: ClassVar[tuple[str, ...]] = ("sigma_min", "sigma", "sigma_schedule")


class VPPath(_Path):
    scheduler: Literal["vp"]
    beta_min: PositiveFloat = 0.1
    beta_max: PositiveFloat = 20.0


class SubVPPath(VPPath):
    """Song et al. 2021's sub-VP path: VP's alpha, sigma = 1 - alpha^2."""

    scheduler: Literal["subvp"]


class VEPath(_Path):
    scheduler: Literal["ve"]
    sigma_min: PositiveFloat = 0.01
    sigma_max: PositiveFloat = 50.0

    @model_validator(mode="after")
    def _ordered(self):
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min}) must be below sigma_max ({self.sigma_max})")
        return self


class NCSNPath(VEPath):
    """NCSN's noise levels: `levels` geometric sigmas of the VE path, down to sigma_min."""

    scheduler: Literal["ncsn"] = "ncsn"
    sigma_max: PositiveFloat = 10.0
    levels: PositiveInt = 10


class DDPMPath(_Path):
    """The discrete DDPM forward process: `timesteps` steps of a linear or cosine beta schedule."""

    scheduler: Literal["ddpm"] = "ddpm"
    beta_schedule: Literal[BETA_SCHEDULES] = "linear"  # type: ignore[valid-type]
    timesteps: PositiveInt = 1000
    beta_start: Annotated[Float, Field(gt=0, lt=1)] = 1e-4
    beta_end: Annotated[Float, Field(gt=0, lt=1)] = 0.02


AnyPath = Annotated[Union[CondOTPath, VPPath, VEPath, DDPMPath], Field(discriminator="scheduler")]


# --------------------------------------------------------------------------- shared sections


class ModelConfig(Strict):
    network: Literal[tuple(NETWORKS)] = "mlp"  # type: ignore[valid-type]
    parameterization: Literal[PARAMETERIZATIONS] = "velocity"  # type: ignore[valid-type]
    kwargs: dict[str, Any] = {}


class FlowModelConfig(Strict):
    """A normalizing flow's architecture: `build_flow`'s keywords (the graph names the flow)."""

    kwargs: dict[str, Any] = {}


class CNFSection(Strict):
    """How a continuous normalizing flow is trained (`models.cnf`, the `cnf` objective)."""

    divergence: Literal["auto", "exact", "hutchinson"] = "auto"  # auto: exact up to 16 dims
    method: Literal[FIXED_STEP_METHODS] = "rk4"  # type: ignore[valid-type]  # the training solve, backpropagated
    steps: PositiveInt = 8
    kinetic: Annotated[Float, Field(ge=0)] = 0.0  # RNODE's lambda_K: integral of |v|^2 dt
    jacobian: Annotated[Float, Field(ge=0)] = 0.0  # RNODE's lambda_J: integral of |eps^T dv/dx|^2 dt


class CouplingConfig(Strict):
    kind: Literal[tuple(COUPLINGS)] = "independent"  # type: ignore[valid-type]
    kwargs: dict[str, Any] = {}


class TrainConfig(OmitsNewDefaults):
    steps: PositiveInt = 2000
    batch_size: PositiveInt = 256
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[Float, Field(ge=0)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0, strict=True)] = 0
    lr_schedule: Literal[LR_SCHEDULES] = "constant"  # type: ignore[valid-type]
    grad_clip: PositiveFloat | None = 1.0
    ema_decay: Annotated[Float, Field(ge=0, lt=1)] = 0.999
    num_workers: Annotated[int, Field(ge=0, strict=True)] = 2
    use_gpu: StrictBool = False  # one GPU per Ray Train worker (NCCL); the paper scale sets it
    checkpoint_every: PositiveInt = 500
    log_every: PositiveInt = 50
    # torch threads of each training worker; default: the node's cores shared among its workers. A
    # small network (the 2-D MLPs) trains fastest on one: its matrices are too small to split.
    threads: PositiveInt | None = None

    OPTIONAL: ClassVar[tuple[str, ...]] = ("threads",)
    #: Fields that change how often things are recorded, not the trained weights.
    BOOKKEEPING: ClassVar[frozenset[str]] = frozenset({"checkpoint_every", "log_every"})


class SamplerConfig(BaseModel):
    """One sampler of the grid: `method`, `nfe` (a list, for fixed-step samplers) and the
    sampler's own parameters, each a value or a list of values (every combination is sampled),
    e.g. `{method: ddim, nfe: [10, 50], eta: [0.0, 1.0], spacing: trailing}`."""

    model_config = ConfigDict(extra="allow", frozen=True)
    method: str
    nfe: list[PositiveInt] = []

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _fits_the_sampler(self) -> "SamplerConfig":
        settings_for(self.method, self.nfe, self.params)  # raises ValueError naming the key
        return self


class SampleConfig(Strict):
    n_samples: PositiveInt = 1000
    # Independent sample sets of n_samples each; metrics are their mean. FID from a few hundred
    # images moves by as much as the real-data floor from one noise draw to the next.
    sets: PositiveInt = 1
    shard_size: PositiveInt = 500
    num_workers: PositiveInt = 2
    device: Literal["cpu", "cuda"] = "cpu"
    samplers: Annotated[list[SamplerConfig], Field(min_length=1)] = [SamplerConfig(method="euler", nfe=[1, 2, 4, 8, 16, 100])]
    trajectories: Annotated[int, Field(ge=0, strict=True)] = 256


class EvaluateConfig(Strict):
    n_reference: PositiveInt | None = None
    feature_epochs: PositiveInt = 30
    inception_weights: str | None = None
    kid_subset_size: PositiveInt | None = None
    likelihood: list[str] = []  # test-set NLL estimators (models.likelihoods), e.g. [ddpm_bound]
    likelihood_examples: PositiveInt = 500  # test examples the NLL is averaged over


class RegisterConfig(Strict):
    """Where a run is recorded in MLflow; names are checked against MLflow's rules up front."""

    model_name: str | None = None
    experiment: Annotated[str, Field(min_length=1, max_length=500)] = "gendag"  # MLflow's limits
    alias: str = "challenger"
    champion_alias: str = "champion"
    # A run moves champion_alias itself when it beats the champion; `gendag retrain` turns this
    # off and decides on the champion's protocol, by promotion_margin (relative: 0.05 = 5 % lower).
    auto_champion: StrictBool = True
    promotion_margin: Annotated[Float, Field(ge=0, lt=1)] = 0.0

    @field_validator("model_name")
    @classmethod
    def _model_name(cls, v: str | None) -> str | None:
        return None if v is None else _safe_name(v)

    @field_validator("alias", "champion_alias")
    @classmethod
    def _alias(cls, v: str) -> str:
        if not re.fullmatch(r"[\w-]{1,255}", v):
            raise ValueError(f"'{v}' must be 1 to 255 letters, digits, '_' or '-' (MLflow's alias rule)")
        if v.lower() == "latest" or re.fullmatch(r"[vV]\d+", v):
            raise ValueError(f"'{v}' is reserved by MLflow ('latest' and v<number> name versions)")
        return v

    @model_validator(mode="after")
    def _distinct_aliases(self):
        if self.alias == self.champion_alias:
            raise ValueError(f"registry: alias and champion_alias are both '{self.alias}'; they must differ")
        return self


# --------------------------------------------------------------------------- stages after training


def merged_train(base: TrainConfig, overrides: dict[str, Any], where: str) -> TrainConfig:
    """`base` with a stage's `train:` overrides; an unknown key or a bad value is a ValueError
    naming `<where>.<key>`."""
    unknown = sorted(set(overrides) - set(TrainConfig.model_fields))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key; valid keys: {', '.join(TrainConfig.model_fields)}")
    try:
        return TrainConfig.model_validate({**base.model_dump(), **overrides})
    except ValueError as e:  # pydantic's ValidationError: the first problem, as one line
        first = e.errors()[0] if hasattr(e, "errors") else {"loc": (), "msg": str(e)}
        key = ".".join(map(str, first["loc"]))
        raise ValueError(f"{where}.{key}: {first['msg']}") from None


class ReflowConfig(Strict):
    """Rectified flow's reflow rounds: each simulates the previous flow's ODE from `pairs` fresh
    draws (a coupling set, made by `num_workers` Ray workers in shards of `shard_size`) and trains
    the next flow on those pairs, from the previous flow's weights (`init: previous`) or afresh."""

    rounds: Annotated[int, Field(ge=0, strict=True)] = 1  # 1: 1-RF -> 2-RF
    pairs: PositiveInt = 10000
    solver: SamplerConfig = SamplerConfig(method="dopri5", atol=1e-4, rtol=1e-4)
    shard_size: PositiveInt = 1000
    num_workers: PositiveInt = 2
    init: Literal["previous", "scratch"] = "previous"
    train: dict[str, Any] = {}  # overrides of the run's train section for every reflow round
    samplers: list[SamplerConfig] | None = None  # how the reflowed flows are scored (default: sample.samplers)
    straightness_points: PositiveInt = 1000  # draws the straightness of each flow is measured on
    straightness_steps: PositiveInt = 100  # Euler steps along each draw's path

    @model_validator(mode="after")
    def _one_solver_setting(self):
        settings = settings_for(self.solver.method, self.solver.nfe, self.solver.params)
        if len(settings) != 1:
            raise ValueError(f"solver: expected one setting (one nfe, one value per parameter); got {len(settings)}")
        return self


class DistillConfig(Strict):
    """One-step distillation of the last rectified flow on couplings of its own ODE."""

    enabled: StrictBool = True
    train: dict[str, Any] = {}  # overrides of the run's train section
    samplers: Annotated[list[SamplerConfig], Field(min_length=1)] = [SamplerConfig(method="euler", nfe=[1])]


class ProgressiveConfig(Strict):
    """Progressive distillation (Salimans & Ho 2022): round r's student starts from its teacher (the
    previous round's student) and learns two of its DDIM steps in one, `teacher_steps / 2^r` steps."""

    teacher_steps: PositiveInt = 64  # the first teacher's DDIM steps
    rounds: PositiveInt = 3
    train: dict[str, Any] = {}  # overrides of the run's train section for every round

    def ladder(self) -> list[int]:
        """The step counts, teacher first: 64, 32, 16, 8 for 3 rounds."""
        return [self.teacher_steps // 2**r for r in range(self.rounds + 1)]

    @staticmethod
    def ddim(steps: list[int]) -> list[SamplerConfig]:
        """Deterministic DDIM at these step counts: how every round is sampled."""
        return [SamplerConfig(method="ddim", nfe=sorted(steps), eta=0.0)]


class ConsistencySection(Strict):
    """A consistency model's training (Song et al. 2023): distillation from the teacher's
    probability-flow ODE in `steps` intervals (`solver`), or training alone with the N(k), mu(k)
    schedules (`s0`, `s1`, `mu0`); the target network's EMA decay; the distance."""

    steps: Annotated[int, Field(ge=2, strict=True)] = 18  # N of distillation
    solver: Literal["euler", "midpoint", "heun", "rk4"] = "heun"
    target_decay: Annotated[Float, Field(ge=0, le=1)] = 0.95
    distance: Literal["l2", "pseudo_huber"] = "l2"
    spacing: Literal["uniform", "karras"] = "uniform"
    s0: Annotated[int, Field(ge=2, strict=True)] = 2
    s1: Annotated[int, Field(ge=2, strict=True)] = 150
    mu0: Annotated[Float, Field(ge=0, lt=1)] = 0.9
    train: dict[str, Any] = {}  # overrides of the run's train section for the consistency model
    samplers: Annotated[list[SamplerConfig], Field(min_length=1)] = [SamplerConfig(method="consistency", nfe=[1, 2])]

    def options(self, objective: str, total_steps: int) -> dict[str, Any]:
        """The keyword options of `objective` (models.consistency) from this section."""
        if objective == "consistency_distillation":
            return {"steps": self.steps, "solver": self.solver, "target_decay": self.target_decay,
                    "distance": self.distance, "spacing": self.spacing}
        return {"total_steps": total_steps, "s0": self.s0, "s1": self.s1, "mu0": self.mu0,
                "distance": self.distance, "spacing": self.spacing}
