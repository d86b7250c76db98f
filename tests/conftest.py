"""One workspace, one Prefect test server and one Ray instance for the whole session."""

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
