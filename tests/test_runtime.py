"""Hygiene of the services a run starts (tasks/runtime.py): nothing stray on the terminal after
the embedded Prefect server stops, and no Ray temp folder left behind.

The two integration tests start the real services in a child process, as `gendag` does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_server_logging_config_is_prefects_with_the_shutdown_loggers_quiet(tmp_path, monkeypatch) -> None:
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH, load_logging_config

    from tasks.runtime import SERVER_SHUTDOWN_LOGGERS, quiet_server_shutdown

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    monkeypatch.delenv("PREFECT_LOGGING_SETTINGS_PATH", raising=False)
    quiet_server_shutdown()
    path = Path(os.environ["PREFECT_LOGGING_SETTINGS_PATH"])
    assert path.parent == tmp_path
    ours, default = load_logging_config(path), load_logging_config(DEFAULT_LOGGING_SETTINGS_PATH)
    assert {k: v for k, v in ours["loggers"].items() if k not in SERVER_SHUTDOWN_LOGGERS} == default["loggers"]
    assert all(ours["loggers"][name] == {"level": "CRITICAL"} for name in SERVER_SHUTDOWN_LOGGERS)
    assert {k: v for k, v in ours.items() if k != "loggers"} == {k: v for k, v in default.items() if k != "loggers"}

    monkeypatch.setenv("PREFECT_LOGGING_SETTINGS_PATH", str(tmp_path / "mine.yml"))
    quiet_server_shutdown()  # a config the user chose is left alone
    assert os.environ["PREFECT_LOGGING_SETTINGS_PATH"] == str(tmp_path / "mine.yml")
    assert yaml.safe_load(path.read_text())["loggers"]["sqlalchemy.pool"] == {"level": "CRITICAL"}


def _child(code: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_", "MLFLOW_", "GENDAG_"))}
    env |= {"GENDAG_HOME": str(home), "PYTHONPATH": str(ROOT)}
    prelude = "from tasks.infra import configure_environment\nconfigure_environment()\n"
    return subprocess.run([sys.executable, "-c", prelude + code], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.integration
def test_server_stopped_while_recording_prints_no_traceback(tmp_path) -> None:
    """Stop the embedded server while it is still recording task runs, as happens at exit after a
    run: without the quiet loggers this printed ~150 lines of CancelledError tracebacks."""
    code = """
import os, threading, time
from prefect import flow, task
from prefect.server.api.server import SubprocessASGIServer
from tasks.runtime import quiet_server_shutdown

quiet_server_shutdown()
server = SubprocessASGIServer()
server.start()

@task
def one(i):
    return i

@flow
def many():
    return [f.result() for f in [one.submit(i) for i in range(400)]]

threading.Thread(target=many, daemon=True).start()
time.sleep(6)
server.stop()
print("stopped", flush=True)
os._exit(0)  # the flow's thread would now fail against the stopped server: not what is tested
"""
    done = _child(code, tmp_path)
    assert "stopped" in done.stdout, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "CancelledError" not in done.stderr, done.stderr[-2000:]


@pytest.mark.integration
def test_ray_temp_folder_is_removed_at_exit(tmp_path) -> None:
    code = """
import ray
from tasks.runtime import ensure_ray

ensure_ray()
assert ray.get(ray.remote(lambda: 1).remote()) == 1
print(ray._private.worker._global_node.get_temp_dir_path())
"""
    done = _child(code, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    temp = Path(done.stdout.strip().splitlines()[-1])
    assert temp.is_relative_to("/tmp") and not temp.exists()


def test_processes_left_writing_in_rays_folder_are_ended(tmp_path) -> None:
    """What outlives our Ray (a process with a file open under its folder) is killed; a process
    writing elsewhere is left alone."""
    from tasks.runtime import end_leftovers

    ray_folder, elsewhere = tmp_path / "ray", tmp_path / "rayother"
    hold = "import sys, time; f = open(sys.argv[1], 'w'); print('open', flush=True); time.sleep(120)"
    children = []
    for folder in (ray_folder, elsewhere):
        folder.mkdir()
        child = subprocess.Popen([sys.executable, "-c", hold, str(folder / "log")], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "open"
        children.append(child)
    try:
        assert end_leftovers(str(ray_folder)) == [children[0].pid]
        assert children[0].wait(timeout=10) != 0
        assert children[1].poll() is None
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_a_stop_request_is_seen_once_its_file_exists(tmp_path) -> None:
    from tasks.train_worker import StopRequest

    path = tmp_path / "stop"
    asked = StopRequest(str(path), every=0.0)
    assert not asked() and not StopRequest(None)()
    path.touch()
    assert asked() and asked()
