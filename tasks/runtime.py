"""One Ray instance per process: local and sized to the machine, or `RAY_ADDRESS`."""

from __future__ import annotations

import os
import tempfile


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
