"""Record a graph in MLflow and register its model version with aliases.

A graph is one MLflow run, opened when it starts (`graph_run`): a single-stage graph registers
into it, a multi-stage graph's stages are runs nested in it. The model is stored as safetensors
weights + a JSON spec, and as a standard MLflow pyfunc model built from code around them (no
pickle anywhere); a version gets the `challenger` alias, and `champion` when it beats the
current champion on the primary metric (lower is better) or when there is none yet.

Guarantees (nothing false in the registry):
- nothing non-finite is logged, registered or promoted: the metrics are checked before any of
  the registration is logged, and a champion whose score is not a number is beaten by any finite one;
- a run ends FINISHED only once everything is logged, its version is READY and its aliases
  are moved; whatever fails after it started marks it FAILED (when the store still answers)
  and reaches the user as one `RunError` line saying what was left behind;
- aliases move last, only to a READY version whose metrics are logged; when moving one
  fails, those this run already moved are put back, so no alias points at a version of a
  failed run.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import RunConfig
from tasks.infra import Ref, RunError, first_line, flatten, home, require_finite

CODE_ROOT = Path(__file__).resolve().parents[1]


OUTPUTS = "reports"  # what gendag itself writes into the checkout (`gendag table`'s tables)


def git_commit() -> str:
    """The commit of the code that ran, with `-dirty` when it had local changes. A table written
    under `reports/` by an earlier `gendag table` is an output, not a change to what ran: it does
    not mark the next run dirty."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=CODE_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", f":(exclude){OUTPUTS}")
    return commit + ("-dirty" if changed else "")


def mlflow_metric_name(name: str) -> str:
    """`fid@nfe=4` -> `fid/nfe_4` (MLflow allows letters, digits, _ - . / : and spaces)."""
    return re.sub(r"[^\w\-./: ]", "_", name.replace("@", "/").replace("=", "_").replace(",", "/"))


def best_label(metrics: dict[str, float], kind: str) -> tuple[str, str]:
    """(the primary metric, the label of the trained model's setting that scored best on it)."""
    name = {"images": "fid", "points": "w2"}[kind]
    scores = {k: v for k, v in metrics.items() if k.startswith(f"{name}@") and "untrained" not in k}
    return name, min(scores, key=scores.get).partition("@")[2]


def primary_score(metrics: dict[str, float], kind: str) -> tuple[str, float]:
    """Best value of the primary metric over the trained model's settings."""
    name, label = best_label(metrics, kind)
    return f"best_{name}", metrics[f"{name}@{label}"]  # finite: register checks the metrics first


def _store_errors() -> tuple[type[BaseException], ...]:
    """What an unavailable or failing tracking store raises (MLflow wraps most of it)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, OSError, RunError


class StoreError(RunError):
    """A store failure phrased as one line, with the state its run was left in."""


@contextmanager
def _store_step(what: str, client, run_id: str | None):
    """MLflow work: a store failure in it (or a `RunError` of the registry: a version not READY,
    an alias that did not move) marks the run FAILED and becomes one `StoreError` line naming
    `what` was done, the store and the state the run was left in."""
    from mlflow import get_tracking_uri

    try:
        yield
    except Exception as e:
        if not isinstance(e, _store_errors()) or isinstance(e, StoreError):
            raise
        raise StoreError(f"{what}: the MLflow store {get_tracking_uri()} failed: {first_line(e)}; "
                         f"{_mark_failed(client, run_id)}") from e


#: The MLflow run new runs are nested in (a table's run while it makes its cells), else None.
PARENT_RUN: ContextVar[str | None] = ContextVar("gendag_parent_run", default=None)


@contextmanager
def tracked_run(what: str, name: str, experiment: str, tags: dict[str, str], run_id: str | None = None):
    """An open MLflow run of `name` in `experiment`: a new one (nested in the run
    `PARENT_RUN` holds, if any: a table's), or `run_id` (a run the graph opened, whose end the
    graph owns) with `tags` added. Yields (client, run id). A new run ends FINISHED when the body
    succeeds; whatever fails marks the run FAILED; a store failure in opening or ending it is
    one `StoreError` line (`_store_step`)."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    client, owned = MlflowClient(), run_id is None
    _quiet_store_logs()
    with _store_step(f"{what} {name}", client, run_id):
        if owned:
            parent = PARENT_RUN.get()
            nested = {"mlflow.parentRunId": parent} if parent and "mlflow.parentRunId" not in tags else {}
            run_id = client.create_run(_experiment_id(client, experiment), run_name=name,
                                       tags=tags | nested).info.run_id
        else:
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    try:
        yield client, run_id
    except BaseException:
        _mark_failed(client, run_id)
        raise
    if owned:
        with _store_step(f"{what} {name}", client, run_id):
            client.set_terminated(run_id, "FINISHED")


