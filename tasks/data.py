"""Datasets and extractor weights as DVC-tracked files in the workspace's DVC repo.

Every artifact that must be shared (datasets, the FID feature extractor) goes
through `track`: written to a temporary folder, moved into place, `dvc add`-ed and
pushed to the default remote. DVC is only ever called from the driver process
(its repo lock does not allow parallel commands).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import threading
from pathlib import Path

import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.data import DatasetError, DatasetSpec, load_dataset, load_splits, save_splits, source_files
from tasks.config import DataConfig
from tasks.infra import Ref, claimed, file_digest, home, short_hash, store

_DVC_LOCK = threading.Lock()
logging.getLogger("dvc").setLevel(logging.WARNING)  # its git hints are noise here
# A pull of a version the remote does not hold (a fresh clone) warns of the missing files: expected,
# the version is rebuilt.
logging.getLogger("dvc_data.index.fetch").setLevel(logging.ERROR)


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


def pulled_hash(target: Path) -> str | None:
    """Fetch a tracked file or folder whose data is missing (a fresh clone) from the DVC remote;
    its hash, or None when there is no `.dvc` file or the remote does not hold the data."""
    dvc_file = target.with_name(target.name + ".dvc")
    if not dvc_file.exists() or target.exists():
        return None
    from dvc.exceptions import DvcException

    with _DVC_LOCK:
        try:
            dvc_repo().pull(targets=[str(dvc_file)])
        except DvcException:
            return None
    return tracked_hash(target)


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


def source_digest(spec: DatasetSpec) -> str | None:
    """Content hash of the files a dataset is read from (names and bytes), None for datasets
    generated from the spec alone (toys, scikit-learn's bundled tables)."""
    files = source_files(spec)
    if not files:
        return None
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise DatasetError(f"data.path: {missing[0]} not found")
    return short_hash(*(f"{f.name}:{_file_digest_cached(f)}" for f in files))


@functools.lru_cache(maxsize=None)
def _digest_of(path: str, size: int, mtime_ns: int) -> str:
    return file_digest(Path(path))


def _file_digest_cached(path: Path) -> str:
    """A file's sha256, computed once per process for an unchanged (size, mtime) file."""
    stat = path.stat()
    return _digest_of(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def spec_hash(spec: DatasetSpec) -> str:
    """A dataset version's name: every field of its spec (a plain dataclass, so its repr) and,
    for a dataset read from files, their content, so a file changed in place is a new version."""
    content = source_digest(spec)
    return short_hash(repr(spec)) if content is None else short_hash(repr(spec), content)


def dataset_folder(spec: DatasetSpec) -> Path:
    """Where a dataset's splits live: data/<name>-<hash of the spec and its source files>."""
    return home() / "data" / f"{spec.name}-{spec_hash(spec)}"


@task(name="version-dataset", cache_policy=NO_CACHE)
def version_dataset(data: DataConfig, seed: int) -> Ref:
    """Materialize a dataset with fixed seed and splits under data/, tracked by DVC.

    A version whose `.dvc` file is there but whose data is not (a fresh clone) is pulled from
    the DVC remote when it holds it, else rebuilt (the same bytes: every loader is
    deterministic)."""
    spec = data.spec(seed)
    splits = None
    if spec.download and any(not f.is_file() for f in source_files(spec)):
        splits = load_dataset(spec)  # fetches the files its version is named by
    folder = dataset_folder(spec)
    with claimed(str(folder)):
        digest = tracked_hash(folder) or pulled_hash(folder)
        if digest is None:
            partial = folder.with_name(folder.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            save_splits(splits or load_dataset(spec), partial)
            digest = publish(partial, folder)
        else:
            with _DVC_LOCK:
                dvc_repo().push(targets=[str(folder.with_name(folder.name + ".dvc"))])
    return Ref("dataset", str(folder), digest, spec_hash(spec))


def read_dataset(ref: Ref):
    return load_splits(ref.path)
