"""Run configuration: YAML validated by pydantic, with scale overlays and `--set` overrides.

A config file holds the `cpu` scale values; its `scales:` section holds dotted
overrides for the other scales (`tiny` for tests, `paper` for GPU clusters). Every
error is one line naming the offending key and what was expected.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.checkpoint import ModelSpec
from models.couplings import COUPLINGS
from models.data import DATASETS
from models.networks import NETWORKS
from models.parameterization import PARAMETERIZATIONS
from models.paths import SCHEDULERS
from models.solvers import ADAPTIVE_METHODS, FIXED_STEP_METHODS
from models.training import LR_SCHEDULES

SCALES = ("tiny", "cpu", "paper")
GRAPHS = ("flow-matching",)


class ConfigError(ValueError):
    """A config problem, phrased as one line for the user."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PositiveInt = Annotated[int, Field(gt=0)]


class _DatasetFields(Strict):
    n_train: PositiveInt | None = None
    n_test: PositiveInt | None = None
    path: str | None = None
    image_size: PositiveInt | None = None
    channels: Literal[1, 3] | None = None
    download: bool = False

    @model_validator(mode="after")
    def _path_when_needed(self):
        if self.name in ("npy", "image_folder") and not self.path:
            raise ValueError(f"dataset '{self.name}' needs a path (a .npy file or an image folder)")
        return self


class DataConfig(_DatasetFields):
    name: Literal[DATASETS]  # type: ignore[valid-type]


class SourceConfig(_DatasetFields):
    """The t=0 end of the path: standard normal, or any dataset (flow matching needs no Gaussian)."""

    name: Literal[("gaussian",) + DATASETS] = "gaussian"  # type: ignore[valid-type]

    def as_data(self) -> DataConfig | None:
        return None if self.name == "gaussian" else DataConfig(**self.model_dump())


class PathConfig(Strict):
    scheduler: Literal[tuple(SCHEDULERS)] = "cond_ot"  # type: ignore[valid-type]
    kwargs: dict[str, float] = {}


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
    lr: Annotated[float, Field(gt=0)] = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    lr_schedule: Literal[LR_SCHEDULES] = "constant"  # type: ignore[valid-type]
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    num_workers: Annotated[int, Field(ge=0)] = 2
    checkpoint_every: PositiveInt = 500
    log_every: PositiveInt = 50


class SolverConfig(Strict):
    method: Literal[FIXED_STEP_METHODS + ADAPTIVE_METHODS]  # type: ignore[valid-type]
    nfe: list[PositiveInt] = []
    atol: Annotated[float, Field(gt=0)] = 1e-5
    rtol: Annotated[float, Field(gt=0)] = 1e-5

    @model_validator(mode="after")
    def _nfe_matches_method(self) -> "SolverConfig":
        if self.method in ADAPTIVE_METHODS and self.nfe:
            raise ValueError(f"solver '{self.method}' is adaptive: give atol/rtol, not nfe")
        if self.method in FIXED_STEP_METHODS and not self.nfe:
            raise ValueError(f"solver '{self.method}' needs a list of nfe, e.g. [1, 2, 4, 8]")
        return self


class SampleConfig(Strict):
    n_samples: PositiveInt = 1000
    # Independent sample sets of n_samples each; metrics are their mean. FID from a few hundred
    # images moves by as much as the real-data floor from one noise draw to the next.
    sets: PositiveInt = 1
    shard_size: PositiveInt = 500
    num_workers: PositiveInt = 2
    solvers: list[SolverConfig] = [SolverConfig(method="euler", nfe=[1, 2, 4, 8, 16, 100])]
    trajectories: Annotated[int, Field(ge=0)] = 256


class EvaluateConfig(Strict):
    n_reference: PositiveInt | None = None
    feature_epochs: PositiveInt = 30
    inception_weights: str | None = None
    kid_subset_size: PositiveInt | None = None


class RegisterConfig(Strict):
    model_name: str | None = None
    experiment: str = "gendag"
    alias: str = "challenger"
    champion_alias: str = "champion"


class RunConfig(Strict):
    graph: Literal[GRAPHS]  # type: ignore[valid-type]
    name: str
    seed: Annotated[int, Field(ge=0)] = 0
    data: DataConfig
    source: SourceConfig = SourceConfig()
    path: PathConfig = PathConfig()
    model: ModelConfig = ModelConfig()
    coupling: CouplingConfig = CouplingConfig()
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegisterConfig = RegisterConfig()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "-_." for c in v):
            raise ValueError(f"'{v}' must be letters, digits, '-', '_' or '.'")
        return v

    @property
    def model_name(self) -> str:
        return self.registry.model_name or f"gendag-{self.name}"

    def model_spec(self, data_shape: tuple[int, ...]) -> ModelSpec:
        """The network, path and parameterization this config trains, for data of `data_shape`."""
        return ModelSpec(
            network=self.model.network,
            data_shape=tuple(data_shape),
            parameterization=self.model.parameterization,
            scheduler=self.path.scheduler,
            network_kwargs=dict(self.model.kwargs),
            scheduler_kwargs=dict(self.path.kwargs),
        )

    def digest(self) -> str:
        """Content hash of everything that changes the numbers (the config hash in lineage)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is a value, not a section")
        node = child
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`key.sub=value` with the value read as YAML (numbers, lists, booleans)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.steps=100")
    key, raw = item.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def _section(loc: tuple) -> type[BaseModel] | None:
    """The config class that owns the key at `loc` (to list its valid keys)."""
    model: type[BaseModel] = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        annotation = getattr(annotation, "__args__", (annotation,))[0]  # list[X] -> X
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        section = _section(first["loc"])
        valid = f"; valid keys: {', '.join(section.model_fields)}" if section else ""
        return f"{where}: unknown key{valid}"
    if first["type"] == "missing":
        return f"{where}: required key is missing"
    if not first["type"].startswith("value_error"):
        msg = f"got {first['input']!r}; {msg[0].lower()}{msg[1:]}"
    return f"{where}: {msg}"


def load_config(path: str | Path, scale: str = "cpu", overrides: list[str] = ()) -> RunConfig:
    """Read a YAML config, apply the scale overlay then `--set` overrides, validate."""
    path = Path(path)
    if scale not in SCALES:
        raise ConfigError(f"--scale {scale!r}: expected one of {', '.join(SCALES)}")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    tree = copy.deepcopy(raw)
    scales = tree.pop("scales", {}) or {}
    unknown = set(scales) - set(SCALES)
    if unknown:
        raise ConfigError(f"{path}: scales.{sorted(unknown)[0]}: unknown scale; expected one of {', '.join(SCALES)}")
    for key, value in (scales.get(scale) or {}).items():
        _set_dotted(tree, key, value)
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_format_error(e)}") from None
