"""`gendag`: run a task graph from a config, list what exists."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from tasks.infra import configure_environment

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIG = {"flow-matching": "flow-matching/gaussians-to-moons.yaml"}

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
errors = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def resolve_config(graph: str, config: str | None) -> Path:
    """A path, or a name under configs/ (with or without `.yaml`)."""
    candidates = [config] if config else [DEFAULT_CONFIG[graph]]
    for name in candidates:
        for path in (Path(name), CONFIGS / name, CONFIGS / f"{name}.yaml", CONFIGS / graph / f"{name}.yaml"):
            if path.is_file():
                return path
    fail(f"--config {config}: no such file (looked in . and {CONFIGS})")


@app.command()
def run(
    graph: str = typer.Argument(..., help="Task graph to run (see `gendag list`)."),
    config: Optional[list[str]] = typer.Option(
        None, "--config", "-c", help="YAML config file or name under configs/; repeat to run several in one go."
    ),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a value: key.sub=value (repeatable)."),
    scale: str = typer.Option("cpu", "--scale", help="tiny | cpu | paper"),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output folder (default runs/<name>-<scale>); with several configs, "
        "the parent of one folder per config file."
    ),
) -> None:
    """Run a task graph through Prefect and print its results.

    Several configs run one after another in one process (one Prefect server, one Ray), all validated first."""
    from models.data import DatasetError
    from tasks.config import GRAPHS, ConfigError, load_config

    if graph not in GRAPHS:
        fail(f"graph {graph!r}: expected one of {', '.join(GRAPHS)}")
    runs, several = [], len(config or []) > 1
    for name in config or [None]:
        path = resolve_config(graph, name)
        try:
            cfg = load_config(path, scale=scale, overrides=set_)
        except ConfigError as e:
            fail(str(e))  # it names the file
        if cfg.graph != graph:
            fail(f"config graph {cfg.graph!r} does not match the requested graph {graph!r}")
        runs.append((cfg, _run_folder(out, path, cfg, scale, several)))
    folders = [folder for _, folder in runs]
    clashes = sorted({str(folder) for folder in folders if folders.count(folder) > 1})
    if clashes:
        fail(f"--config: two configs would write to the same folder {clashes[0]}")

    configure_environment()
    from tasks.runtime import start_services

    quiet_logs()
    graph_flow = start_services(lambda: _graph_flow(graph))
    for cfg, folder in runs:
        try:
            summary = graph_flow(cfg, folder.resolve())
        except (ConfigError, DatasetError, FileNotFoundError) as e:
            fail(str(e).splitlines()[0] if str(e) else repr(e))
        print_summary(summary, folder)


def _run_folder(out: Path | None, config: Path, cfg, scale: str, several: bool) -> Path:
    """--out itself for one config; for several, --out/<config file name> each."""
    if out is None:
        return Path("runs") / f"{cfg.name}-{scale}"
    return out / config.stem if several else out


def _graph_flow(graph: str):
    """Imported while the services boot: it pulls in torch, Ray and the tasks."""
    from flows.graphs import GRAPH_FLOWS

    return GRAPH_FLOWS[graph]


def quiet_logs() -> None:
    """Prefect logs every failed task with a traceback; the CLI reports user errors in one line
    and re-raises anything unexpected (so real bugs still show their traceback). DVC and MLflow
    announce their one-time set-up at INFO level; only warnings are shown."""
    import logging

    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for name in ("dvc.repo.scm_context", "mlflow.store.db.utils", "alembic"):  # set-up chatter
        logging.getLogger(name).setLevel(logging.WARNING)


def print_summary(summary: dict, out: Path) -> None:
    table = Table(title=f"{summary['graph']} · {summary['name']} · {summary['dataset']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in sorted(summary["metrics"].items()):
        table.add_row(key, f"{value:.5g}")
    console.print(table)
    reg = summary["registered_model"]
    console.print(
        f"registered [bold]{reg['name']}[/] v{reg['version']} ({', '.join(reg['aliases'])}) · "
        f"mlflow run {summary['mlflow_run_id']} · prefect flow run {summary['prefect_flow_run_id']}"
    )
    console.print(f"summary: {out / 'summary.json'}   report: {summary['report']}")


@app.command(name="list")
def list_() -> None:
    """Show graphs, methods, datasets and the configs that ship."""
    from models.data import DATASETS
    from models.solvers import ADAPTIVE_METHODS, FIXED_STEP_METHODS
    from tasks.config import GRAPHS

    table = Table(title="gendag")
    table.add_column("kind")
    table.add_column("names")
    table.add_row("graphs", ", ".join(GRAPHS))
    table.add_row("methods", "flow matching (CondOT / VP / VE Gaussian paths, independent or minibatch-OT couplings)")
    table.add_row("samplers", ", ".join(FIXED_STEP_METHODS + ADAPTIVE_METHODS))
    table.add_row("datasets", ", ".join(DATASETS))
    table.add_row("configs", ", ".join(sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml"))))
    console.print(table)


def main() -> None:
    app(prog_name="gendag")


if __name__ == "__main__":
    sys.exit(main())
