"""`gendag retrain`: a challenger from the champion's logged config when its data version changed,
promoted only when it wins on the champion's protocol, through real Prefect, Ray, DVC and MLflow.

The champion is deliberately weak (20 training steps): a retrained model with more steps beats
it, a margin of 99 % keeps it, a different sample count is refused as another protocol."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from graph_runs import MOONS, gendag, gendag_error, kill_group, start_gendag, wait_for
from sklearn.datasets import make_moons

pytestmark = pytest.mark.integration
NAME = "retrain-fm"
MODEL = f"models:/gendag-{NAME}"


def _write_points(path: Path, seed: int) -> None:
    np.save(path, make_moons(3000, noise=0.05, random_state=seed)[0].astype(np.float32))


def _champion_version() -> int:
    from mlflow import MlflowClient

    return int(MlflowClient().get_model_version_by_alias(f"gendag-{NAME}", "champion").version)


def _versions() -> int:
    from mlflow import MlflowClient

    return len(MlflowClient().search_model_versions(f"name='gendag-{NAME}'"))


@pytest.fixture(scope="module")
def champion(workspace: Path) -> dict:
    points = workspace / "retrain" / "points.npy"
    points.parent.mkdir(parents=True, exist_ok=True)
    _write_points(points, seed=0)
    summary = gendag(*MOONS, "--set", f"name={NAME}", "--set", "data.name=npy", "--set", f"data.path={points}",
                     "--set", "train.steps=20", "--out", str(workspace / "retrain" / "champion"))
    return {**summary, "points": points}


def test_unchanged_data_is_not_retrained(champion: dict, workspace: Path) -> None:
    before = _versions()
    summary = gendag("retrain", MODEL, "--out", str(workspace / "retrain" / "same"))
    assert summary["decision"]["retrained"] is False and "unchanged" in summary["decision"]["reason"]
    assert summary["data_hash"] == champion["data_hash"]
    assert _versions() == before and _champion_version() == champion["registered_model"]["version"]


def test_a_changed_file_is_a_new_data_version_and_a_better_model_is_promoted(champion: dict, workspace: Path) -> None:
    _write_points(champion["points"], seed=1)  # the same path, new rows
    out = workspace / "retrain" / "better"
    summary = gendag("retrain", MODEL, "--set", "train.steps=300", "--out", str(out))
    assert summary["data_hash"] != champion["data_hash"]
    challenger = summary["challenger"]
    assert summary["decision"] == {**summary["decision"], "retrained": True, "promoted": True}
    assert _champion_version() == challenger["version"] != champion["registered_model"]["version"]
    rescored = summary["champion"]["score_on_challenger_protocol"]  # the old champion on the new data
    assert rescored != summary["champion"]["best_w2"] and challenger["score"] < rescored
    report = (out / "retrain.md").read_text()
    assert "**promoted**" in report and f"v{challenger['version']}" in report and "re-scored" in report
    from mlflow import MlflowClient

    client = MlflowClient()
    assert "report/retrain.md" in {a.path for a in client.list_artifacts(challenger["run_id"], "report")}
    tags = client.get_model_version(f"gendag-{NAME}", str(challenger["version"])).tags
    assert tags["gendag.data_hash"] == summary["data_hash"]
    assert tags["gendag.promoted_over"] == str(champion["registered_model"]["version"])


def test_a_model_not_better_by_the_margin_stays_challenger(champion: dict, workspace: Path) -> None:
    keep = _champion_version()
    summary = gendag("retrain", MODEL, "--force", "--margin", "0.99", "--set", "train.steps=300",
                     "--out", str(workspace / "retrain" / "margin"))
    assert summary["decision"]["retrained"] and not summary["decision"]["promoted"]
    assert "margin 0.99" in summary["decision"]["reason"]
    assert _champion_version() == keep
    from mlflow import MlflowClient

    challenger = MlflowClient().get_model_version_by_alias(f"gendag-{NAME}", "challenger")
    assert int(challenger.version) == summary["challenger"]["version"] != keep


def test_a_different_protocol_is_not_compared(champion: dict, workspace: Path) -> None:
    keep = _champion_version()
    summary = gendag("retrain", MODEL, "--force", "--set", "sample.n_samples=300",
                     "--out", str(workspace / "retrain" / "protocol"))
    assert not summary["decision"]["promoted"]
    assert "protocols differ" in summary["decision"]["reason"] and "sample.n_samples: 400" in summary["decision"]["reason"]
    assert _champion_version() == keep


def test_bad_references_are_one_line_errors(champion: dict) -> None:
    assert "no such model and alias" in gendag_error("retrain", "models:/gendag-no-such-model")
    assert "not a version" in gendag_error("retrain", f"{MODEL}/1")


@pytest.mark.slow
def test_a_retraining_killed_before_promotion_leaves_the_champion(champion: dict, workspace: Path) -> None:
    """Killed once its challenger is registered (while the champion is re-scored), the champion
    alias has not moved and the registry holds only READY versions."""
    keep, before = _champion_version(), _versions()
    _write_points(champion["points"], seed=2)
    child = start_gendag(workspace, "retrain", MODEL, "--set", "train.steps=400", "--out",
                         str(workspace / "retrain" / "killed"))
    wait_for(lambda: _versions() > before, "the challenger's registration", child, timeout=600, poll=0.2)
    kill_group(child)
    assert _champion_version() == keep
    from mlflow import MlflowClient

    assert all(v.status == "READY" for v in MlflowClient().search_model_versions(f"name='gendag-{NAME}'"))
