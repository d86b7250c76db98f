"""What a team reads in the MLflow UI (issue 13): one run per graph, open from its first step to its
last, with the code's commit, the data as run inputs, quality as curves against NFE, descriptions
that say what it is and how to load it; and `gendag runs list | compare`. The run-level guarantees
are checked on a real SQLite store by calling the tasks directly; one tiny graph (and a re-sample of
its model) checks the whole of it."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from graph_runs import MOONS, gendag, gendag_error, gendag_output

from models.checkpoint import save_model
from tasks.config_loading import load_config
from tasks.infra import Ref, folder_digest
from tasks.register import curve_point, graph_run, register

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flow-matching" / "gaussians-to-moons.yaml"
LABEL = "euler,nfe=4"


def test_a_sampler_setting_is_a_point_of_its_nfe_curve() -> None:
    assert curve_point("fid@euler,nfe=16") == ("fid@euler", 16)
    assert curve_point("2-RF/w2@ddim,nfe=4,eta=0,spacing=trailing") == ("2-RF/w2@ddim,eta=0,spacing=trailing", 4)
    assert curve_point("w2@euler,nfe=4,untrained") == ("baseline/w2@euler", 4)
    for none in ("w2@dopri5,atol=0.001,rtol=0.001", "nfe@euler,nfe=4", "w2_floor", "best_w2"):
        assert curve_point(none) is None


def test_metrics_are_listed_as_a_person_reads_them() -> None:
    """By metric; fixed-step samplers by NFE as a number, then the adaptive solver (the full ODE),
    then the untrained baselines."""
    from tasks.report import reading_order

    keys = ["w2@euler,nfe=16", "w2@dopri5,atol=0.0001,rtol=0.0001", "w2@euler,nfe=2", "w2@euler,nfe=1,untrained",
            "straightness", "w2@euler,nfe=1", "fid@euler,nfe=4"]
    assert sorted(keys, key=reading_order) == [
        "fid@euler,nfe=4", "straightness", "w2@euler,nfe=1", "w2@euler,nfe=2", "w2@euler,nfe=16",
        "w2@dopri5,atol=0.0001,rtol=0.0001", "w2@euler,nfe=1,untrained"]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh workspace and MLflow SQLite store of this test's own."""
    monkeypatch.setenv("GENDAG_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def tiny_model(folder: Path, cfg) -> Ref:
    save_model(cfg.model_spec((2,)).build(), cfg.model_spec((2,)), folder)
    return Ref("model", str(folder), folder_digest(folder))


def test_registration_logs_into_the_graphs_open_run_which_the_graph_ends(store: Path) -> None:
    """`register(..., run=)` adds to the graph's run (no second run) and leaves it open; the graph
    ends it FINISHED; a graph whose body fails ends FAILED."""
    from mlflow import MlflowClient

    cfg = load_config(CONFIG, scale="tiny", overrides=["name=fm-open-run"])
    model = tiny_model(store / "model", cfg)
    report = store / "metrics.md"
    report.write_text("| metric | value |\n")
    metrics = {f"w2@{LABEL}": 0.3, "w2@euler,nfe=1": 0.9, f"w2@{LABEL},untrained": 0.6, "w2_floor": 0.1}
    client = MlflowClient()
    with graph_run(cfg, {"gendag.config_hash": cfg.digest()}) as run:
        registered = register.fn(cfg, "points", model, model, metrics, [report], {"gendag.data_hash": "d"},
                                 run=run.run_id)
        assert registered["run_id"] == run.run_id and client.get_run(run.run_id).info.status == "RUNNING"
    done = client.get_run(run.run_id)
    assert done.info.status == "FINISHED" and done.data.metrics["best_w2"] == 0.3
    assert done.data.tags["gendag.data_hash"] == "d" and done.data.tags["gendag.config_hash"] == cfg.digest()
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "w2/euler")] == [(1, 0.9), (4, 0.3)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.run_id, "baseline/w2/euler")] == [(4, 0.6)]
    assert len(client.search_runs([done.info.experiment_id])) == 1

    with pytest.raises(ZeroDivisionError), graph_run(cfg, {}) as failed:
        1 / 0
    assert client.get_run(failed.run_id).info.status == "FAILED"


@pytest.fixture(scope="module")
def tracked(workspace: Path) -> dict:
    """A tiny flow-matching graph (200 steps, Euler at 1, 2 and 4 NFE) through the command line."""
    return gendag(*MOONS, "--set", "name=fm-tracked", "--set", "train.steps=200",
                  "--set", "sample.samplers=[{method: euler, nfe: [1, 2, 4]}]",
                  "--out", str(workspace / "runs" / "tracked"))


