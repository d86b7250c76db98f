"""The whole flow-matching graph at tiny scale through real Prefect, Ray Train, DVC,
torch-fidelity and MLflow, driven through the `gendag` command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from graph_runs import DIGITS, MOONS, gendag, kill_group, start_gendag, wait_for
from safetensors.torch import load_file
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.integration
EULER1, EULER4, DOPRI = "euler,nfe=1", "euler,nfe=4", "dopri5,atol=0.001,rtol=0.001"  # sample setting labels


@pytest.fixture(scope="module")
def moons(workspace: Path) -> dict:
    return gendag(*MOONS, "--out", str(workspace / "runs" / "moons"))


def test_summary_has_metrics_and_lineage(moons: dict) -> None:
    for key in ("graph", "dataset", "data_hash", "config_hash", "metrics", "mlflow_run_id",
                "registered_model", "prefect_flow_run_id"):
        assert key in moons
    metrics = moons["metrics"]
    assert {f"w2@{EULER1}", f"w2@{EULER4}", f"w2@{DOPRI}", f"mmd@{EULER4}", f"nfe@{DOPRI}"} <= set(metrics)
    assert metrics[f"nfe@{DOPRI}"] > 4
    # trained beats the same network at initialization, and more steps beat one step
    assert metrics[f"w2@{DOPRI}"] < metrics[f"w2@{EULER4},untrained"]
    assert metrics[f"mmd@{DOPRI}"] < 0.5 * metrics[f"mmd@{EULER4},untrained"]
    assert metrics[f"w2@{DOPRI}"] < metrics[f"w2@{EULER1}"]
    assert metrics["w2_floor"] < metrics[f"w2@{DOPRI}"]
    # the model's fit took time and its folder keeps it (a later run that reuses it reads it back)
    assert 0 < moons["seconds"]["model_train"] <= moons["seconds"]["train"]
    # and every part of the run has its wall time
    assert {"data", "train", "sample", "evaluate", "report", "register"} <= set(moons["seconds"])
    assert moons["seconds"]["sample"] > 0 and moons["seconds"]["evaluate"] > 0


def test_registry_entry_and_lineage_tags(moons: dict, workspace: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient()
    reg = moons["registered_model"]
    assert set(reg["aliases"]) == {"challenger", "champion"}
    version = client.get_model_version_by_alias(reg["name"], "champion")
    assert int(version.version) == reg["version"] and version.run_id == moons["mlflow_run_id"]
    run = client.get_run(moons["mlflow_run_id"])
    tags = run.data.tags
    assert tags["gendag.data_hash"] == moons["data_hash"]
    assert tags["gendag.config_hash"] == moons["config_hash"]
    assert tags["gendag.prefect_flow_run_id"] == moons["prefect_flow_run_id"]
    assert len(tags["gendag.git_commit"]) >= 7
    assert run.data.metrics["w2/euler/nfe_4"] == pytest.approx(moons["metrics"][f"w2@{EULER4}"])
    artifacts = {a.path for d in ("model", "report") for a in client.list_artifacts(run.info.run_id, d)}
    assert {"model/model.safetensors", "model/model.json", "report/scatter.png",
            "report/trajectories.png", "report/quality_vs_nfe.png"} <= artifacts
    # the stored model loads without pickle and is the one the run produced
    local = client.download_artifacts(run.info.run_id, "model/model.safetensors", str(workspace / "dl"))
    assert load_file(local)


def test_dataset_is_dvc_tracked_and_pushed(moons: dict, workspace: Path) -> None:
    dvc_files = [f for f in (workspace / "data").glob("moons-*.dvc") if moons["data_hash"] in f.read_text()]
    assert len(dvc_files) == 1  # other tests may have versioned other moons datasets in this workspace
    remote = workspace / ".gendag" / "dvc-remote"
    directory = moons["data_hash"].removesuffix(".dir")  # DVC's cache layout: files/md5/<2>/<30>.dir
    assert (remote / "files" / "md5" / directory[:2] / f"{directory[2:]}.dir").is_file()


def test_prefect_recorded_the_flow_run(moons: dict) -> None:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(moons["prefect_flow_run_id"])
    assert run.state.is_completed()
    assert run.name and run.flow_id


def test_killed_training_resumes_and_same_seed_gives_same_numbers(moons: dict, workspace: Path) -> None:
    """Kill a run after its first checkpoint, rerun it: it resumes, and it ends bit-identical
    to the uninterrupted run with the same seed (only the run name differs)."""
    args = [*MOONS, "--set", "name=fm-resume", "--out", str(workspace / "runs" / "resume")]
    child = start_gendag(workspace, *args)
    ray_runs = workspace / ".gendag" / "ray"
    # Ray Train writes its snapshot once a reported checkpoint is registered (the folder appears earlier)
    wait_for(lambda: list(ray_runs.glob("fm-resume-*/checkpoint_manager_snapshot.json")), "its first checkpoint", child)
    kill_group(child)
    assert not list((workspace / ".gendag" / "models").glob("fm-resume-*")), "training finished before the kill"

    resumed = gendag(*args)
    state = json.loads(next((workspace / ".gendag" / "models").glob("fm-resume-*/state.json")).read_text())
    assert state["resumed_from"] and state["resumed_from"][0] > 0
    assert resumed["metrics"] == moons["metrics"]
    weights = [load_file(str(next((workspace / ".gendag" / "models").glob(f"{n}-*/model.safetensors"))))
               for n in ("fm-resume", "fm-8gaussians-to-moons")]
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])


@pytest.mark.slow
def test_ctrl_c_stops_training_at_its_next_step_and_the_rerun_resumes_there(moons: dict, workspace: Path) -> None:
    """SIGINT after the first checkpoint: the fit stops at its next step with a checkpoint there
    (not Ray Train's abort, which loses the steps since the last checkpoint), the command exits
    with 130 and one line saying so; the rerun resumes at that step and ends bit-identical to the
    uninterrupted run."""
    import signal

    args = [*MOONS, "--set", "name=fm-ctrl-c", "--out", str(workspace / "runs" / "ctrl-c")]
    log = workspace / "ctrl-c.log"
    with log.open("w") as out:
        child = start_gendag(workspace, *args, output=out)
        ray_runs = workspace / ".gendag" / "ray"
        wait_for(lambda: list(ray_runs.glob("fm-ctrl-c-*/checkpoint_manager_snapshot.json")), "its first checkpoint", child)
        child.send_signal(signal.SIGINT)
        assert child.wait(timeout=300) == 130
    assert "error: train fm-ctrl-c: interrupted at step " in log.read_text()
    snapshot = next(ray_runs.glob("fm-ctrl-c-*/checkpoint_manager_snapshot.json"))
    stopped = max(c["metrics"]["step"] for c in json.loads(snapshot.read_text())["checkpoint_results"])
    assert not list((workspace / ".gendag" / "models").glob("fm-ctrl-c-*")), "training finished before the stop"

    resumed = gendag(*args)
    state = json.loads(next((workspace / ".gendag" / "models").glob("fm-ctrl-c-*/state.json")).read_text())
    assert state["resumed_from"] == [stopped]
    assert resumed["metrics"] == moons["metrics"]


def test_a_run_that_fails_mid_way_says_so_in_one_line(workspace: Path) -> None:
    """A fit whose loss turns NaN, through the command line in a process of its own (Prefect
    logs a failed task with its traceback unless told otherwise): exit code 2 and the error as
    the one line on stderr, with no traceback or Prefect log line before it."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "flows.cli", *MOONS, "--set", "name=fm-diverges", "--set", "train.lr=1e9",
                           "--out", str(workspace / "runs" / "diverges")], capture_output=True, text=True, cwd=workspace,
                          env={**os.environ, "PREFECT_HOME": str(workspace / "prefect-child")}, timeout=600)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("error: train fm-diverges: the training loss is nan at step ")


