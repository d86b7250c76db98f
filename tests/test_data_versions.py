"""Dataset versions are keyed by content: a file changed in place is a new version; a committed
`.dvc` whose data is missing (a fresh clone) is pulled from the DVC remote or rebuilt to the
very hash that is committed, so a run never rewrites the checkout it records."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

import tasks.data as data_tasks
from tasks.config import DataConfig
from tasks.config_loading import load_config
from tasks.data import dataset_folder, version_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GENDAG_HOME", str(tmp_path))
    monkeypatch.setenv("GENDAG_DVC_REMOTE", str(tmp_path / "remote"))
    return tmp_path


def _version(data: DataConfig, seed: int = 0):
    return version_dataset.fn(data, seed)  # the task's body, without a Prefect run around it


def test_a_file_changed_in_place_is_a_new_version(home: Path) -> None:
    path = home / "points.npy"
    np.save(path, np.arange(40, dtype=np.float32).reshape(20, 2))
    data = DataConfig(name="npy", path=str(path))
    first = _version(data)
    assert _version(data) == first  # unchanged file: the same version, reused
    np.save(path, np.arange(40, dtype=np.float32).reshape(20, 2)[::-1].copy())  # same size, new bytes
    second = _version(data)
    assert second.path != first.path and second.hash != first.hash
    assert Path(first.path).is_dir() and Path(second.path).is_dir()  # the old version is kept
    np.save(path, np.arange(40, dtype=np.float32).reshape(20, 2))
    assert _version(data) == first  # back to the old bytes: back to the old version


def test_missing_data_is_pulled_from_the_remote(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = DataConfig(name="moons", n_train=50, n_test=20)
    first = _version(data)
    shutil.rmtree(first.path)  # a fresh clone: the .dvc file without its data
    monkeypatch.setattr(data_tasks, "load_dataset", lambda spec: pytest.fail("rebuilt, not pulled"))
    assert _version(data) == first


def _committed_dvc_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files", "data"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / line for line in listed.stdout.splitlines() if line.endswith(".dvc")]


def test_committed_datasets_rebuild_to_their_committed_hash(home: Path) -> None:
    """Every `.dvc` file in git is a dataset a shipped config builds, and building it where its data
    is missing gives the committed hash, leaving the `.dvc` file byte for byte as committed
    (machine-dependent artifacts such as the FID feature networks must not be committed)."""
    configs = {}
    for file in sorted((REPO / "configs").rglob("*.yaml")):
        if file.parent.name == "tables":  # tables name graph configs; they are none
            continue
        cfg = load_config(file)
        configs.setdefault(dataset_folder(cfg.data.spec(cfg.seed)).name, cfg)
    committed = _committed_dvc_files()
    assert committed, "no dataset .dvc is committed"
    for dvc_file in committed:
        name = dvc_file.name.removesuffix(".dvc")
        assert name in configs, f"{dvc_file.relative_to(REPO)} is no dataset a shipped config builds"
        target = home / "data" / dvc_file.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(dvc_file, target)
        cfg = configs[name]
        ref = _version(cfg.data, cfg.seed)
        assert Path(ref.path).name == name
        assert ref.hash == yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"], dvc_file.name
        assert target.read_bytes() == dvc_file.read_bytes()


def test_data_stays_out_of_git_and_dvc_files_do_not() -> None:
    """DVC writes no new `.gitignore` line (a tracked change: the run's commit would read `-dirty`)
    when what it tracks is ignored already; its `.dvc` files must not be ignored (DVC refuses)."""
    ignored = ["data/moons-0123456789ab", "data/features/digits-0123456789ab.safetensors",
               "data/couplings/moons-0123456789ab/pairs.npy"]
    kept = ["data/moons-0123456789ab.dvc", "data/features/digits-0123456789ab.safetensors.dvc",
            "data/couplings/moons-0123456789ab.dvc"]
    try:
        out = subprocess.run(["git", "check-ignore", *ignored, *kept], cwd=REPO, capture_output=True, text=True)
    except OSError:
        pytest.skip("no git")
    if out.returncode == 128:
        pytest.skip("not a git checkout")
    assert sorted(out.stdout.split()) == sorted(ignored)
