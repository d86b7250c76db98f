"""Run configuration: YAML validated by pydantic, with scale overlays and `--set` overrides.

A config file holds the `cpu` scale values; its `scales:` section holds dotted
overrides for the other scales (`tiny` for tests, `paper` for GPU clusters). Every
error is one line naming the offending key and what was expected.

Each graph has its own schema: a subclass of `RunConfig` whose `graph` field lists the
graph names it serves (`FlowMatchingConfig`, `DiffusionConfig`). `load_config` picks the
schema by the file's `graph:` key, so a method's own keys are validated and listed in its
errors. Sections shared by every graph (data, model, train, sample, evaluate, registry)
are defined once here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Sequence, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, ValidationError, field_validator,
                      model_validator)

from models.checkpoint import ModelSpec
from models.couplings import COUPLINGS
from models.data import DATASETS, DatasetSpec
from models.likelihoods import get_likelihood
from models.networks import NETWORKS
from models.parameterization import PARAMETERIZATIONS
from models.paths import BETA_SCHEDULES, make_scheduler
from models.samplers import get_sampler, settings_for, time_grid
from models.training import LR_SCHEDULES

SCALES = ("tiny", "cpu", "paper")


class ConfigError(ValueError):
    """A config problem, phrased as one line for the user."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


class _DatasetFields(Strict):
    n_train: PositiveInt | None = None
    n_test: PositiveInt | None = None
    path: str | None = None
    image_size: PositiveInt | None = None
    channels: Literal[1, 3] | None = None
    download: StrictBool = False

    @model_validator(mode="after")
    def _path_when_needed(self):
        if self.name in ("npy", "image_folder") and not self.path:
            raise ValueError(f"dataset '{self.name}' needs a path (a .npy file or an image folder)")
        return self


class DataConfig(_DatasetFields):
    name: Literal[DATASETS]  # type: ignore[valid-type]

    def spec(self, seed: int) -> DatasetSpec:
        """What `models.data` loads for this section (a path made absolute: it names the version)."""
        fields = self.model_dump()
        if fields.get("path"):
            fields["path"] = str(Path(fields["path"]).expanduser().resolve())
        return DatasetSpec(**fields, seed=seed)


class SourceConfig(_DatasetFields):
    """The t=0 end of the path: standard normal, or any dataset (flow matching needs no Gaussian)."""

    name: Literal[("gaussian",) + DATASETS] = "gaussian"  # type: ignore[valid-type]

    def as_data(self) -> DataConfig | None:
        return None if self.name == "gaussian" else DataConfig(**self.model_dump())


# --------------------------------------------------------------------------- paths (typed per scheduler)


class _Path(Strict):
    def kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"scheduler"})


class CondOTPath(_Path):
    """x_t = t x1 + (1 - t) x0 (rectified flow / conditional OT)."""

    scheduler: Literal["cond_ot"] = "cond_ot"


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


class CouplingConfig(Strict):
    kind: Literal[tuple(COUPLINGS)] = "independent"  # type: ignore[valid-type]
    kwargs: dict[str, Any] = {}


class TrainConfig(Strict):
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
    parameterizations: ClassVar[tuple[str, ...]] = PARAMETERIZATIONS

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _safe_name(v)

    @model_validator(mode="after")
    def _method_fits(self):
        if self.model.parameterization not in self.parameterizations:
            raise ValueError(f"model.parameterization: got '{self.model.parameterization}'; graph "
                             f"'{self.graph}' trains one of {', '.join(self.parameterizations)}")
        provides = self.provides()
        try:
            scheduler = make_scheduler(self.path.scheduler, **self.path.kwargs())
        except ValueError as e:
            raise ValueError(f"path.{e}") from None
        for i, entry in enumerate(self.sample.samplers):
            missing = get_sampler(entry.method).needs - provides
            if missing:
                raise ValueError(f"sample.samplers.{i}.method: sampler '{entry.method}' needs "
                                 f"{_needs_phrase(missing, self)}")
            for setting in settings_for(entry.method, entry.nfe, entry.params):
                try:
                    if setting.nfe:
                        time_grid(scheduler, setting.steps, setting.kwargs.get("spacing", "trailing"))
                except ValueError as e:
                    raise ValueError(f"sample.samplers.{i}.{e}") from None
        for name in self.evaluate.likelihood:
            try:
                missing = get_likelihood(name).needs - provides
            except ValueError as e:
                raise ValueError(f"evaluate.likelihood: {e}") from None
            if missing:
                raise ValueError(f"evaluate.likelihood: '{name}' needs {_needs_phrase(missing, self)}")
        return self

    @property
    def source_config(self) -> SourceConfig:
        """Where sampling starts: a graph's `source:` section, N(0, I) when it has none."""
        return getattr(self, "source", None) or SourceConfig()

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"gendag-{self.name}"

    def model_spec(self, data_shape: tuple[int, ...]) -> ModelSpec:
        """The model this config trains, for data of `data_shape`."""
        return ModelSpec(
            network=self.model.network,
            data_shape=tuple(data_shape),
            parameterization=self.model.parameterization,
            scheduler=self.path.scheduler,
            network_kwargs=dict(self.model.kwargs),
            scheduler_kwargs=self.path.kwargs(),
        )

    def provides(self) -> frozenset[str]:
        """What the trained model offers samplers (its family's list, plus a Gaussian source)."""
        extra = {"gaussian_source"} if self.source_config.name == "gaussian" else set()
        return self.model_spec(()).provides() | extra

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