@contextmanager
def recorded_run(cfg: RunConfig, model: Ref, metrics: dict[str, float], report_files: list[Path],
                 tags: dict[str, str], log_model: bool = True, run_id: str | None = None):
    """Params, config, metrics (and their NFE curves), training loss, report (and model) files in
    an MLflow run (`tracked_run`: a new one, or the graph's open `run_id`). Yields (client, run
    id, the run's artifact URI) for the caller to finish the registry work the run stands for; a
    store failure in any of it is one `StoreError` line."""
    with tracked_run("register", cfg.name, cfg.registry.experiment, tags, run_id) as (client, run_id), \
            _store_step(f"register {cfg.name}", client, run_id):
        _log(client, run_id, cfg, model, metrics, report_files, log_model)
        yield client, run_id, client.get_run(run_id).info.artifact_uri


def _quiet_store_logs() -> None:
    """MLflow logs every failed store call with a traceback before raising it; gendag reports the
    failure itself, once, in one line."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _mark_failed(client, run_id: str | None) -> str:
    """Mark a started run FAILED (best effort: the store may be the thing that failed)."""
    if run_id is None:
        return "no run was recorded"
    try:
        client.set_terminated(run_id, "FAILED")
        return f"run {run_id} is marked FAILED"
    except Exception:  # noqa: BLE001 - the store is down: say so instead
        return f"run {run_id} could not be marked FAILED (it stays RUNNING)"


def _log(client, run_id: str, cfg: RunConfig, model: Ref, metrics: dict[str, float], report_files: list[Path],
         log_model: bool) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    state = model.path / "state.json"
    trained = json.loads(state.read_text()) if state.exists() else {}
    losses = trained.get("losses", [])
    if trained.get("workers"):  # which Ray node each training worker ran on
        client.set_tag(run_id, "gendag.train_nodes", ",".join(w["node"][:12] for w in trained["workers"]))
    params = [Param(k, str(v)[:500]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
        client.log_batch(run_id, params=params[i:i + 100])
    _log_metrics(client, run_id, metrics, [Metric("train_loss", loss, now, step) for step, loss in losses])
    client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")
    for file in report_files:
        client.log_artifact(run_id, str(file), artifact_path="report")
    for file in ("model.safetensors", "model.json") if log_model else ():
        client.log_artifact(run_id, str(model.path / file), artifact_path="model")


def _log_pyfunc(client, run_id: str, model: Ref, source: Ref | None, setting) -> None:
    """The model as a standard MLflow model under `pyfunc/` (`tasks/pyfunc_model.py`: models from
    code, no pickle), sampling with `setting`: what the registered version points at."""
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import save_model
    from mlflow.types import ColSpec, Schema

    artifacts = {"weights": str(model.path / "model.safetensors"), "spec": str(model.path / "model.json")}
    if source:
        artifacts["source"] = str(source.path / "test.npy")
    sampler = {"method": setting.method, "nfe": setting.nfe, "params": dict(setting.params)}
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Path(tmp) / "pyfunc", python_model=str(CODE_ROOT / "tasks" / "pyfunc_model.py"),
                   artifacts=artifacts, code_paths=[str(CODE_ROOT / "models")], model_config={"sampler": sampler},
                   signature=ModelSignature(Schema([ColSpec("long", "n"), ColSpec("long", "seed", required=False)])),
                   input_example={"n": 16, "seed": 0},
                   pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}",
                                     "safetensors", "numpy"])
        client.log_artifacts(run_id, str(Path(tmp) / "pyfunc"), artifact_path="pyfunc")


def curve_point(name: str) -> tuple[str, int] | None:
    """The point of a quality-against-NFE curve a metric is: `fid@euler,nfe=16` -> (`fid@euler`, 16),
    `2-RF/w2@ddim,nfe=4,eta=0` -> (`2-RF/w2@ddim,eta=0`, 4); the untrained baseline's under
    `baseline/`; None for a metric of no fixed NFE (an adaptive solver, a floor, `nfe@` itself)."""
    from models.samplers import parse_label

    head, at, label = name.rpartition("@")
    if not at or head.rpartition("/")[2] == "nfe":
        return None
    method, params = parse_label(label)
    nfe = params.pop("nfe", None)
    if nfe is None or not nfe.isdigit():
        return None
    prefix = "baseline/" if params.pop("untrained", None) else ""
    return f"{prefix}{head}@{','.join([method, *(f'{k}={v}' for k, v in params.items())])}", int(nfe)


def _log_metrics(client, run_id: str, metrics: dict[str, float], more: list | None = None) -> None:
    """Every metric under its own name (step 0) and, for a sampler setting of a fixed NFE, also as
    a point of its curve (step = NFE, `curve_point`), so that the UI draws quality against NFE."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(mlflow_metric_name(k), v, now, 0) for k, v in metrics.items()]
    values += [Metric(mlflow_metric_name(curve), v, now, step) for k, v in metrics.items()
               for curve, step in [curve_point(k) or (None, 0)] if curve]
    values += more or []
    for i in range(0, len(values), 1000):
        client.log_batch(run_id, metrics=values[i:i + 1000])


