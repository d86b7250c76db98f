"""Preflight: refuse, in seconds and before Prefect or Ray start, a run that cannot succeed.

Everything knowable from the config and its input files is checked here, so a mistake costs
one line and no service start-up, and nothing is written (no run folder, data version, MLflow
run or DVC file):

- the output folder and the workspace can be created and written;
- the data (and a source dataset) load: files readable, finite, of a usable shape and dtype,
  images decodable (`models.data` names the file); torchvision datasets only have their files
  checked; flow matching from a dataset needs both ends of the same item shape; a registered
  model being re-sampled was trained on items of the data's shape;
- the network is built (on PyTorch's `meta` device: no memory, no weights) and run once on the
  real item shape, so a keyword it does not take or a shape it cannot handle is named; the
  coupling is built from its keyword arguments;
- resources: on the local Ray (no `RAY_ADDRESS`) the Ray Train and sampling workers need one
  CPU each, and a GPU each when asked for one;
- memory: the training set and model per worker, the sample sets the driver gathers, and exact
  W2 (POT's network simplex) must fit in the memory available now.

Config types were checked when the config was read (`tasks.config`). Every error is one line
naming the key, file or value and what was expected; keys are blamed on the `--set` that set
them, else on the config (`tasks.config_loading.blame`).
"""

from __future__ import annotations

import inspect
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from models.data import TORCHVISION, DatasetError, DatasetSpec, check_torchvision_files, data_shape, load_dataset
from tasks.config import ConfigError, DataConfig, RunConfig

# Exact W2 (POT's emd on float64) peaks at about 4.6 GB for 10,000 x 10,000 points
from tasks.config_loading import blame
# (models.metrics.wasserstein2): bytes per (sample, reference) pair.
W2_BYTES_PER_PAIR = 46
# Per training worker, what the weights cost: weights, EMA copy, gradients and Adam's two moments.
WEIGHT_COPIES = 5
# Per training example in a batch: x0, x1, x_t, target, prediction and the gradient of each.
BATCH_COPIES = 8
FLOAT = 4  # bytes of a float32


class PreflightError(ValueError):
    """A problem found before any work, as one line starting with the key it is about."""


class DataFacts(NamedTuple):
    shape: tuple[int, ...]  # of one item
    train_bytes: int  # what a training worker holds: the training split (and the source's)
    test_items: int | None  # None: not read (torchvision)


def preflight(cfg: RunConfig, out: Path, origin: str, overrides: Sequence[str] = (),
              model_dir: Path | None = None) -> None:
    """Raise `ConfigError` (one line) if the run of `cfg` into `out` cannot succeed. With
    `model_dir` (a trained model being re-sampled) nothing about training is checked."""
    from tasks.infra import home

    writable(home(), "workspace (GENDAG_HOME)")
    writable(out, "output folder", "; choose another with --out")
    try:
        data = check_data(cfg, model_dir)
        _check_teacher(cfg, data.shape)
        params = 0
        if model_dir is None:
            params = _check_network(cfg, data.shape)
            _check_coupling(cfg)
        _check_resources(cfg, train=model_dir is None)
        _check_memory(cfg, data, params)
    except PreflightError as e:
        raise blame(str(e), origin, overrides) from None


def require_registry(reference: str) -> None:
    """`gendag sample` reads a registry: refuse a local (SQLite) one that does not exist yet
    instead of creating an empty one."""
    from tasks.infra import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"{reference}: no MLflow registry here ({uri} does not exist); "
                          "`gendag run` registers models, or set MLFLOW_TRACKING_URI")


def _check_teacher(cfg: RunConfig, shape: tuple[int, ...]) -> None:
    """A graph's registered teacher (`teacher: models:/...`) exists, is a denoiser (a network on a
    Gaussian path: what DDIM and probability-flow ODE steps run on) and is the model the config
    describes, since its students start from its weights."""
    reference = getattr(cfg, "teacher", None)
    if not reference:
        return
    from dataclasses import asdict

    from models.checkpoint import SPEC_FILE, ModelSpec
    from tasks.infra import configure_environment
    from tasks.registry import RegistryError, fetch_model_version

    try:
        require_registry(reference)
    except ConfigError as e:
        raise PreflightError(f"teacher: {e}") from None
    configure_environment()
    try:
        _, folder, _ = fetch_model_version(reference)
    except RegistryError as e:
        raise PreflightError(f"teacher: {e}") from None
    spec = ModelSpec.from_json((folder / SPEC_FILE).read_text())
    if spec.family != "denoiser":
        raise PreflightError(f"teacher: {reference} is a '{spec.family}' model; graph '{cfg.graph}' needs a "
                             "denoiser (a network on a Gaussian path) to take DDIM or probability-flow ODE steps with")
    wanted, found = asdict(cfg.model_spec(shape)), asdict(spec)
    differ = [k for k in wanted if wanted[k] != found[k]]
    if differ:
        key = differ[0]
        raise PreflightError(f"teacher: {reference} has {key} {getattr(spec, key)!r} but this config's model has "
                             f"{wanted[key]!r}; set the model and path sections to the teacher's (its students "
                             "start from its weights)")


