"""One Ray instance per process: local and sized to the machine, or `RAY_ADDRESS`."""

from __future__ import annotations

import os
import tempfile
from typing import Callable, TypeVar

T = TypeVar("T")


def ensure_ray() -> None:
    """Start (or connect to) Ray once; later calls are free."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace="gendag", log_to_driver=False)
        return
    # A short temp dir: Ray's unix sockets live under it and paths are length-limited.
    tmp = os.environ.get("GENDAG_RAY_TMP") or tempfile.mkdtemp(prefix="ray", dir="/tmp")
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        namespace="gendag",
        log_to_driver=os.environ.get("GENDAG_RAY_LOGS", "0") == "1",
        _temp_dir=tmp,
        configure_logging=True,
        logging_level="ERROR",
    )


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
