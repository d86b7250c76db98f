"""Never register a lie: a NaN or an infinity is an error, never a score; a registration that
fails half way leaves no alias on the new version and the run FAILED. Each task is called
directly (`task.fn`) on the session's Ray and a real MLflow store, so nothing upstream (the
preflight checks of `gendag run`) stands in front of the guarantee under test."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch

from models.checkpoint import save_model
from models.data import Splits, save_splits
from models.pairs import PairSampler
from models.sampling import sampling_grid
from tasks.config_loading import load_config
from tasks.evaluate import evaluate
from tasks.infra import NonFiniteError, Ref, RunError, folder_digest, short_hash, store
from tasks.register import register
from tasks.sample import sample, sample_folder
from tasks.train import run_name, train

pytestmark = pytest.mark.integration
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flow-matching" / "gaussians-to-moons.yaml"
LABEL = "euler,nfe=4"


def config(*overrides: str):
    return load_config(CONFIG, scale="tiny", overrides=["source.name=gaussian", *overrides])


def dataset(folder: Path, train_points: np.ndarray) -> Ref:
    test = np.random.default_rng(1).standard_normal((1000, 2)).astype(np.float32)
    save_splits(Splits(train_points, test, "points"), folder)
    return Ref("dataset", str(folder), short_hash(folder, train_points.tobytes()))


def model_folder(folder: Path, cfg, fill: float | None = None) -> Ref:
    model = cfg.model_spec((2,)).build()
    if fill is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(fill)
    save_model(model, cfg.model_spec((2,)), folder)
    return Ref("model", str(folder), folder_digest(folder))


def first_draws(data: np.ndarray, cfg, steps: int) -> dict[int, int]:
    """Row index -> the first (0-based) step at which some rank's batch holds it."""
    world = cfg.train.num_workers
    row = {r.tobytes(): i for i, r in enumerate(data)}
    samplers = [PairSampler(torch.from_numpy(data), cfg.train.batch_size // world, seed=cfg.seed, rank=rank)
                for rank in range(world)]
    first: dict[int, int] = {}
    for step in range(steps):
        for pairs in samplers:
            for x1 in pairs.batch(step).x1.numpy():
                first.setdefault(row[x1.tobytes()], step)
    return first


def test_a_nan_loss_stops_training_at_once_naming_the_step_and_last_checkpoint(workspace: Path) -> None:
    """One NaN row in the training data, first drawn (by one of the 2 DDP ranks) after the first
    checkpoint: every rank stops at that step, the error names it and the checkpoint at step
    100, and no model is kept."""
    cfg = config("name=fm-nan-loss")
    data = np.random.default_rng(0).standard_normal((200_000, 2)).astype(np.float32)
    draws = first_draws(data, cfg, 200)
    row, step = next((i, s) for i, s in sorted(draws.items(), key=lambda item: item[1]) if s >= 140)
    data[row] = np.nan
    ref = dataset(workspace / "nan-loss-data", data)
    with pytest.raises(NonFiniteError) as error:
        train.fn(cfg, ref)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert f"the training loss is nan at step {step + 1} (rank " in message
    assert "training stopped; last good checkpoint: step 100 (" in message
    assert not (store() / "models" / run_name(cfg, ref, None)).exists()


def test_a_run_killed_after_its_last_checkpoint_keeps_that_checkpoint(workspace: Path, tmp_path: Path) -> None:
    """The kill lands after the last checkpoint is written but before the model is kept (the
    kept folder is moved away to stand for it): the next run resumes at the last step, trains
    nothing, keeps the same weights and records the resume."""
    from safetensors.torch import load_file

    cfg = config("name=fm-last-checkpoint", "train.steps=200", "train.checkpoint_every=100")
    ref = dataset(workspace / "last-checkpoint-data", np.random.default_rng(4).standard_normal((2000, 2)).astype(np.float32))
    first = Path(train.fn(cfg, ref).uri)
    assert json.loads((first / "state.json").read_text())["resumed_from"] == []
    kept = tmp_path / "kept"
    shutil.move(first, kept)
    again = Path(train.fn(cfg, ref).uri)
    assert json.loads((again / "state.json").read_text())["resumed_from"] == [200]
    for weights in ("model.safetensors", "raw.safetensors"):
        mine, theirs = load_file(str(again / weights)), load_file(str(kept / weights))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_nan_samples_stop_sampling_and_leave_no_sample_file(workspace: Path) -> None:
    cfg = config("name=fm-nan-samples", f"sample.samplers=[{{method: euler, nfe: [4]}}]")
    model = model_folder(workspace / "nan-model", cfg, fill=float("nan"))
    with pytest.raises(NonFiniteError, match=rf"sample fm-nan-samples: {LABEL}, shard \d+: 200 of 200 values are not finite"):
        sample.fn(cfg, model, None, sampling_grid(cfg.sample.samplers))
    assert not list(sample_folder(cfg, model).glob("*.npz"))


def test_nan_samples_are_not_scored(workspace: Path, tmp_path: Path) -> None:
    """A NaN cloud once read W2 = 0; now it is refused before anything is scored."""
    cfg = config("name=fm-nan-score")
    data = dataset(tmp_path / "data", np.random.default_rng(2).standard_normal((2000, 2)).astype(np.float32))
    x = np.random.default_rng(3).standard_normal((cfg.sample.n_samples, 2)).astype(np.float32)
    x[5] = np.inf
    np.savez(tmp_path / "samples.npz", x=x, nfe=np.array([4]))
    samples = {LABEL: Ref("samples", str(tmp_path / "samples.npz"), "nan-samples")}
    scores_before = set((store() / "scores").rglob("*.json"))
    with pytest.raises(NonFiniteError, match=f"evaluate fm-nan-score: samples {LABEL} .*: 2 of 800 values are not finite"):
        evaluate.fn(cfg, samples, data, None)
    assert set((store() / "scores").rglob("*.json")) == scores_before


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh MLflow SQLite store of this test's own."""
    db = tmp_path / "mlflow" / "mlflow.db"
    db.parent.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    return db


def scores(w2: float) -> dict[str, float]:
    return {f"w2@{LABEL}": w2, f"mmd@{LABEL}": 0.01, f"w2@{LABEL},untrained": 0.6, "w2_floor": 0.1}


def register_once(cfg, model: Ref, tmp_path: Path, w2: float) -> dict:
    report = tmp_path / "metrics.md"
    report.write_text("| metric | value |\n")
    return register.fn(cfg, "points", model, model, scores(w2), [report], {"gendag.data_hash": "test"})


def test_non_finite_metrics_are_never_registered(workspace: Path, mlflow_store: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    cfg = config("name=fm-nan-register")
    model = model_folder(tmp_path / "model", cfg)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError, match=f"register fm-nan-register: w2@{LABEL} = {bad}"):
            register_once(cfg, model, tmp_path, bad)
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


def test_a_champion_whose_score_is_not_a_number_is_beaten(workspace: Path, mlflow_store: Path, tmp_path: Path) -> None:
    """A champion registered with best_w2 = NaN (as before issue 9) loses to any finite score."""
    from mlflow import MlflowClient

    cfg = config("name=fm-nan-champion")
    model = model_folder(tmp_path / "model", cfg)
    first = register_once(cfg, model, tmp_path, 0.3)
    client = MlflowClient()
    client.log_metric(first["run_id"], "best_w2", float("nan"))  # what a NaN run once logged
    second = register_once(cfg, model, tmp_path, 0.5)
    assert second["aliases"] == ["challenger", "champion"]
    assert int(client.get_model_version_by_alias(second["name"], "champion").version) == second["version"]


def test_a_registration_that_fails_half_way_moves_no_alias(workspace: Path, mlflow_store: Path, tmp_path: Path) -> None:
    """The store refuses to move `champion` (a trigger in the real SQLite store) after the new
    version is READY and `challenger` has moved: challenger goes back to the old version, the
    new version has no alias, the run is FAILED, and the error is one line."""
    from mlflow import MlflowClient

    cfg = config("name=fm-half-registered")
    model = model_folder(tmp_path / "model", cfg)
    first = register_once(cfg, model, tmp_path, 0.5)
    with sqlite3.connect(mlflow_store) as db:
        db.execute("CREATE TRIGGER refuse BEFORE UPDATE ON registered_model_aliases WHEN NEW.alias = 'champion' "
                   "BEGIN SELECT RAISE(ABORT, 'the store went away'); END")
    with pytest.raises(RunError) as error:
        register_once(cfg, model, tmp_path, 0.3)  # better: it would take champion
    message = str(error.value)
    assert len(message.splitlines()) == 1 and "the store went away" in message
    assert f"moving alias 'champion' to {first['name']}/2 failed" in message
    assert "version 2 has no alias and no alias moved" in message and "is marked FAILED" in message

    client = MlflowClient()
    aliases = client.get_registered_model(first["name"]).aliases
    assert {alias: int(version) for alias, version in aliases.items()} == {"challenger": 1, "champion": 1}
    new = client.get_model_version(first["name"], "2")
    assert new.aliases == [] and client.get_run(new.run_id).info.status == "FAILED"