def log_datasets(client, run_id: str, datasets: dict[str, Ref | None]) -> None:
    """Each dataset (MLflow's context, e.g. `train` or `source`, -> its version) as an input of
    the run: named by its folder, its digest the DVC hash (`<md5>.dir`: MLflow keeps 36 characters,
    as many as it has), its source the folder."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client.log_inputs(run_id, datasets=[
        DatasetInput(Dataset(name=ref.path.name, digest=ref.hash[:36], source_type="local",
                             source=json.dumps({"uri": ref.path.as_uri()})),
                     [InputTag("mlflow.data.context", context)])
        for context, ref in datasets.items() if ref])


def describe(cfg: RunConfig, result: str = "", model: dict | None = None) -> str:
    """What a run or model version is (graph, data, method, `result`) and, given the registered
    `model` ({name, version}), how to load it: the `mlflow.note.content` tag and the version's
    description (Markdown in the MLflow UI)."""
    source = cfg.source_config.as_data()
    text = (f"gendag **{cfg.graph}** `{cfg.name}` on **{cfg.data.name}**"
            f"{f' from {source.name}' if source else ''}, objective `{cfg.objective}`{'; ' + result if result else ''}.")
    if model:
        uri = f"models:/{model['name']}/{model['version']}"
        text += (f"\n\nModel {model['name']} v{model['version']}. Load it:\n\n    gendag sample {uri}\n"
                 f"    mlflow.pyfunc.load_model('{uri}').predict({{'n': 16, 'seed': 0}})\n")
    return text


class GraphRun:
    """The open MLflow run of a graph (`graph_run`): its id, and what the graph itself logs there."""

    def __init__(self, client, run_id: str, name: str) -> None:
        self.client, self.run_id, self.name = client, run_id, name

    def log_datasets(self, datasets: dict[str, Ref | None]) -> None:
        """The graph's data (MLflow's context -> its version) as the run's inputs."""
        with _store_step(f"graph {self.name}", self.client, self.run_id):
            log_datasets(self.client, self.run_id, datasets)

    def log_results(self, metrics: dict[str, float], report_files: list[Path], description: str) -> None:
        """A multi-stage graph's own metrics (e.g. `2-rf/w2@euler,nfe=1`), report files and description."""
        require_finite(metrics, "graph results")
        with _store_step(f"graph {self.name}", self.client, self.run_id):
            _log_metrics(self.client, self.run_id, metrics)
            _describe(self.client, self.run_id, description)
            for file in report_files:
                self.client.log_artifact(self.run_id, str(file), artifact_path="report")


