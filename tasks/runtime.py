"""The services of one process: Ray (local and sized to the machine, or `RAY_ADDRESS`) and the
embedded Prefect server, started side by side; what they leave behind is cleaned up at exit."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")


# How often Ray Train's controller polls its workers (Ray's default: 2 s). Each step of a fit
# (workers up, running, done) waits for a poll: a fit of an empty loop took 17-21 s at 2 s and
# 10-13 s at 0.2 s (1 or 2 workers, this machine), and the main job fits six models. Set through
# the job's runtime env: the controller is an actor, and an os.environ set after `import ray`
# did not reach it.
TRAIN_POLL_S = "0.2"


_INIT_LOCK = threading.Lock()  # two table cells side by side start one Ray


def ensure_ray() -> None:
    """Start (or connect to) Ray once; later calls are free."""
    import ray

    with _INIT_LOCK:
        if not ray.is_initialized():
            _start_ray(ray)


def ray_cpus() -> int:
    """The CPUs of the Ray that work runs on: the cluster's (`RAY_ADDRESS`), else this machine's
    (what the local Ray is started with)."""
    if not os.environ.get("RAY_ADDRESS"):
        return os.cpu_count() or 1
    import ray

    ensure_ray()
    return int(ray.cluster_resources().get("CPU", 1))


def _start_ray(ray) -> None:
    # read by Ray Train's controller actor: given to every worker process of this job
    jobs = {"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
                                                                             TRAIN_POLL_S)}}
    common = {"namespace": "gendag", "configure_logging": True, "logging_level": "ERROR", "runtime_env": jobs}
    if os.environ.get("RAY_ADDRESS"):  # a cluster (e.g. `gendag services up`): connect, start nothing
        ray.init(log_to_driver=False, **common)
        return
    # A short temp dir: Ray's unix sockets live under it and paths are length-limited.
    tmp = os.environ.get("GENDAG_RAY_TMP")
    if not tmp:
        tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
        atexit.register(_remove_ray_tmp, tmp)  # runs before Ray's own exit handler (registered on import)
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=os.environ.get("GENDAG_RAY_LOGS", "0") == "1",
        _temp_dir=tmp,
        **common,
    )


def _remove_ray_tmp(tmp: str) -> None:
    """Stop Ray and wait for its processes (they write under `tmp` until they are gone), end
    any that outlived it, then remove the folder we created. A process killed outright (SIGKILL)
    cannot do this."""
    import ray

    ray.shutdown(wait_for_processes=True)
    end_leftovers(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def end_leftovers(tmp: str) -> list[int]:
    """Kill every other process still writing under `tmp` (our local Ray's folder); returns their
    pids. A Ray worker can outlive its raylet: a Ray Train controller (~800 MB) was seen asleep
    for good, its parent gone, after the run that started it had ended and stopped its Ray."""
    import psutil

    inside, ended = os.path.join(tmp, ""), []
    for process in psutil.process_iter():
        try:
            if process.pid != os.getpid() and any(f.path.startswith(inside) for f in process.open_files()):
                process.kill()
                ended.append(process.pid)
        except psutil.Error:  # gone meanwhile, or not ours to read
            continue
    return ended


# Loggers of the embedded Prefect server that report its own shutdown: Prefect stops the server
# at exit (SIGTERM) while it may still be writing the run's last task-run events, and the
# cancelled database calls log a CancelledError traceback (PrefectHQ/prefect#16504); the
# recorder keeps and retries those events, so nothing is lost but the traceback lands on our
# terminal after a successful run.
SERVER_SHUTDOWN_LOGGERS = ("sqlalchemy.pool", "prefect.server.services.task_run_recorder")


def quiet_server_shutdown() -> None:
    """Give the embedded server Prefect's default logging config with SERVER_SHUTDOWN_LOGGERS at
    CRITICAL (PREFECT_LOGGING_SETTINGS_PATH, a file under PREFECT_HOME, read by the server process
    when it starts). A logging config the user set wins."""
    if os.environ.get("PREFECT_LOGGING_SETTINGS_PATH"):
        return
    import yaml
    from prefect.logging.configuration import DEFAULT_LOGGING_SETTINGS_PATH

    config = yaml.safe_load(DEFAULT_LOGGING_SETTINGS_PATH.read_text())
    config["loggers"].update({name: {"level": "CRITICAL"} for name in SERVER_SHUTDOWN_LOGGERS})
    path = Path(os.environ["PREFECT_HOME"]) / "server-logging.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    os.environ["PREFECT_LOGGING_SETTINGS_PATH"] = str(path)


def start_services(meanwhile: Callable[[], T]) -> T:
    """Boot the embedded Prefect server and Ray side by side, and run `meanwhile` (e.g. heavy
    imports) while they come up: each takes seconds, mostly waiting on its own processes.
    Prefect reuses the started server (its temporary server is a per-process singleton); a
    failure here surfaces again, with Prefect's message, on first use."""
    import threading

    from prefect.settings import PREFECT_API_URL

    prefect_boot = None
    if not PREFECT_API_URL.value():
        from prefect.server.api.server import SubprocessASGIServer

        quiet_server_shutdown()

        def boot() -> None:
            try:
                SubprocessASGIServer().start()
            except Exception:  # noqa: BLE001 - Prefect retries and reports it when the flow starts
                pass

        prefect_boot = threading.Thread(target=boot, name="prefect-server-boot", daemon=True)
        prefect_boot.start()
    result = meanwhile()
    ensure_ray()
    if prefect_boot:
        prefect_boot.join()
    return result
