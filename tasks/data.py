"""Datasets and extractor weights as DVC-tracked files in the workspace's DVC repo.

Every artifact that must be shared (datasets, the FID feature extractor) goes
through `track`: written to a temporary folder, moved into place, `dvc add`-ed and
pushed to the default remote. DVC is only ever called from the driver process
(its repo lock does not allow parallel commands).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.data import DatasetSpec, load_dataset, load_splits, save_splits
from tasks.config import DataConfig
from tasks.infra import Ref, home, short_hash, store

_DVC_LOCK = threading.Lock()
logging.getLogger("dvc").setLevel(logging.WARNING)  # its git hints are noise here


def dvc_repo():
    """Open the workspace's DVC repo, creating it (and a local default remote) if missing."""
    from dvc.repo import Repo

    root = home()
    if not (root / ".dvc").is_dir():
        Repo.init(str(root), no_scm=not (root / ".git").exists())
    repo = Repo(str(root))
    if not repo.config.get("core", {}).get("remote"):
        remote = os.environ.get("GENDAG_DVC_REMOTE") or str(store() / "dvc-remote")
        with repo.config.edit() as conf:
            conf["remote"]["local"] = {"url": remote}
            conf["core"]["remote"] = "local"
        repo = Repo(str(root))
    return repo


def tracked_hash(target: Path) -> str | None:
    """The DVC content hash recorded for `target`, or None when it is not tracked yet."""
    dvc_file = target.with_name(target.name + ".dvc")
    if not dvc_file.exists() or not target.exists():
        return None
    return yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]


def track(target: Path) -> str:
    """`dvc add` + `dvc push` a file or folder; returns its DVC content hash."""
    with _DVC_LOCK:
        repo = dvc_repo()
        repo.add(str(target))
        repo.push(targets=[str(target.with_name(target.name + ".dvc"))])
    digest = tracked_hash(target)
    assert digest, f"dvc add left no hash for {target}"
    return digest


def publish(partial: Path, final: Path) -> str:
    """Move a finished temporary folder/file into place and version it."""
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    partial.rename(final)
    return track(final)


def spec_hash(spec: DatasetSpec) -> str:
    """A dataset version's name: every field of its spec (a plain dataclass, so its repr)."""
    return short_hash(repr(spec))


def dataset_folder(spec: DatasetSpec) -> Path:
    """Where a dataset's splits live: data/<name>-<hash of the spec>."""
    return home() / "data" / f"{spec.name}-{spec_hash(spec)}"


@task(name="version-dataset", cache_policy=NO_CACHE)
def version_dataset(data: DataConfig, seed: int) -> Ref:
    """Materialize a dataset with fixed seed and splits under data/, tracked by DVC."""
    spec = data.spec(seed)
    folder = dataset_folder(spec)
    digest = tracked_hash(folder)
    if digest is None:
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        save_splits(load_dataset(spec), partial)
        digest = publish(partial, folder)
    else:
        with _DVC_LOCK:
            dvc_repo().push(targets=[str(folder.with_name(folder.name + ".dvc"))])
    return Ref("dataset", str(folder), digest, spec_hash(spec))


def read_dataset(ref: Ref):
    return load_splits(ref.path)