def schemas() -> dict[str, type[RunConfig]]:
    """Graph name -> its config schema, from every subclass of `RunConfig`."""
    found, todo = {}, list(RunConfig.__subclasses__())
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        for name in get_args(cls.model_fields["graph"].annotation):
            found[name] = cls
    return found


# --------------------------------------------------------------------------- loading


def _set_dotted(tree: dict, dotted: str, value: Any, origin: str) -> None:
    if not dotted or any(not part for part in dotted.split(".")):
        raise ConfigError(f"{origin}: {dotted!r} is not a key; expected e.g. train.steps")
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{origin}: {dotted}: '{key}' is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` with the value read as YAML (numbers, lists, booleans)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({str(e).splitlines()[0]})") from None


def _unwrap(annotation) -> tuple[Any, dict[str, type]]:
    """A field's model class (through Optional, list and Annotated), or the members of a
    discriminated union by tag."""
    while get_origin(annotation) in (Annotated, list, Union):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if get_origin(annotation) is Union and len(args) > 1:
            return None, {tag: m for m in args for tag in get_args(m.model_fields["scheduler"].annotation)}
        annotation = args[0]
    return annotation, {}


def _walk(schema: type[BaseModel], loc: tuple) -> tuple[type[BaseModel] | None, list[str]]:
    """The config class that owns the last key of an error's `loc`, and the location as the
    user wrote it (pydantic inserts a union member's tag, e.g. path.vp.beta_min)."""
    owner, where, i = schema, [], 0
    while i < len(loc):
        part = loc[i]
        where.append(str(part))
        i += 1
        if isinstance(part, int) or owner is None:
            continue
        field = owner.model_fields.get(part)
        if field is None:
            break
        current, tags = _unwrap(field.annotation)
        if tags and i < len(loc) and loc[i] in tags:
            current, i = tags[loc[i]], i + 1
        owner = current if isinstance(current, type) and issubclass(current, BaseModel) else None
    return owner, where


def _format_error(err: ValidationError, schema: type[BaseModel]) -> str:
    first = err.errors()[0]
    owner, parts = _walk(schema, tuple(first["loc"]))
    where = ".".join(parts) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        valid = f"; valid keys: {', '.join(owner.model_fields)}" if owner else ""
        return f"{where}: unknown key{valid}"
    if first["type"] == "missing":
        return f"{where}: required key is missing"
    if first["type"] == "union_tag_invalid":
        tags = first["ctx"]["expected_tags"]
        return f"{where}.{first['ctx']['discriminator'].strip(chr(39))}: got {first['ctx']['tag']!r}; expected one of {tags}"
    if first["type"].startswith("value_error"):
        if where == "config" or re.match(rf"{re.escape(where)}[.:]", msg):
            return msg  # the message names its full key already
        if re.match(r"[\w.]+: ", msg):
            return f"{where}.{msg}"  # it names a key under `where`
        return f"{where}: {msg}"
    return f"{where}: got {first['input']!r}; {msg[0].lower()}{msg[1:]}"


def load_config(path: str | Path, scale: str = "cpu", overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply the scale overlay then `--set` overrides, validate with the
    schema of its graph."""
    path = Path(path)
    if scale not in SCALES:
        raise ConfigError(f"--scale {scale!r}: expected one of {', '.join(SCALES)}")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{path}: not valid YAML{line}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    tree = copy.deepcopy(raw)
    scales = tree.pop("scales", {}) or {}
    if not isinstance(scales, dict) or not all(isinstance(v, dict) or v is None for v in scales.values()):
        raise ConfigError(f"{path}: scales: expected a mapping of scale name -> {{dotted.key: value}}")
    unknown = set(scales) - set(SCALES)
    if unknown:
        raise ConfigError(f"{path}: scales.{sorted(unknown)[0]}: unknown scale; expected one of {', '.join(SCALES)}")
    for key, value in (scales.get(scale) or {}).items():
        _set_dotted(tree, str(key), value, f"{path}: scales.{scale}")
    apply_overrides(tree, overrides)
    return validate(tree, str(path), overrides)


def apply_overrides(tree: dict, overrides: list[str]) -> None:
    """Apply `--set key.sub=value` items to a config tree, in order."""
    for item in overrides:
        _set_dotted(tree, *parse_override(item), origin=f"--set {item!r}")


def validate(tree: dict, origin: str, overrides: list[str] = ()) -> RunConfig:
    """Validate a config tree with the schema its `graph:` names; errors name `origin` (the
    file), or the `--set` that set the offending key."""
    known = schemas()
    graph = tree.get("graph")
    if graph not in known:
        what = "required key is missing" if graph is None else f"got {graph!r}"
        raise ConfigError(f"{origin}: graph: {what}; expected one of {', '.join(sorted(known))}")
    schema = known[graph]
    try:
        return schema.model_validate(tree)
    except ValidationError as e:
        raise blame(_format_error(e, schema), origin, overrides) from None


def blame(message: str, origin: str, overrides: Sequence[str] = ()) -> ConfigError:
    """A one-line error about the key `message` starts with, naming where that key was set: the
    last `--set` of it (or of a section holding it, or of a key inside it), else `origin`."""
    key = message.split(":")[0]

    def sets_it(item: str) -> bool:
        dotted = item.split("=", 1)[0].strip()
        return bool(dotted) and (key == dotted or key.startswith(dotted + ".") or dotted.startswith(key + "."))

    blamed = [item for item in overrides if sets_it(item)]
    return ConfigError(f"--set {blamed[-1]!r}: {message}" if blamed else f"{origin}: {message}")