@pytest.mark.integration
def test_the_graphs_run_spans_it_and_carries_code_data_curves_and_descriptions(tracked: dict) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(tracked["mlflow_run_id"])
    info, tags = run.info, run.data.tags
    assert info.status == "FINISHED"
    # opened before training, ended after registration
    version = client.get_model_version(tracked["registered_model"]["name"], tracked["registered_model"]["version"])
    assert (info.end_time - info.start_time) / 1000 > tracked["seconds"]["train"]
    assert info.start_time < version.creation_timestamp <= info.end_time
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1]).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head and tags["gendag.git_commit"].startswith(head)
    assert tags["mlflow.source.name"] == "gendag flow-matching" and tags["mlflow.source.type"] == "LOCAL"
    import ray

    nodes = tags["gendag.train_nodes"].split(",")  # the Ray node of each training worker, by rank
    assert nodes == [ray.get_runtime_context().get_node_id()[:12]] * 2  # two workers, this one local node

    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"train", "source"}
    assert inputs["train"].digest == tracked["data_hash"] and inputs["train"].name.startswith("moons-")
    assert inputs["source"].name.startswith("eight_gaussians-")

    history = client.get_metric_history(info.run_id, "w2/euler")
    assert [m.step for m in history] == [1, 2, 4]
    assert [m.value for m in history] == pytest.approx([tracked["metrics"][f"w2@euler,nfe={n}"] for n in (1, 2, 4)])
    assert [m.step for m in client.get_metric_history(info.run_id, "baseline/w2/euler")] == [4]

    name, number = version.name, version.version
    for text in (tags["mlflow.note.content"], version.description):
        assert "**flow-matching**" in text and "**moons** from eight_gaussians" in text and "best_w2 = " in text
        assert f"gendag sample models:/{name}/{number}" in text and f"mlflow.pyfunc.load_model('models:/{name}/{number}')" in text


PREDICT = """
import sys, mlflow, numpy as np, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
a, b = model.predict({"n": 16, "seed": 0}), model.predict({"n": 16, "seed": 0})
c = model.predict(pd.DataFrame({"n": [16]}))  # a DataFrame; seed 0 when not given
assert model.metadata.signature.inputs.input_names() == ["n", "seed"]
import models
print(a.shape, bool(np.isfinite(a).all() and (a == b).all() and (a == c).all()), models.__file__)
"""


@pytest.mark.integration
def test_the_champion_loads_with_mlflow_alone_and_samples(tracked: dict, tmp_path: Path) -> None:
    """`mlflow.pyfunc.load_model("models:/<name>@champion").predict({"n": 16, "seed": 0})`, in a fresh
    process outside the repository: 16 samples, the same for the same seed, from the model's own
    copy of the `models` package."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GENDAG_HOME")}
    done = subprocess.run([sys.executable, "-c", PREDICT, f"models:/{tracked['registered_model']['name']}@champion"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    shape, same, module = done.stdout.strip().rsplit(" ", 2)
    assert shape.endswith("(16, 2)") and same == "True"
    assert str(Path(__file__).parents[1]) not in module and "/code/models/" in module


@pytest.mark.integration
def test_runs_list_and_compare(tracked: dict, workspace: Path) -> None:
    """`gendag sample` opens its own run too; `runs list` shows both, `runs compare` their differences."""
    from mlflow import MlflowClient

    reg = tracked["registered_model"]
    again = gendag("sample", f"models:/{reg['name']}/{reg['version']}", "--sampler", "{method: euler, nfe: [2, 8]}",
                   "--out", str(workspace / "runs" / "tracked-again"))
    evaluation = MlflowClient().get_run(again["mlflow_run_id"])
    assert evaluation.info.status == "FINISHED" and evaluation.data.tags["mlflow.source.name"] == "gendag sample"
    assert evaluation.data.tags["gendag.evaluated_model"] == f"{reg['name']}/{reg['version']}"
    assert [m.step for m in MlflowClient().get_metric_history(again["mlflow_run_id"], "w2/euler")] == [2, 8]

    listed = gendag_output("runs", "list", "--limit", "5")
    lines = [line for line in listed.splitlines() if "fm-tracked" in line]
    assert len(lines) == 2 and again["mlflow_run_id"][:8] in lines[0] and tracked["mlflow_run_id"][:8] in lines[1]
    assert "FINISHED" in lines[1] and "flow-matching" in lines[1] and "moons" in lines[1] and "best_w2" in lines[1]

    compared = gendag_output("runs", "compare", tracked["mlflow_run_id"][:8], again["mlflow_run_id"][:8])
    assert "sample.samplers" in compared and "w2/euler/nfe_8" in compared and "data.name" not in compared
    assert "data.name" in gendag_output("runs", "compare", tracked["mlflow_run_id"], again["mlflow_run_id"], "--all")
    assert "run 'nope': no such run in sqlite:///" in gendag_error("runs", "compare", "nope", again["mlflow_run_id"])
    assert "--experiment nope: no such experiment" in gendag_error("runs", "list", "--experiment", "nope")


def test_a_written_table_does_not_mark_the_next_run_dirty(tmp_path: Path, monkeypatch) -> None:
    """The commit a run records reads `-dirty` for a changed code or config file, not for the
    tables an earlier `gendag table` wrote under reports/."""
    import tasks.register as register_module

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "reports").mkdir()
    for name in ("model.py", "reports/table.md"):
        (tmp_path / name).write_text("v1\n")
    git("add", ".")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "v1")
    monkeypatch.setattr(register_module, "CODE_ROOT", tmp_path)
    clean = register_module.git_commit()
    assert len(clean) == 40 and not clean.endswith("-dirty")
    (tmp_path / "reports" / "table.md").write_text("v2\n")
    assert register_module.git_commit() == clean
    (tmp_path / "model.py").write_text("v2\n")
    assert register_module.git_commit() == clean + "-dirty"
