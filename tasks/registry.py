"""Find a registered model version in MLflow and bring its files to the workspace.

Used by `gendag sample` to evaluate an existing model again: the version's weights and spec
(`model/`) and the config its training run logged (`config.json`) are downloaded once into
`.gendag/registry/<name>/<version>/`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tasks.infra import store

REFERENCE = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


class RegistryError(ValueError):
    """A model reference that cannot be resolved, phrased as one line."""


def _parse(reference: str) -> tuple[str, str | None, str | None]:
    folder = Path(reference)
    if folder.is_dir():
        summary = folder / "summary.json"
        if not summary.is_file():
            raise RegistryError(f"{reference}: no summary.json here; expected a run folder or models:/<name>@<alias>")
        reg = json.loads(summary.read_text())["registered_model"]
        return reg["name"], None, str(reg["version"])
    match = REFERENCE.match(reference)
    if not match:
        raise RegistryError(f"{reference!r}: expected models:/<name>@<alias>, models:/<name>/<version> or a run folder")
    return match["name"], match["alias"], match["version"]


def fetch_model_version(reference: str) -> tuple[dict, Path, dict]:
    """({name, version, run_id}, local model folder, the training run's config tree)."""
    import mlflow
    from mlflow import MlflowClient

    name, alias, number = _parse(reference)
    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, number)
    except mlflow.exceptions.MlflowException:
        what = f"alias '{alias}'" if alias else f"version {number}"
        raise RegistryError(f"{reference}: the registry has no model '{name}' with {what}") from None
    folder = store() / "registry" / name / str(version.version)
    if not (folder / "config.json").exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        client.download_artifacts(version.run_id, "model", str(partial))
        client.download_artifacts(version.run_id, "config.json", str(partial))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    tree = json.loads((folder / "config.json").read_text())
    return {"name": name, "version": int(version.version), "run_id": version.run_id}, folder / "model", tree
