"""One workspace, one Prefect test server and one Ray instance for the whole session; torch on one
thread for the modules of tiny analytic tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """A fresh gendag workspace (DVC repo, MLflow SQLite, store) with embedded services."""
    home = tmp_path_factory.mktemp("workspace")
    os.environ["GENDAG_HOME"] = str(home)
    os.environ["PREFECT_HOME"] = str(home / ".gendag" / "prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    from tasks.infra import configure_environment

    configure_environment()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield home
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def one_thread():
    """The tensors of the analytic tests are tiny: on a shared 2-core machine thread hand-offs dominate."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
