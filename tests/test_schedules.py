"""`gendag serve` / `gendag schedules` against a real Prefect server on loopback: a scheduled
command fires, runs as `gendag <command>` and is listed with its next and last run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from graph_runs import kill_group, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> dict:
    """A Prefect server (its scheduler on a 1 s loop) and the environment that points at it."""
    folder = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(folder / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1", "GENDAG_HOME": str(folder)}
    env.pop("PREFECT_API_URL", None)
    child = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                              "--port", str(port)], env=env, cwd=folder, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    wait_for(lambda: _healthy(url), "the Prefect server", child, timeout=180, poll=0.5)
    yield {"env": {**env, "PREFECT_API_URL": url, "PYTHONPATH": str(REPO), "COLUMNS": "250"}, "folder": folder}
    kill_group(child)


def _gendag(server: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], env=server["env"], cwd=server["folder"],
                          capture_output=True, text=True, timeout=300)


def test_a_scheduled_command_fires_and_is_listed(server: dict) -> None:
    serving = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--name", "every-few-seconds",
                                "--every", "3", "--", "list"], env=server["env"], cwd=server["folder"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def fired() -> bool:  # polled over the API: a `gendag schedules` per poll costs a Python start-up
            query = json.dumps({"flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}}).encode()
            request = urllib.request.Request(f"{server['env']['PREFECT_API_URL']}/flow_runs/filter", data=query,
                                             headers={"Content-Type": "application/json"})
            try:
                return bool(json.loads(urllib.request.urlopen(request, timeout=30).read()))
            except OSError:  # a busy server: ask again
                return False

        wait_for(fired, "a completed scheduled run", serving, timeout=600, poll=2)
        listed = _gendag(server, "schedules").stdout
        assert "every-few-seconds" in listed and "gendag list" in listed and "every 3 s" in listed
        assert "Completed" in listed  # the last run
        assert time.strftime("%Y-%m-%d", time.gmtime()) in listed  # the next run's date
    finally:
        kill_group(serving)


@pytest.mark.parametrize("args, message", [
    (["serve", "--name", "x", "--cron", "every day", "--", "list"], "not a cron expression"),
    (["serve", "--name", "x", "--every", "5", "--", "rm", "-rf"], "expected one of run, retrain"),
    (["serve", "--name", "x", "--", "list"], "one of --cron or --every"),
])
def test_bad_schedules_are_one_line_errors(server: dict, args: list[str], message: str) -> None:
    done = _gendag(server, *args)
    assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_schedules_need_a_server(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GENDAG_HOME": str(tmp_path)}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, "-m", "flows.cli", "schedules"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "need a Prefect server" in done.stderr
