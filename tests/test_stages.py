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
from tasks.config_loading import load_config
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
    # each stage's wall time per part, the columns in the order the graph runs them
    assert table.index("couplings s") < table.index("train s") < table.index("sample s") < table.index("evaluate s")
    assert all({"train", "sample", "evaluate", "register"} <= set(s["seconds"]) for s in rf["stages"])
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


PD = ["run", "progressive-distillation", "-c", "progressive-distillation/moons", "--scale", "tiny"]
DDIM = "w2@ddim,nfe={},eta=0,spacing=trailing"


@pytest.fixture(scope="module")
def pd(workspace: Path) -> dict:
    return gendag(*PD, "--out", str(workspace / "runs" / "pd"))


def test_progressive_distillation_students_match_their_teachers_at_twice_the_steps(pd: dict) -> None:
    """teacher at 4 DDIM steps -> student at 2 -> student at 1; each student (tiny scale) within
    1.2x of its teacher at twice its steps, and each round's teacher is the previous stage."""
    from mlflow import MlflowClient

    assert [s["stage"] for s in pd["stages"]] == ["teacher", "PD 2 steps", "PD 1 step"]
    metrics = [MlflowClient().get_run(s["mlflow_run_id"]).data.metrics for s in pd["stages"]]
    name = lambda n: DDIM.format(n).replace("@", "/").replace("=", "_").replace(",", "/")  # noqa: E731
    assert metrics[1][name(2)] < 1.2 * metrics[0][name(4)]
    assert metrics[2][name(1)] < 1.2 * metrics[1][name(2)]
    assert metrics[2][name(1)] < 0.7 * metrics[0][name(1)]  # and far better than the teacher at one step
    for teacher, student in zip(pd["stages"], pd["stages"][1:]):
        assert student["gendag.teacher_hash"] == teacher["model_hash"]


def test_a_registered_teacher_of_the_wrong_kind_or_missing_is_refused_before_any_work(pd: dict, workspace: Path) -> None:
    from graph_runs import gendag_error
    from mlflow import MlflowClient

    client = MlflowClient()
    before = len(client.search_model_versions())
    out = workspace / "runs" / "pd-refused"
    missing = gendag_error(*PD, "--out", str(out), "--set", "teacher=models:/nope@champion")
    assert "teacher: models:/nope@champion: the registry has no model 'nope'" in missing
    student = pd["stages"][-1]["name"]
    narrow = gendag_error(*PD, "--out", str(out), "--set", f"teacher=models:/{pd['stages'][0]['name']}@champion",
                          "--set", "model.kwargs.hidden=32")
    assert "network_kwargs" in narrow and "set the model and path sections to the teacher's" in narrow
    cd = gendag(*CD, "--out", str(workspace / "runs" / "cd"))
    wrong = gendag_error(*PD, "--out", str(out), "--set", f"teacher=models:/{cd['stages'][-1]['name']}@champion")
    assert "is a 'consistency' model" in wrong and "needs a denoiser" in wrong
    assert not out.exists() and student  # nothing was written for the refused runs
    assert len(client.search_model_versions()) == before + 2  # the CD graph's teacher and student only


CD = ["run", "consistency-distillation", "-c", "consistency-distillation/moons", "--scale", "tiny"]
CT = ["run", "consistency-training", "-c", "consistency-training/moons", "--scale", "tiny"]


def test_consistency_distillation_and_training_sample_in_one_step(workspace: Path) -> None:
    """A consistency model distilled from a teacher beats the teacher's one Euler step at one step;
    one trained alone beats its untrained network; `gendag sample` re-samples a consistency model."""
    from mlflow import MlflowClient

    cd = json.loads((workspace / "runs" / "cd" / "summary.json").read_text()) if (
        workspace / "runs" / "cd" / "summary.json").exists() else gendag(*CD, "--out", str(workspace / "runs" / "cd"))
    teacher, student = (MlflowClient().get_run(s["mlflow_run_id"]).data.metrics for s in cd["stages"])
    assert student["w2/consistency/nfe_1"] < 0.8 * teacher["w2/euler/nfe_1"]
    ct = gendag(*CT, "--out", str(workspace / "runs" / "ct"))
    assert ct["metrics"]["w2@consistency,nfe=1"] < 0.95 * ct["metrics"]["w2@consistency,nfe=2,untrained"]
    again = gendag("sample", f"models:/{cd['registered_model']['name']}@champion", "--sampler",
                   "{method: consistency, nfe: [1, 4]}", "--out", str(workspace / "runs" / "cd-again"))
    assert again["metrics"]["w2@consistency,nfe=1"] == cd["metrics"]["w2@consistency,nfe=1"]


@pytest.mark.slow
def test_a_distillation_round_killed_midway_finishes_as_an_uninterrupted_one(pd: dict, workspace: Path) -> None:
    """Kill the graph during the first student's training (after its first checkpoint), run it again:
    the round resumes from its checkpoint and every stage ends bit-identical to the uninterrupted graph.
    (The round is ~1 s of training: the killed run's workers can reach its last checkpoint before
    Ray stops them, and the rerun then resumes there.)"""
    from graph_runs import kill_group, start_gendag, wait_for
    from safetensors.torch import load_file

    args = [*PD, "--set", "name=pd-resume", "--set", "distill.train={steps: 100, checkpoint_every: 25}",
            "--out", str(workspace / "runs" / "pd-resume")]
    child = start_gendag(workspace, *args)
    ray_runs = workspace / ".gendag" / "ray"
    wait_for(lambda: list(ray_runs.glob("pd-resume-pd2-*/checkpoint_manager_snapshot.json")), "a student checkpoint",
             child)
    kill_group(child)
    models = workspace / ".gendag" / "models"
    assert not list(models.glob("pd-resume-pd2-*")), "the round finished before the kill"
    resumed = gendag(*args)
    state = json.loads(next(models.glob("pd-resume-pd2-*/state.json")).read_text())
    assert state["resumed_from"] and state["resumed_from"][0] > 0
    assert resumed["metrics"] == pd["metrics"]
    for stage in ("pd2", "pd1"):
        weights = [load_file(str(next(models.glob(f"{name}-{stage}-*/model.safetensors"))))
                   for name in ("pd-resume", "pd-moons")]
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