@contextmanager
def graph_run(cfg: RunConfig, tags: dict[str, str]):
    """The MLflow run of a whole graph, opened when it starts, so that its start and end times
    span it. A single-stage graph's registration logs into it (`register(..., run=)`); a
    multi-stage graph's stages are runs nested in it (`register(..., parent=)`). Yields a
    `GraphRun`; FINISHED when the body succeeds, FAILED otherwise (`tracked_run`)."""
    tags = {"gendag.graph": cfg.graph, "gendag.dataset": cfg.data.name, "mlflow.note.content": describe(cfg), **tags}
    with tracked_run("graph", cfg.name, cfg.registry.experiment, tags) as (client, run_id):
        with _store_step(f"graph {cfg.name}", client, run_id):
            client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")
        yield GraphRun(client, run_id, cfg.name)


@task(name="register", cache_policy=NO_CACHE)
def register(cfg: RunConfig, kind: str, model: Ref, data: Ref, metrics: dict[str, float],
             report_files: list[Path], lineage: dict[str, str], parent: str | None = None,
             run: str | None = None, source: Ref | None = None) -> dict:
    """Log params, config, metrics, lineage, the data, plots and the model (its files, and an
    MLflow pyfunc model sampling with its best setting, from `source` when it starts from a
    dataset); register a READY version; describe both; then, last, move the aliases
    (`registry.alias`, and `registry.champion_alias` if it wins). With `parent` (a graph's MLflow
    run id) the run is nested in it; with `run` (the graph's own open run) all of it goes into
    that run."""
    from models.sampling import sampling_grid

    require_finite(metrics, f"register {cfg.name}")
    score_name, score = primary_score(metrics, kind)
    label = best_label(metrics, kind)[1]
    setting = next(s for s in sampling_grid(cfg.sample.samplers, baseline=False) if s.label == label)
    tags = {"gendag.graph": cfg.graph, "gendag.dataset": cfg.data.name, **lineage}
    nested = {"mlflow.parentRunId": parent} if parent else {}
    name = cfg.model_name
    with recorded_run(cfg, model, metrics | {score_name: score}, report_files, tags | nested, run_id=run) as (
            client, run_id, artifacts):
        log_datasets(client, run_id, {"train": data, "source": source})
        _log_pyfunc(client, run_id, model, source, setting)
        current = dict(_registered_model(client, name, cfg.graph).aliases)  # alias -> version, as found
        version = _ready_version(client, name, f"{artifacts}/pyfunc", run_id, {**tags, score_name: str(score)})
        _describe(client, run_id, describe(cfg, f"{score_name} = {score:.4g}", {"name": name, "version": version}),
                  name, version)
        aliases = [cfg.registry.alias]
        if cfg.registry.auto_champion and _beats(client, name, current.get(cfg.registry.champion_alias), score_name, score):
            aliases.append(cfg.registry.champion_alias)
        _move_aliases(client, name, version, aliases, current)
    return {"run_id": run_id, "name": name, "version": int(version), "aliases": aliases, score_name: score}