def writable(folder: Path, what: str, hint: str = "") -> None:
    """`folder` exists as a writable folder, or can be created: its nearest existing ancestor is a
    folder where a file can be created (tried with an anonymous temporary file, never left behind)."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{what} {folder}: {existing} is a file, not a folder{hint}")
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise ConfigError(f"{what} {folder}: cannot write in {existing} ({e.strerror}){hint}") from None


# --------------------------------------------------------------------------- data


def check_data(cfg: RunConfig, model_dir: Path | None) -> DataFacts:
    data = _load("data", cfg.data, cfg.seed)
    shape = data.shape
    source_config = cfg.source_config.as_data()
    if source_config is not None:
        source = _load("source", source_config, cfg.seed + 1)  # the seed prepare_data uses
        if source.shape != shape:
            raise PreflightError(f"source: {source_config.name} items have shape {source.shape} but the data's "
                                 f"({cfg.data.name}) have shape {shape}; flow matching from a dataset needs "
                                 "both ends of the same shape")
        data = data._replace(train_bytes=data.train_bytes + source.train_bytes)
    if model_dir is not None:
        from models.checkpoint import SPEC_FILE, ModelSpec

        trained = tuple(ModelSpec.from_json((Path(model_dir) / SPEC_FILE).read_text()).data_shape)
        if trained != shape:
            raise PreflightError(f"data: {cfg.data.name} items have shape {shape} but the model was trained "
                                 f"on items of shape {trained}")
    return data


def _load(section: str, data: DataConfig, seed: int) -> DataFacts:
    """Load a dataset section as the pipeline will (torchvision: only check its files), naming
    the section (`data` or `source`) in its errors."""
    spec = data.spec(seed)
    try:
        _fits_before_loading(section, spec)
        if spec.name in TORCHVISION:
            return DataFacts(check_torchvision_files(spec), 0, None)  # sizes only known once read
        splits = load_dataset(spec)
    except DatasetError as e:
        message = str(e)
        raise PreflightError(section + message[len("data"):] if message.startswith("data.") else message) from None
    return DataFacts(data_shape(splits), splits.train.nbytes, len(splits.test))


def _fits_before_loading(section: str, spec: DatasetSpec) -> None:
    """Refuse a dataset too large to load for a look: a .npy file, or toy points by the count asked."""
    from models.data import DEFAULT_TOY_TEST, DEFAULT_TOY_TRAIN, TOY_2D

    if spec.name == "npy" and spec.path and Path(spec.path).is_file():
        _fits(f"{section}.path", os.path.getsize(spec.path), f"loading {spec.path} needs")
    elif spec.name in TOY_2D:
        n = (spec.n_train or DEFAULT_TOY_TRAIN) + (spec.n_test or DEFAULT_TOY_TEST)
        _fits(f"{section}.n_train", n * 2 * 8 * 3, f"{n} {spec.name} points need")  # float64, a few copies


# --------------------------------------------------------------------------- what gets built


def _check_network(cfg: RunConfig, shape: tuple[int, ...]) -> int:
    """Build the network on the `meta` device (no memory, no weights) and run it once on a batch
    of 2 items of the data's shape; its parameter count."""
    import torch

    from models.networks import NETWORKS, build_network

    if cfg.family == "normalizing_flow":
        return _check_flow(cfg, shape)
    kind, kwargs = cfg.model.network, dict(cfg.model.kwargs)
    what = f"network '{kind}'"
    with torch.device("meta"):  # the network alone: its scheduler was built when the config was read
        net = _build("model", what, kwargs, NETWORKS[kind], lambda: build_network(kind, shape, **kwargs))
        try:
            net(torch.empty(2, *shape), torch.empty(2))
        except (RuntimeError, ValueError, TypeError, IndexError) as e:
            raise PreflightError(f"model: {what} with {kwargs} cannot run on items of shape {shape} "
                                 f"({_first_line(e)})") from None
    return sum(p.numel() for p in net.parameters())


def _check_flow(cfg: RunConfig, shape: tuple[int, ...]) -> int:
    """Build the normalizing flow (on the CPU: its LU factors are computed at construction) and
    take the log-density of 2 items of the data's shape; its parameter count."""
    import torch

    from models.normalizing_flows import build_flow

    kwargs = dict(cfg.model.kwargs)
    what = f"flow '{cfg.graph}'"
    flow = _build("model", what, kwargs, build_flow, lambda: build_flow(cfg.graph, shape, **kwargs))
    try:
        with torch.no_grad():
            flow.log_prob(torch.zeros(2, *shape))
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise PreflightError(f"model: {what} with {kwargs} cannot run on items of shape {shape} "
                             f"({_first_line(e)})") from None
    return sum(p.numel() for p in flow.parameters())