def test_two_configs_in_one_process(moons: dict, workspace: Path) -> None:
    """The main job's form: several configs, one Prefect server and one Ray, one folder each.
    Moons reuses its finished model and samples and scores the same numbers again."""
    result = CliRunner().invoke(app, [*DIGITS, "-c", "flow-matching/gaussians-to-moons",
                                      "--out", str(workspace / "runs" / "both")])
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    digits, again = (json.loads((workspace / "runs" / "both" / name / "summary.json").read_text())
                     for name in ("digits", "gaussians-to-moons"))
    assert again["metrics"] == moons["metrics"]
    assert digits["prefect_flow_run_id"] != again["prefect_flow_run_id"]

    metrics = digits["metrics"]
    assert {f"fid@{EULER1}", f"fid@{EULER4}", f"fid@{DOPRI}", f"kid@{EULER4}", "fid_floor", "kid_floor"} <= set(metrics)
    assert 0 <= metrics["fid_floor"] < metrics[f"fid@{EULER4},untrained"]
    assert digits["evaluation"]["sets"] == 2  # tiny scale: the mean of two sample sets, with their spread
    assert metrics["fid_sd_floor"] > 0 and metrics[f"fid_sd@{EULER4}"] > 0 and f"kid_sd@{DOPRI}" in metrics
    assert f"fid_sd@{EULER4},untrained" not in metrics  # the baseline is one set
    assert list((workspace / "data" / "features").glob("*.safetensors.dvc"))
    assert (workspace / "runs" / "both" / "digits" / "report" / "samples.png").stat().st_size > 0


