"""`gendag services`: the team's services started in a temporary folder on non-default ports, the
graphs run against them by configuration only (the env.sh `up` writes), and stopped again.

Slow (a few minutes): `make test-all` runs it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from graph_runs import kill_group, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[1]
# Outside Ray's default worker-port range (10002-19999) and the services' defaults.
PORTS = {"--postgres-port": 25433, "--mlflow-port": 25000, "--prefect-port": 24200, "--ray-port": 26380}
TINY = ["run", "flow-matching", "-c", "flow-matching/gaussians-to-moons", "--scale", "tiny"]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any service setting of the test session, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "RAY_", "GENDAG_"))}
    return {**env, "PYTHONPATH": str(ROOT), "COLUMNS": "160", **extra}


def gendag(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 600):
    return subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], capture_output=True, text=True,
                          env=env or clean_env(), cwd=cwd or ROOT, timeout=timeout)


def read_env_sh(path: Path) -> dict[str, str]:
    return dict(line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines())


@pytest.fixture(scope="module")
def services():
    """The services up in a temporary folder; (folder, the environment env.sh sets). Not under
    pytest's tmp root: as root, PostgreSQL runs as another user, and any pytest starting meanwhile
    makes that root private again (mode 0700), cutting PostgreSQL off from its data."""
    from tasks.services import Layout

    folder = Path(tempfile.mkdtemp(prefix="gendag-services-"))
    result = gendag("services", "up", "--dir", folder, *[str(x) for kv in PORTS.items() for x in kv])
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        yield folder, read_env_sh(folder / "env.sh")
    finally:
        gendag("services", "down", "--dir", folder)
        shutil.rmtree(Layout(folder).ray_tmp, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def run_graph(workspace: Path, env: dict[str, str], *extra: str) -> subprocess.Popen:
    """A tiny graph in its own workspace (a workstation), pointed at the services by `env`."""
    workspace.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *TINY, "--out", str(workspace / "run"), *extra],
                            cwd=workspace, env=clean_env(GENDAG_HOME=str(workspace), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(proc: subprocess.Popen, workspace: Path) -> dict:
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    return json.loads((workspace / "run" / "summary.json").read_text())


def check_on_server(env: dict[str, str], summary: dict) -> None:
    """The registered version and its run's metrics are on the MLflow server; the flow run on Prefect's."""
    import httpx
    from mlflow import MlflowClient

    from tasks.register import mlflow_metric_name

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    reg = summary["registered_model"]
    version = client.get_model_version(reg["name"], str(reg["version"]))
    logged = client.get_run(version.run_id).data.metrics
    missing = [name for name in summary["metrics"] if mlflow_metric_name(name) not in logged]
    assert summary["metrics"] and not missing, missing
    flow_run = httpx.get(f"{env['PREFECT_API_URL']}/flow_runs/{summary['prefect_flow_run_id']}", timeout=30)
    assert flow_run.status_code == 200 and flow_run.json()["state_type"] == "COMPLETED"


def test_status_shows_every_service_up(services):
    folder, _ = services
    result = gendag("services", "status", "--dir", folder)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 4 and all(" up " in row for row in rows), result.stdout
    assert "2 of 2 nodes alive" in result.stdout


def test_up_again_leaves_them_running(services):
    folder, _ = services
    result = gendag("services", "up", "--dir", folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("already up") == 4, result.stdout


def test_a_taken_port_is_one_line_naming_it(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = gendag("services", "up", "--dir", tmp_path / "other", "--postgres-port", port)
    assert result.returncode == 1
    assert f"port {port}" in result.stderr and "--postgres-port" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_two_workers_land_on_two_nodes(services):
    """Two actors of one CPU each on a cluster of two one-CPU nodes: one per node (as Ray Train's workers)."""
    _, env = services
    code = ("import ray; ray.init(log_to_driver=False)\n"
            "@ray.remote(num_cpus=1)\nclass W:\n    def node(self): return ray.get_runtime_context().get_node_id()\n"
            "ws = [W.remote() for _ in range(2)]\nprint(len(set(ray.get([w.node.remote() for w in ws]))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean_env(**env),
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip().splitlines()[-1] == "2", result.stdout + result.stderr


def train_nodes(env: dict[str, str], run_id: str) -> list[str]:
    """The Ray node each training worker of a registered run ran on, by rank (its MLflow tag)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"]).get_run(run_id).data.tags["gendag.train_nodes"].split(",")


def test_a_graph_registers_on_the_team_server(services, tmp_path):
    """Pointed at the services by env.sh alone: registered on the PostgreSQL-backed MLflow server,
    the flow run on the Prefect server, nothing embedded (no mlflow.db, no local Prefect home);
    its two Ray Train workers (one CPU each) trained on the cluster's two one-CPU nodes."""
    _, env = services
    summary = finished(run_graph(tmp_path / "ws", env), tmp_path / "ws")
    check_on_server(env, summary)
    assert not (tmp_path / "ws" / "mlflow.db").exists()
    nodes = train_nodes(env, summary["mlflow_run_id"])
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes


def _moons_file(path: Path, seed: int) -> None:
    import numpy as np
    from sklearn.datasets import make_moons

    np.save(path, make_moons(3000, noise=0.05, random_state=seed)[0].astype(np.float32))


def test_scheduled_retraining_on_the_team_services(services, tmp_path):
    """The team's loop end to end on the services: a champion trained from an .npy file; the file
    changes in place; `gendag serve` deploys `gendag retrain` on the services' Prefect server, whose
    scheduler fires it; the run sees the new data version, retrains on the cluster and, better on
    the champion's own protocol, takes the champion alias on the PostgreSQL-backed MLflow server."""
    from mlflow import MlflowClient

    _, env = services
    ws = tmp_path / "team"
    ws.mkdir()
    points, name = ws / "points.npy", "fm-team-retrain"
    _moons_file(points, seed=0)
    champion = finished(run_graph(ws, env, "--set", f"name={name}", "--set", "data.name=npy",
                                  "--set", f"data.path={points}", "--set", "train.steps=20"), ws)
    _moons_file(points, seed=1)  # the same path, new rows
    serving = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--name", "team-retrain", "--every", "30", "--",
         "retrain", f"models:/gendag-{name}", "--set", "train.steps=300", "--out", str(ws / "retrained")],
        cwd=ws, env=clean_env(GENDAG_HOME=str(ws), **env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    registered = f"gendag-{name}"
    try:
        def promoted():
            version = client.get_model_version_by_alias(registered, "champion")
            return version if int(version.version) != champion["registered_model"]["version"] else None

        version = wait_for(promoted, "the retrained model to take the champion alias", serving, timeout=900, poll=5)
    finally:
        kill_group(serving)
    assert version.tags["gendag.promoted_over"] == str(champion["registered_model"]["version"])
    assert version.tags["gendag.data_hash"] != champion["data_hash"]  # the new data version was used
    assert len(set(train_nodes(env, version.run_id))) == 2
    listed = gendag("schedules", env=clean_env(GENDAG_HOME=str(ws), **env)).stdout
    assert "team-retrain" in listed and "gendag retrain" in listed


def test_two_graphs_registering_at_once(services, tmp_path):
    """Two workstations register the same model at the same time: two distinct versions, all metrics kept."""
    _, env = services
    one_cpu = ["--set", "train.num_workers=1", "--set", "sample.num_workers=1", "--set", "name=fm-team-race"]
    workspaces = [tmp_path / "a", tmp_path / "b"]
    procs = [run_graph(ws, env, *one_cpu) for ws in workspaces]
    with ThreadPoolExecutor(2) as pool:
        summaries = list(pool.map(finished, procs, workspaces))
    versions = {s["registered_model"]["version"] for s in summaries}
    assert len(versions) == 2 and len({s["registered_model"]["name"] for s in summaries}) == 1
    for summary in summaries:
        check_on_server(env, summary)


def test_down_stops_everything(services):
    folder, env = services
    result = gendag("services", "down", "--dir", folder)
    assert result.returncode == 0, result.stderr
    status = gendag("services", "status", "--dir", folder).stdout
    assert " up " not in status and status.count(" down ") == 4, status
    for port in PORTS.values():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))  # free again
