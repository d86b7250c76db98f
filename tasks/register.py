"""Record a run in MLflow and register its model version with aliases.

The model is stored as safetensors weights + a JSON spec (no pickle); a version
gets the `challenger` alias, and `champion` when it beats the current champion
on the primary metric (lower is better) or when there is none yet.

Guarantees (nothing false in the registry):
- nothing non-finite is logged, registered or promoted: the metrics are checked before the
  run starts, and a champion whose score is not a number is beaten by any finite one;
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
import time
from contextlib import contextmanager
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import RunConfig
from tasks.infra import Ref, RunError, first_line, flatten, home, require_finite

CODE_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    """The commit of the code that ran, with `-dirty` when it had local changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=CODE_ROOT, capture_output=True, text=True).stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def mlflow_metric_name(name: str) -> str:
    """`fid@nfe=4` -> `fid/nfe_4` (MLflow allows letters, digits, _ - . / : and spaces)."""
    return re.sub(r"[^\w\-./: ]", "_", name.replace("@", "/").replace("=", "_").replace(",", "/"))


def primary_score(metrics: dict[str, float], kind: str) -> tuple[str, float]:
    """Best value of the primary metric over the trained model's settings."""
    name = {"images": "fid", "points": "w2"}[kind]
    scores = {k: v for k, v in metrics.items() if k.startswith(f"{name}@") and "untrained" not in k}
    best = min(scores, key=scores.get)
    return f"best_{name}", scores[best]  # finite: register checks the metrics first