@task(name="log-evaluation", cache_policy=NO_CACHE)
def log_evaluation(cfg: RunConfig, model: Ref, metrics: dict[str, float], report_files: list[Path],
                   lineage: dict[str, str], version: dict, parent: str | None = None, run: str | None = None) -> dict:
    """An MLflow run for a new evaluation of a registered model version (no new version, no
    alias moved), tagged with the version it evaluated and its training run (nested in `parent`,
    or the graph's own open `run`)."""
    require_finite(metrics, f"log-evaluation {cfg.name}")
    tags = {"gendag.graph": cfg.graph, "gendag.dataset": cfg.data.name, **lineage,
            "gendag.evaluated_model": f"{version['name']}/{version['version']}",
            "gendag.evaluated_model_run_id": version["run_id"]}
    if parent:
        tags["mlflow.parentRunId"] = parent
    with recorded_run(cfg, model, metrics, report_files, tags, log_model=False, run_id=run) as (client, run_id, _):
        _describe(client, run_id, describe(cfg, f"a new evaluation of {version['name']} v{version['version']}", version))
    return {"run_id": run_id, "name": version["name"], "version": int(version["version"]), "aliases": []}


def _describe(client, run_id: str, text: str, name: str | None = None, version: str | None = None) -> None:
    """`text` as the run's description (and the model version's, given one)."""
    client.set_tag(run_id, "mlflow.note.content", text)
    if version:
        client.update_model_version(name, version, description=text)


def _get_or_create(get, create):
    """`get()`, else `create()`; when another process created it in between (two graphs
    registering at once on a shared server), `get()` again."""
    from mlflow.exceptions import MlflowException

    try:
        found = get()
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        found = None
    if found is not None:
        return found
    try:
        return create()
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return get()


def _registered_model(client, name: str, graph: str):
    """The registered model `name`, created if missing."""
    return _get_or_create(lambda: client.get_registered_model(name),
                          lambda: client.create_registered_model(name, description=f"gendag {graph} models"))


def _ready_version(client, name: str, source: str, run_id: str, tags: dict[str, str]) -> str:
    """A new version of `name` for the run's model, once the registry says it is READY."""
    version = client.create_model_version(name, source=source, run_id=run_id, tags=tags)  # waits for READY
    if version.status != "READY":
        raise RunError(f"model version {name}/{version.version} is {version.status}, not READY")
    return version.version


def _beats(client, name: str, champion: str | None, score_name: str, score: float) -> bool:
    """Whether `score` takes the champion alias: there is no champion, its run has no such score,
    its score is not a number, or `score` is lower."""
    if champion is None:
        return True
    current = client.get_run(client.get_model_version(name, champion).run_id).data.metrics.get(score_name)
    return current is None or not math.isfinite(current) or score < current


def _move_aliases(client, name: str, version: str, aliases: list[str], previous: dict[str, str]) -> None:
    """Point every alias at `version`; if one fails, put those already moved back where they were
    (`previous`: alias -> version), so no alias is left on a version whose run failed."""
    moved = []
    try:
        for alias in aliases:
            client.set_registered_model_alias(name, alias, version)
            moved.append(alias)
    except Exception as e:
        stuck = []
        for alias in moved:
            try:
                if alias in previous:
                    client.set_registered_model_alias(name, alias, previous[alias])
                else:
                    client.delete_registered_model_alias(name, alias)
            except Exception:  # noqa: BLE001 - reported below
                stuck.append(alias)
        left = (f"alias {', '.join(stuck)} could not be put back" if stuck
                else f"version {version} has no alias and no alias moved")
        raise RunError(f"moving alias '{aliases[len(moved)]}' to {name}/{version} failed: {first_line(e)}; {left}") from e


def _experiment_id(client, name: str) -> str:
    """The experiment's id, created if missing; with a local SQLite store, artifacts go to the workspace."""
    import mlflow

    local = mlflow.get_tracking_uri().startswith("sqlite:")
    location = (home() / "mlartifacts").as_uri() if local else None
    found = _get_or_create(lambda: client.get_experiment_by_name(name),
                           lambda: client.create_experiment(name, artifact_location=location))
    return found if isinstance(found, str) else found.experiment_id
