"""The team's `gendag` commands: `retrain` (champion / challenger), `serve` and `schedules`
(Prefect deployments), `runs` (MLflow runs side by side) and `services` (the shared servers).
`flows.cli` merges them into the one command line."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows.cli_support import _run_flows, console, fail, model_family, open_store
from tasks.infra import configure_environment

app = typer.Typer(add_completion=False)


@app.command()
def retrain(
    model: str = typer.Argument(..., help="The champion: models:/<name> (alias champion) or models:/<name>@<alias>."),
    force: bool = typer.Option(False, "--force", help="Retrain even when the data version has not changed."),
    margin: Optional[float] = typer.Option(
        None, "--margin", help="Promote only when this much better (relative, e.g. 0.05); default registry.promotion_margin."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a value of the champion's graph config: key=value."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/<model>-retrain)."),
) -> None:
    """Re-run a registered model's graph from its logged config when its data version changed,
    and move the champion alias only if the new model wins on the champion's protocol.

    The new version is registered as `challenger`; the champion is re-scored on the new data
    version with its own protocol; a report (retrain.md, also in MLflow and Prefect) says what
    was compared and why it was or was not promoted."""
    from tasks.config import ConfigError
    from tasks.config_loading import apply_overrides, validate
    from tasks.preflight import preflight

    match = re.fullmatch(r"models:/(?P<name>[^@/]+)(?:@(?P<alias>[\w-]+))?", model)
    if not match:
        fail(f"{model!r}: expected models:/<name> or models:/<name>@<alias> (a champion is an alias, not a version)")
    open_store(model)
    from tasks.infra import Ref, folder_digest
    from tasks.promote import PromotionError, find_champion
    from tasks.registry import RegistryError, fetch_model_version

    try:
        champion = find_champion(match["name"], match["alias"] or "champion")
        version, model_dir, tree = fetch_model_version(f"models:/{champion.name}/{champion.version}")
    except (PromotionError, RegistryError) as e:
        fail(str(e))
    overrides = [*set_, "registry.auto_champion=false"]
    if margin is not None:
        overrides.append(f"registry.promotion_margin={margin}")
    folder = (out or Path("runs") / f"{champion.name}-retrain").resolve()
    origin = f"{model} (its graph's logged config)"
    try:
        graph_tree = json.loads(json.dumps(champion.graph_tree))
        apply_overrides(graph_tree, overrides)
        cfg = validate(graph_tree, origin, overrides)
        preflight(cfg, folder / "challenger", origin, overrides)
        own = validate(tree, f"{model} (its logged config)", family=model_family(model_dir))
    except ConfigError as e:
        fail(str(e))
    rescore = (own, Ref("model", str(model_dir), folder_digest(model_dir), own.digest()), version)

    def make_flow():
        from prefect import flow

        from flows.retrain import retrain as body

        return flow(name="retrain", validate_parameters=False)(body)

    _run_flows(make_flow, [(cfg, folder)], champion, rescore, force, show=print_decision)


@app.command()
def serve(
    command: list[str] = typer.Argument(..., help="The gendag command to schedule, after `--`: run ..., retrain ..., sample ..."),
    name: str = typer.Option(..., "--name", help="The schedule's (Prefect deployment's) name."),
    cron: Optional[str] = typer.Option(None, "--cron", help="A cron expression, e.g. '0 3 * * *' (03:00 daily)."),
    every: Optional[float] = typer.Option(None, "--every", help="Or an interval in seconds."),
) -> None:
    """Deploy a gendag command on a schedule through a Prefect server and run it at every tick
    (until interrupted), e.g. `gendag serve --name nightly --cron '0 3 * * *' -- retrain models:/gendag-fm-digits`."""
    from tasks.infra import RunError

    if (cron is None) == (every is None):
        fail("give one of --cron or --every")
    if every is not None and every <= 0:
        fail(f"--every {every:g}: expected a positive number of seconds")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError:
            fail(f"--cron {cron!r}: not a cron expression (five fields: minute hour day month weekday)")
    configure_environment()
    from flows.schedules import check_command, require_server, serve as serve_schedule

    try:
        check_command(command)
        require_server()
    except RunError as e:
        fail(str(e))
    serve_schedule(name, command, cron, every)


@app.command()
def schedules() -> None:
    """The scheduled gendag commands on the Prefect server: schedule, next and last run."""
    from tasks.infra import RunError

    configure_environment()
    from flows.schedules import list_schedules, require_server

    try:
        require_server()
    except RunError as e:
        fail(str(e))
    table = Table(title="schedules (gendag serve)")
    for column in ("name", "command", "schedule", "next run", "last run", "paused"):
        table.add_column(column)
    for row in list_schedules():
        table.add_row(row["name"], row["command"], row["schedule"], row["next"], row["last"], "yes" if row["paused"] else "")
    console.print(table)


def print_decision(summary: dict, out: Path) -> None:
    decision = summary["decision"]
    verdict = ("[bold green]promoted[/]" if decision["promoted"] else
               "[bold]retrained, not promoted[/]" if decision["retrained"] else "[bold]nothing to do[/]")
    console.print(f"{summary['name']}: {verdict}: {escape(decision['reason'])}")
    console.print(f"summary: {out / 'summary.json'}" + (f"   report: {decision['report']}" if "report" in decision else ""))


runs_app = typer.Typer(no_args_is_help=True, help="The MLflow runs of the graphs: list them, compare two.")
app.add_typer(runs_app, name="runs")


def _print_wide(table: Table) -> None:
    """A table of ids and names on a terminal, or whole (not cut at 80 columns) into a pipe."""
    (console if console.is_terminal else Console(width=200)).print(table)


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{seconds:.1f} s" if seconds < 60 else f"{minutes} min {rest} s" if minutes < 60 else f"{minutes / 60:.1f} h"


@runs_app.command(name="list")
def runs_list(
    experiment: str = typer.Option("gendag", "--experiment", "-e", help="MLflow experiment (registry.experiment)."),
    limit: int = typer.Option(20, "--limit", "-n", min=1, help="How many runs, newest first."),
) -> None:
    """The latest runs: id, name (a stage's run is marked with ↳), graph, dataset, status, start,
    duration and primary score."""
    import datetime

    from tasks.runs import RunLookupError, latest_runs

    open_store("runs list")
    try:
        rows = latest_runs(experiment, limit)
    except RunLookupError as e:
        fail(str(e))
    table = Table(title=f"MLflow runs · experiment {experiment} (gendag runs compare <run> <run>)")
    for column in ("run", "name", "graph", "dataset", "status", "start", "duration", "score"):
        table.add_column(column, justify="right" if column in ("duration", "score") else "left")
    for row in rows:
        start = datetime.datetime.fromtimestamp(row.start).strftime("%Y-%m-%d %H:%M:%S")
        score = f"{row.score[0]} {row.score[1]:.4g}" if row.score else "-"
        table.add_row(row.run_id[:8], ("↳ " if row.nested else "") + escape(row.name), row.graph, row.dataset,
                      row.status, start, _duration(row.seconds), score)
    _print_wide(table)


@runs_app.command(name="compare")
def runs_compare(
    first: str = typer.Argument(..., help="A run id, or its start as `gendag runs list` prints it."),
    second: str = typer.Argument(..., help="The other run."),
    all_: bool = typer.Option(False, "--all", help="Also the params and metrics that are the same."),
) -> None:
    """Two runs' params and metrics side by side, those that differ first (only those, without --all)."""
    from tasks.runs import RunLookupError, compare, find_run

    open_store("runs compare")
    try:
        a, b = find_run(first), find_run(second)
    except RunLookupError as e:
        fail(str(e))
    table = Table(title=f"{escape(a.info.run_name or '')} vs {escape(b.info.run_name or '')}")
    for column in ("", "name", a.info.run_id[:8], b.info.run_id[:8]):
        table.add_column(column)
    rows = compare(a, b, all_)
    for row in rows:
        table.add_row(*map(escape, row))
    _print_wide(table)
    if not rows:
        console.print("the two runs have the same params and metrics")


services_app = typer.Typer(add_completion=False, no_args_is_help=True, help=(
    "The team's shared services on this machine: PostgreSQL, an MLflow server on it, a Prefect server and a "
    "two-node Ray cluster; state under one folder (--dir). `source <dir>/env.sh` points a workstation at them."))
app.add_typer(services_app, name="services")
DirOption = typer.Option(None, "--dir", help="The services' folder (default <workspace>/.gendag/services).")


def _layout(folder: Path | None):
    from tasks.services import Layout, default_dir

    return Layout.load((folder or default_dir()).resolve())


@services_app.command("up")
def services_up(
    folder: Optional[Path] = DirOption,
    host: Optional[str] = typer.Option(None, "--host", help="Address to bind every service to (default 127.0.0.1)."),
    postgres_port: Optional[int] = typer.Option(None, "--postgres-port", help="PostgreSQL's port (default 5433)."),
    mlflow_port: Optional[int] = typer.Option(None, "--mlflow-port", help="MLflow server's port (default 5000)."),
    prefect_port: Optional[int] = typer.Option(None, "--prefect-port", help="Prefect server's port (default 4200)."),
    ray_port: Optional[int] = typer.Option(None, "--ray-port", help="Ray head's GCS port (default 6380; the 7 "
                                           "ports after it are the nodes' own)."),
) -> None:
    """Start every service not up yet, wait until each answers, print and write (env.sh) the
    environment a workstation sets to use them. The last ports given in this folder are kept."""
    from dataclasses import replace

    from tasks.services import ServiceError, up

    given = {"host": host, "postgres_port": postgres_port, "mlflow_port": mlflow_port,
             "prefect_port": prefect_port, "ray_port": ray_port}
    layout = replace(_layout(folder), **{k: v for k, v in given.items() if v is not None})
    try:
        env = up(layout, say=console.print)
    except ServiceError as e:
        fail(str(e), code=1)
    console.print(f"# a workstation uses them with: source {layout.dir / 'env.sh'}")
    for key, value in env.items():
        console.print(f"export {key}={value}", highlight=False, soft_wrap=True)


@services_app.command("down")
def services_down(folder: Optional[Path] = DirOption) -> None:
    """Stop the services of the folder in reverse order (Ray, Prefect, MLflow, PostgreSQL)."""
    from tasks.services import down

    down(_layout(folder), say=console.print)


@services_app.command("status")
def services_status(folder: Optional[Path] = DirOption) -> None:
    """A table of the services of the folder: address, pids, up or down."""
    from tasks.services import status

    layout = _layout(folder)
    table = Table(title=f"services in {layout.dir}")
    for column in ("service", "address", "pid", "state", "detail"):
        table.add_column(column)
    for row in status(layout):
        pids = row["pids"]
        table.add_row(row["service"], row["address"], f"{pids[0]}" + (f" +{len(pids) - 1}" if len(pids) > 1 else "") if pids else "-",
                      "[green]up[/]" if row["up"] else "[red]down[/]", row["detail"])
    console.print(table)