def test_bad_config_is_one_line_and_registers_nothing(moons: dict, workspace: Path) -> None:
    from mlflow import MlflowClient

    before = len(MlflowClient().search_model_versions())
    for bad, needle in ((["--set", "train.stepz=3"], "train.stepz: unknown key"),
                        (["--set", "model.network=resnet"], "model.network: got 'resnet'"),
                        (["--scale", "huge"], "--scale 'huge'"),
                        (["-c", "flow-matching/nope"], "--config flow-matching/nope: no such file"),
                        (["--set", "sample.samplers=[{method: ancestral, nfe: [4]}]"],
                         "sampler 'ancestral' needs a Gaussian source (N(0, I)); this run starts from 'eight_gaussians'")):
        result = CliRunner().invoke(app, [*MOONS, *bad, "--out", str(workspace / "runs" / "bad")])
        assert result.exit_code == 2
        assert needle in result.output and len(result.output.strip().splitlines()) == 1
    # with several configs, all are checked before the first one runs: moons did not run again
    assert len(MlflowClient().search_model_versions()) == before
    assert not (workspace / "runs" / "bad").exists()


DDIM_LABEL = "ddim,nfe=4,eta=0,spacing=trailing"


def test_ddpm_graph_then_resample_the_registered_model(workspace: Path) -> None:
    """DDPM on moons end to end (ancestral, DDIM, probability-flow ODE, the bound), then
    `gendag sample` scores the registered version with another grid: a new MLflow run linked
    to that version, no new version; the shared setting reproduces the training run's number."""
    from mlflow import MlflowClient

    run = gendag("run", "ddpm", "-c", "ddpm/moons", "--scale", "tiny", "--out", str(workspace / "runs" / "ddpm"))
    metrics = run["metrics"]
    assert {f"w2@{DDIM_LABEL}", "w2@ancestral,nfe=100,spacing=trailing,variance=small", "w2@euler,nfe=10"} <= set(metrics)
    assert 0 < metrics["nll@ddpm_bound"] < 10 and metrics["nll_se@ddpm_bound"] > 0
    assert metrics["w2@ancestral,nfe=100,spacing=trailing,variance=small"] < metrics["w2@ancestral,nfe=100,spacing=trailing,variance=small,untrained"]
    reg = run["registered_model"]
    before = len(MlflowClient().search_model_versions(f"name='{reg['name']}'"))

    out = workspace / "runs" / "ddpm-again"
    again = gendag("sample", f"models:/{reg['name']}@champion", "--sampler", "{method: ddim, nfe: [4], eta: [0, 1]}",
                   "--out", str(out))
    assert again["metrics"][f"w2@{DDIM_LABEL}"] == metrics[f"w2@{DDIM_LABEL}"]
    assert "w2@ddim,nfe=4,eta=1,spacing=trailing" in again["metrics"]
    assert not any(k.startswith("w2@ancestral") for k in again["metrics"])
    assert len(MlflowClient().search_model_versions(f"name='{reg['name']}'")) == before
    tags = MlflowClient().get_run(again["mlflow_run_id"]).data.tags
    assert tags["gendag.evaluated_model"] == f"{reg['name']}/{reg['version']}"
    assert tags["gendag.evaluated_model_run_id"] == run["mlflow_run_id"]
    assert (out / "report" / "quality_vs_nfe.png").stat().st_size > 0

    for bad, needle in (("models:/nope@champion", "the registry has no model 'nope'"),
                        (str(workspace), "no summary.json here"),
                        ("models:/x", "expected models:/<name>@<alias>")):
        result = CliRunner().invoke(app, ["sample", bad])
        assert result.exit_code == 2 and needle in result.output