def _check_coupling(cfg: RunConfig) -> None:
    coupling = getattr(cfg, "coupling", None)
    if coupling is None:
        return
    from models.couplings import COUPLINGS, make_coupling

    _build("coupling", f"coupling '{coupling.kind}'", dict(coupling.kwargs), COUPLINGS[coupling.kind],
           lambda: make_coupling(coupling.kind, **coupling.kwargs))


def _build(section: str, what: str, kwargs: dict, cls: type, build: Callable):
    """`build()` of `what` from the `kwargs` of a config section, its errors as one line: a
    keyword `cls` does not take is named (`<section>.kwargs.<key>`) with the ones it does."""
    try:
        return build()
    except (TypeError, ValueError, RuntimeError) as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if not unknown:
            raise PreflightError(f"{section}: {what} cannot be built with {kwargs} ({_first_line(e)})") from None
        fixed = {"self", "dim", "in_channels"}  # filled in from the data, not the config
        valid = [name for name in inspect.signature(cls).parameters if name not in fixed]
        raise PreflightError(f"{section}.kwargs.{unknown[1]}: not an argument of {what}; "
                             f"valid: {', '.join(valid)}") from None


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --------------------------------------------------------------------------- resources


def _check_resources(cfg: RunConfig, train: bool) -> None:
    """On the local Ray (sized to this machine), every worker needs a CPU, and a GPU if asked for.
    A cluster (`RAY_ADDRESS`) is not asked: Ray would have to start for that."""
    if os.environ.get("RAY_ADDRESS"):
        return
    import torch

    cpus = os.cpu_count() or 1
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    hint = "or set RAY_ADDRESS to use a Ray cluster"
    requests = [("sample.num_workers", cfg.sample.num_workers, "sample.device" if cfg.sample.device == "cuda" else None)]
    if train:
        requests.insert(0, ("train.num_workers", cfg.train.num_workers, "train.use_gpu" if cfg.train.use_gpu else None))
    for key, workers, gpu_key in requests:
        if workers > cpus:
            raise PreflightError(f"{key}: {workers} workers need {workers} CPUs (one each); this machine has "
                                 f"{cpus}: lower it, {hint}")
        if gpu_key and gpus == 0:
            raise PreflightError(f"{gpu_key}: asks for a CUDA GPU; this machine has none (torch.cuda.is_available() "
                                 f"is False): use the cpu, {hint}")
        if gpu_key and workers > gpus:
            raise PreflightError(f"{key}: {workers} workers need a CUDA GPU each; this machine has {gpus}: "
                                 f"lower it, {hint}")


# --------------------------------------------------------------------------- memory


def available_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def _fits(key: str, nbytes: float, what: str) -> None:
    available = available_memory()
    if nbytes > available:
        raise PreflightError(f"{key}: {what} {_size(nbytes)} of memory; {_size(available)} is available now")


def _size(nbytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes:.0f} bytes"


def _check_memory(cfg: RunConfig, data: DataFacts, params: int) -> None:
    """Lower bounds of what each phase holds at once, each against the memory available now."""
    from models.metrics import W2_REFERENCE_POINTS
    from models.sampling import sample_count, sampling_grid

    shape, data_bytes = data.shape, data.train_bytes
    item = math.prod(shape) * FLOAT
    local = not os.environ.get("RAY_ADDRESS")  # workers elsewhere have their own memory
    if params and local:
        workers = max(cfg.train.num_workers, 1)
        _fits("model.kwargs", workers * (data_bytes + WEIGHT_COPIES * FLOAT * params),
              f"{workers} training worker(s), each with the data and a network of {params:,} parameters, need")
        _fits("train.batch_size", workers * BATCH_COPIES * cfg.train.batch_size * item,
              f"batches of {cfg.train.batch_size} items of shape {shape} on {workers} worker(s) need")
    grid = sampling_grid(cfg.sample.samplers)
    n, sets = cfg.sample.n_samples, cfg.sample.sets
    total = sum(sample_count(setting, n, sets) for setting in grid)
    _fits("sample.n_samples", total * item,
          f"{len(grid)} settings (the untrained baseline included) of {sets} set(s) of {n} samples of shape {shape} need")
    if len(shape) == 1 and local:  # point clouds are scored by exact W2, one Ray task per CPU
        reference = min(cfg.evaluate.n_reference or W2_REFERENCE_POINTS, data.test_items or W2_REFERENCE_POINTS)
        at_once = min(os.cpu_count() or 1, total // n + sets)
        _fits("sample.n_samples", at_once * n * reference * W2_BYTES_PER_PAIR,
              f"exact W2 of {n} samples against {reference} reference points, {at_once} at a time, needs")
