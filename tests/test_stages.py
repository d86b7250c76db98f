"""The rectified-flow graph at tiny scale through real Prefect, Ray (Train), DVC and MLflow:
1-RF -> couplings -> 2-RF -> couplings -> one-step distillation, each stage registered in a run
nested in the graph's, and a second run that reuses every finished stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from graph_runs import gendag, gendag_output

from models.checkpoint import load_model
from models.samplers import Setting, sample_with
from tasks.config import load_config
from tasks.couplings import generate_couplings
from tasks.infra import Ref

pytestmark = pytest.mark.integration
RF = ["run", "rectified-flow", "-c", "rectified-flow/moons", "--scale", "tiny"]
ONE_STEP = "w2@euler,nfe=1"
CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def rf(workspace: Path) -> dict:
    return gendag(*RF, "--out", str(workspace / "runs" / "rf"))


def test_every_stage_is_registered_in_a_run_nested_in_the_graphs(rf: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    assert [s["stage"] for s in rf["stages"]] == ["1-RF", "2-RF", "2-RF + distill"]
    runs = [client.get_run(s["mlflow_run_id"]) for s in rf["stages"]]
    parents = {run.data.tags["mlflow.parentRunId"] for run in runs}
    assert len(parents) == 1
    graph = client.get_run(parents.pop())
    assert graph.info.status == "FINISHED" and graph.data.tags["gendag.graph"] == "rectified-flow"
    assert graph.data.metrics["2-RF/w2/euler/nfe_1"] == pytest.approx(runs[1].data.metrics["w2/euler/nfe_1"])
    artifacts = {a.path for a in client.list_artifacts(graph.info.run_id, "report")}
    assert {"report/stages.md", "report/stages.png"} <= artifacts
    for before, stage, run in zip(rf["stages"], rf["stages"][1:], runs[1:]):
        assert run.data.tags["gendag.parent_stage_model"] == f"{before['name']}/{before['version']}"
        assert run.data.tags["gendag.couplings_hash"] == stage["gendag.couplings_hash"]
        version = client.get_model_version(stage["name"], stage["version"])
        assert version.run_id == run.info.run_id


def test_reflow_straightens_and_beats_1rf_at_one_step(rf: dict, workspace: Path) -> None:
    first, second = rf["stages"][:2]
    metrics = {s["stage"]: _metrics(s) for s in rf["stages"]}
    assert metrics["2-RF"]["straightness"] < 0.5 * metrics["1-RF"]["straightness"]
    assert metrics["2-RF"][ONE_STEP] < 0.7 * metrics["1-RF"][ONE_STEP]
    assert metrics["2-RF + distill"][ONE_STEP] < metrics["1-RF"][ONE_STEP]
    table = (workspace / "runs" / "rf" / "report" / "stages.md").read_text()
    assert table.index("1-RF") < table.index("2-RF |") < table.index("distill")
    assert first["model_hash"] != second["model_hash"]


def _metrics(stage: dict) -> dict:
    from mlflow import MlflowClient

    raw = MlflowClient().get_run(stage["mlflow_run_id"]).data.metrics
    return {"straightness": raw.get("straightness"), ONE_STEP: raw["w2/euler/nfe_1"]}


def test_a_coupling_set_is_versioned_paired_rows_of_the_flows_ode(rf: dict, workspace: Path) -> None:
    stage = rf["stages"][1]
    folder = Path(stage["gendag.couplings_uri"])
    dvc = folder.with_name(folder.name + ".dvc").read_text()
    assert stage["gendag.couplings_hash"] in dvc
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["model_hash"] == rf["stages"][0]["model_hash"] and manifest["solver"] == "euler,nfe=16"
    x0, x1 = (np.load(folder / f"{end}.npy", allow_pickle=False) for end in ("x0", "x1"))
    assert x0.shape == x1.shape == (manifest["pairs"], 2)
    # row i of x1 is where the 1-RF's ODE takes row i of x0
    model = load_model(Path(rf["stages"][0]["model_uri"]))
    rows = torch.from_numpy(x0[:50])
    again = sample_with(Setting("euler", 16), model, rows).x.numpy()
    np.testing.assert_allclose(again, x1[:50], atol=1e-5)


def test_couplings_are_the_same_for_any_number_of_workers(rf: dict, workspace: Path, tmp_path: Path) -> None:
    stage = rf["stages"][1]
    folder = Path(stage["gendag.couplings_uri"])
    kept = tmp_path / "two-workers"
    shutil.copytree(folder, kept)
    shutil.rmtree(folder)
    cfg = load_config(CONFIGS / "rectified-flow" / "moons.yaml", "tiny", ["reflow.num_workers=1"])
    first = rf["stages"][0]
    model = Ref("model", first["model_uri"], first["model_hash"])
    remade = generate_couplings.fn(cfg, model, None, 1)
    assert remade.uri == str(folder) and remade.hash == stage["gendag.couplings_hash"]
    for end in ("x0", "x1"):
        assert np.array_equal(np.load(kept / f"{end}.npy"), np.load(folder / f"{end}.npy"))


def test_a_second_run_reuses_every_finished_stage(rf: dict, workspace: Path) -> None:
    out = workspace / "runs" / "rf-again"
    printed = gendag_output(*RF, "--out", str(out))
    assert printed.count("reused the finished model") == 3
    assert printed.count("reused the coupling set") == 2
    again = json.loads((out / "summary.json").read_text())
    assert [s["model_hash"] for s in again["stages"]] == [s["model_hash"] for s in rf["stages"]]
    assert again["metrics"] == rf["metrics"]