def _store_errors() -> tuple[type[BaseException], ...]:
    """What an unavailable or failing tracking store raises (MLflow wraps most of it)."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    return MlflowException, SQLAlchemyError, OSError, RunError


@contextmanager
def recorded_run(cfg: RunConfig, model: Ref, metrics: dict[str, float], report_files: list[Path],
                 tags: dict[str, str], log_model: bool = True):
    """One MLflow run: params, config, metrics, training loss, report (and model) files. Yields
    (client, run id, the model folder's artifact URI) for the caller to finish the work the run
    stands for; the run ends FINISHED when that is done, FAILED if anything fails, and a store
    failure becomes a `RunError` naming the store and the state the run was left in."""
    from mlflow import MlflowClient, get_tracking_uri

    client, run_id = MlflowClient(), None
    try:
        _quiet_store_logs()
        run = client.create_run(_experiment_id(client, cfg.registry.experiment), run_name=cfg.name, tags=tags)
        run_id = run.info.run_id
        _log(client, run_id, cfg, model, metrics, report_files, log_model)
        yield client, run_id, f"{run.info.artifact_uri}/model"
        client.set_terminated(run_id, "FINISHED")
    except BaseException as e:
        left = _mark_failed(client, run_id)
        if isinstance(e, _store_errors()):
            raise RunError(f"register {cfg.name}: the MLflow store {get_tracking_uri()} failed: "
                           f"{first_line(e)}; {left}") from e
        raise


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
    losses = json.loads(state.read_text())["losses"] if state.exists() else []
    params = [Param(k, str(v)[:500]) for k, v in flatten(cfg.model_dump(mode="json")).items()]
    values = [Metric(mlflow_metric_name(k), v, now, 0) for k, v in metrics.items()]
    values += [Metric("train_loss", loss, now, step) for step, loss in losses]
    for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
        client.log_batch(run_id, params=params[i:i + 100])
    for i in range(0, len(values), 1000):
        client.log_batch(run_id, metrics=values[i:i + 1000])
    client.log_dict(run_id, cfg.model_dump(mode="json"), "config.json")
    for file in report_files:
        client.log_artifact(run_id, str(file), artifact_path="report")
    for file in ("model.safetensors", "model.json") if log_model else ():
        client.log_artifact(run_id, str(model.path / file), artifact_path="model")


@contextmanager
def graph_run(cfg: RunConfig, tags: dict[str, str]):
    """The parent MLflow run of a multi-stage graph, open while the graph runs; each stage's run
    is nested in it (`register(..., parent=)`). Yields (client, run id); FINISHED when the body
    succeeds, FAILED otherwise."""
    from mlflow import MlflowClient

    client = MlflowClient()
    _quiet_store_logs()
    run = client.create_run(_experiment_id(client, cfg.registry.experiment), run_name=cfg.name,
                            tags={"gendag.graph": cfg.graph, "gendag.dataset": cfg.data.name, **tags})
    try:
        client.log_dict(run.info.run_id, cfg.model_dump(mode="json"), "config.json")
        yield client, run.info.run_id
        client.set_terminated(run.info.run_id, "FINISHED")
    except BaseException:
        _mark_failed(client, run.info.run_id)
        raise


def log_graph_results(client, run_id: str, metrics: dict[str, float], report_files: list[Path]) -> None:
    """The graph's own metrics (e.g. `2-rf/w2@euler,nfe=1`) and report files on its parent run."""
    from mlflow.entities import Metric

    require_finite(metrics, "graph results")
    now = int(time.time() * 1000)
    values = [Metric(mlflow_metric_name(k), v, now, 0) for k, v in metrics.items()]
    for i in range(0, len(values), 1000):
        client.log_batch(run_id, metrics=values[i:i + 1000])
    for file in report_files:
        client.log_artifact(run_id, str(file), artifact_path="report")


@task(name="register", cache_policy=NO_CACHE)
def register(cfg: RunConfig, kind: str, model: Ref, data: Ref, metrics: dict[str, float],
             report_files: list[Path], lineage: dict[str, str], parent: str | None = None) -> dict:
    """Log params, config, metrics, lineage, plots and the model; register a READY version; then,
    last, move the aliases (`registry.alias`, and `registry.champion_alias` if it wins). With
    `parent` (a graph's MLflow run id) the run is nested in it."""
    require_finite(metrics, f"register {cfg.name}")
    score_name, score = primary_score(metrics, kind)
    tags = {"gendag.graph": cfg.graph, "gendag.dataset": cfg.data.name, **lineage}
    nested = {"mlflow.parentRunId": parent} if parent else {}
    name = cfg.model_name
    with recorded_run(cfg, model, metrics | {score_name: score}, report_files, tags | nested) as (client, run_id, source):
        current = dict(_registered_model(client, name, cfg.graph).aliases)  # alias -> version, as found
        version = _ready_version(client, name, source, run_id, {**tags, score_name: str(score)})
        aliases = [cfg.registry.alias]
        if cfg.registry.auto_champion and _beats(client, name, current.get(cfg.registry.champion_alias), score_name, score):
            aliases.append(cfg.registry.champion_alias)
        _move_aliases(client, name, version, aliases, current)
    return {"run_id": run_id, "name": name, "version": int(version), "aliases": aliases, score_name: score}


@task(name="log-evaluation", cache_policy=NO_CACHE)
def log_evaluation(cfg: RunConfig, model: Ref, metrics: dict[str, float], report_files: list[Path],
                   lineage: dict[str, str], version: dict, parent: str | None = None) -> dict:
    """An MLflow run for a new evaluation of a registered model version (no new version, no
    alias moved), tagged with the version it evaluated and its training run (nested in `parent`)."""
    require_finite(metrics, f"log-evaluation {cfg.name}")
    tags = {"gendag.graph": cfg.graph, "gendag.dataset": cfg.data.name, **lineage,
            "gendag.evaluated_model": f"{version['name']}/{version['version']}",
            "gendag.evaluated_model_run_id": version["run_id"]}
    if parent:
        tags["mlflow.parentRunId"] = parent
    with recorded_run(cfg, model, metrics, report_files, tags, log_model=False) as (_, run_id, _):
        pass
    return {"run_id": run_id, "name": version["name"], "version": int(version["version"]), "aliases": []}


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
