"""Record a run in MLflow and register its model version with aliases.

The model is stored as safetensors weights + a JSON spec (no pickle); a version
gets the `challenger` alias, and `champion` when it beats the current champion
on the primary metric (lower is better) or when there is none yet.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import RunConfig
from tasks.infra import Ref, home

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
    return f"best_{name}", scores[best]


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:500]
    return flat


def _log_run(cfg: RunConfig, model: Ref, metrics: dict[str, float], report_files: list[Path],
             tags: dict[str, str], score: tuple[str, float] | None, log_model: bool = True) -> tuple[str, str]:
    """One MLflow run: params, config, metrics, training loss, report (and model) files;
    returns (run id, the model folder's artifact URI)."""
    import mlflow

    state = model.path / "state.json"
    losses = json.loads(state.read_text())["losses"] if state.exists() else []
    with mlflow.start_run(run_name=cfg.name, tags=tags) as run:
        mlflow.log_params(_flatten(cfg.model_dump(mode="json")))
        mlflow.log_dict(cfg.model_dump(mode="json"), "config.json")
        mlflow.log_metrics({mlflow_metric_name(k): v for k, v in metrics.items()} | dict([score] if score else []))
        for step, loss in losses:
            mlflow.log_metric("train_loss", loss, step=step)
        for file in report_files:
            mlflow.log_artifact(str(file), artifact_path="report")
        for file in ("model.safetensors", "model.json") if log_model else ():
            mlflow.log_artifact(str(model.path / file), artifact_path="model")
        return run.info.run_id, f"{run.info.artifact_uri}/model"


@task(name="register", cache_policy=NO_CACHE)
def register(cfg: RunConfig, kind: str, model: Ref, data: Ref, metrics: dict[str, float],
             report_files: list[Path], lineage: dict[str, str]) -> dict:
    """Log params, config, metrics, lineage, plots and the model; register a version."""

    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient()
    _use_experiment(client, cfg.registry.experiment)
    score_name, score = primary_score(metrics, kind)
    tags = {"gendag.graph": cfg.graph, "gendag.dataset": cfg.data.name, **lineage}
    run_id, source = _log_run(cfg, model, metrics, report_files, tags, (score_name, score))

    name = cfg.model_name
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(name, description=f"gendag {cfg.graph} models")
    version = client.create_model_version(name, source=source, run_id=run_id, tags={**tags, score_name: str(score)})
    client.set_registered_model_alias(name, cfg.registry.alias, version.version)
    aliases = [cfg.registry.alias]
    if _beats_champion(client, name, cfg.registry.champion_alias, score_name, score):
        client.set_registered_model_alias(name, cfg.registry.champion_alias, version.version)
        aliases.append(cfg.registry.champion_alias)
    return {"run_id": run_id, "name": name, "version": int(version.version), "aliases": aliases,
            score_name: score}


@task(name="log-evaluation", cache_policy=NO_CACHE)
def log_evaluation(cfg: RunConfig, model: Ref, metrics: dict[str, float], report_files: list[Path],
                   lineage: dict[str, str], version: dict) -> dict:
    """An MLflow run for a new evaluation of a registered model version (no new version, no
    alias moved), tagged with the version it evaluated and its training run."""
    from mlflow import MlflowClient

    _use_experiment(MlflowClient(), cfg.registry.experiment)
    tags = {"gendag.graph": cfg.graph, "gendag.dataset": cfg.data.name, **lineage,
            "gendag.evaluated_model": f"{version['name']}/{version['version']}",
            "gendag.evaluated_model_run_id": version["run_id"]}
    run_id, _ = _log_run(cfg, model, metrics, report_files, tags, None, log_model=False)
    return {"run_id": run_id, "name": version["name"], "version": int(version["version"]), "aliases": []}


def _beats_champion(client, name: str, alias: str, score_name: str, score: float) -> bool:
    import mlflow

    try:
        champion = client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return True
    current = client.get_run(champion.run_id).data.metrics.get(score_name)
    return current is None or score < current


def _use_experiment(client, name: str) -> None:
    """Select the experiment; with a local SQLite store, keep artifacts in the workspace."""
    import mlflow

    if client.get_experiment_by_name(name) is None:
        local = mlflow.get_tracking_uri().startswith("sqlite:")
        client.create_experiment(name, artifact_location=(home() / "mlartifacts").as_uri() if local else None)
    mlflow.set_experiment(name)