def test_ddim_graph_on_digits_reports_bits_per_dim(workspace: Path) -> None:
    run = gendag("run", "ddim", "-c", "ddim/digits", "--scale", "tiny", "--out", str(workspace / "runs" / "ddim"))
    metrics = run["metrics"]
    assert 0 < metrics["bpd@ddpm_bound"] < 1e4 and "fid@ancestral,nfe=10,spacing=trailing,variance=small" in metrics
    assert metrics["fid@ddim,nfe=4,eta=0,spacing=trailing"] < metrics["fid@ancestral,nfe=10,spacing=trailing,variance=small,untrained"]


def test_score_sde_graph_reports_the_ode_likelihood_next_to_the_true_one(workspace: Path) -> None:
    """A VP score SDE on 8 gaussians end to end: reverse-SDE, PC and probability-flow samplers
    beat the untrained network, and the test NLL through the probability-flow ODE sits next to
    the mixture's own NLL of the same points (a tiny model is far from it, but on the same scale)."""
    run = gendag("run", "score-sde", "-c", "score-sde/vp", "--scale", "tiny", "--out", str(workspace / "runs" / "sde"))
    metrics = run["metrics"]
    pc = "pc,nfe=20,predictor=reverse_diffusion,corrector_steps=1,snr=0.16"
    assert {"w2@euler_maruyama,nfe=20", f"w2@{pc}", "w2@euler,nfe=10"} <= set(metrics)
    assert metrics["w2@euler_maruyama,nfe=20"] < metrics["w2@euler_maruyama,nfe=20,untrained"]
    assert metrics["nll_floor"] == pytest.approx(0.31, abs=0.15)  # log 8 + log(2 pi e 0.1^2) = 0.31
    assert metrics["nll_floor"] < metrics["nll@ode"] < 10 and metrics["nll_se@ode"] > 0


def test_ncsn_graph_on_digits(workspace: Path) -> None:
    run = gendag("run", "ncsn", "-c", "ncsn/digits", "--scale", "tiny", "--out", str(workspace / "runs" / "ncsn"))
    metrics = run["metrics"]
    langevin = "annealed_langevin,nfe=20,steps_per_level=2,step_size=2e-05,denoise=True"
    assert {f"fid@{langevin}", "fid@reverse_diffusion,nfe=10"} <= set(metrics)
    assert metrics["nfe@" + langevin] == 21  # 10 levels x 2 steps + the denoising jump
    assert metrics[f"fid@{langevin}"] < metrics[f"fid@{langevin},untrained"]
