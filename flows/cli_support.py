"""What every `gendag` command shares: the consoles, one-line failures, running flows on the
embedded or configured services, reading the registry, printing a run's summary."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.infra import configure_environment

console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {escape(' '.join(message.splitlines()))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run_flows(make_flow, runs: list[tuple], *extra, show=None) -> None:
    """Boot the services while the flow (and torch) are imported, then run each (cfg, folder)
    and `show` its summary (default: `print_summary`)."""
    from models.data import DatasetError
    from tasks.config import ConfigError
    from tasks.infra import Interrupted, RunError

    configure_environment()
    from tasks.runtime import start_services

    quiet_logs()
    graph_flow = start_services(make_flow)
    for cfg, folder in runs:
        try:
            summary = graph_flow(cfg, folder, *extra)
        except Interrupted as e:
            fail(str(e), code=130)
        except (ConfigError, DatasetError, FileNotFoundError, RunError) as e:
            fail(str(e).splitlines()[0] if str(e) else repr(e))
        (show or print_summary)(summary, folder)


def open_store(reference: str) -> None:
    """Before reading the registry for `reference`: refuse one that does not exist, set up the
    environment, quiet the services' set-up logs."""
    from tasks.config import ConfigError
    from tasks.preflight import require_registry

    try:
        require_registry(reference)
    except ConfigError as e:
        fail(str(e))
    configure_environment()
    quiet_logs()


def model_family(model_dir: Path) -> str:
    """The family of a stored model (its spec), which its sampler grid runs on."""
    from models.checkpoint import SPEC_FILE, ModelSpec

    return ModelSpec.from_json((Path(model_dir) / SPEC_FILE).read_text()).family


def quiet_logs() -> None:
    """Prefect logs every failed task with a traceback; the CLI reports user errors in one line
    and re-raises anything unexpected (so real bugs still show their traceback). DVC and MLflow
    announce their one-time set-up at INFO level; only warnings are shown. Prefect's logging set-up
    (done once, on importing `prefect.main`) runs first: it would reset these levels afterwards."""
    import logging

    import prefect.main  # noqa: F401

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for name in ("dvc.repo.init", "dvc.repo.scm_context", "mlflow.store.db.utils", "alembic"):  # set-up chatter
        logging.getLogger(name).setLevel(logging.WARNING)


def print_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"{summary['graph']} · {summary['name']} · {summary['dataset']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary["metrics"].items():  # already in reading order
        table.add_row(key, f"{value:.5g}")
    console.print(table)
    reg = summary["registered_model"]
    what = (f"registered [bold]{reg['name']}[/] v{reg['version']} ({', '.join(reg['aliases'])})" if reg["aliases"]
            else f"evaluated [bold]{reg['name']}[/] v{reg['version']}")
    console.print(f"{what} · mlflow run {summary['mlflow_run_id']} · prefect flow run {summary['prefect_flow_run_id']}")
    console.print(f"summary: {out / 'summary.json'}   report: {summary['report']}")
