"""`gendag table`: a paper's table from the method graphs, or its plan (`--dry-run`), or the list
of tables (`--list`). `flows.cli` merges it into the one command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from flows.cli_support import _run_flows, console, fail

app = typer.Typer(add_completion=False)
REPORTS = Path("reports") / "tables"


@app.command()
def table(
    name: Optional[str] = typer.Argument(None, help="A table under configs/tables/ (see --list) or a table file."),
    scale: str = typer.Option("cpu", "--scale", help="cpu (the digits and 2-D, here) | paper (the papers' settings, GPUs) | tiny (a smoke test)"),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Seeds per run (default: the table's, per scale)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the task graph, the resource and sample plan and "
                                 "the estimated cost; train nothing."),
    list_: bool = typer.Option(False, "--list", help="List the tables."),
    fresh: bool = typer.Option(False, "--fresh", help="Rerun every cell's graph instead of reusing finished cells "
                               "(trained models and coupling sets are still reused)."),
    out: Path = typer.Option(REPORTS, "--out", "-o", help="Where tables go: <out>/<name>/ (and <out>/index.md)."),
) -> None:
    """Make a paper's table: every cell a graph run (reused when finished), the paper's numbers
    beside gendag's, written as Markdown, CSV, LaTeX and a plot with a provenance manifest."""
    from tasks.config import SCALES, ConfigError
    from tasks.table_config import load_table, plan, table_names

    if list_ or name is None:
        return _list(load_table, table_names())
    if scale not in SCALES:
        fail(f"--scale {scale!r}: expected one of {', '.join(SCALES)}")
    try:
        spec = load_table(name)
        cells = plan(spec, scale, seeds)
    except ConfigError as e:
        fail(str(e))
    count = seeds or spec.seeds.get(scale, 1)
    folder = out / (spec.name if scale == "cpu" else f"{spec.name}-{scale}")
    if dry_run:
        return _dry_run(spec, scale, count, cells, folder)
    from flows.table import TableJob, make_table
    from tasks.infra import home
    from tasks.preflight import preflight

    runs = home() / "runs" / "tables" / f"{spec.name}-{scale}"
    for cell in cells:
        try:
            preflight(cell.cfg, runs / cell.folder_name, f"table {spec.name}: runs.{cell.run} ({cell.config})",
                      list(cell.overrides))
        except ConfigError as e:
            fail(str(e))
    job = TableJob(spec, scale, count, cells, runs.resolve(), fresh)

    def make_flow():
        from prefect import flow

        return flow(name="table", validate_parameters=False)(make_table)

    _run_flows(make_flow, [(job, folder.resolve())], show=_show)


def _list(load_table, names: list[str]) -> None:
    listing = Table(title="tables (configs/tables/)")
    for column in ("table", "title", "paper", "runs", "cells"):
        listing.add_column(column)
    for name in names:
        t = load_table(name)
        listing.add_row(name, t.title, f"{t.source.paper}, {t.source.table}", str(len(t.runs)), str(len(t.cells())))
    console.print(listing)


def _dry_run(spec, scale: str, seeds: int, cells, folder: Path) -> None:
    from tasks.config import ConfigError
    from tasks.preflight import PreflightError, check_data
    from tasks.table_cost import GPU_FLOPS, cpu_rate, estimate
    from tasks.tables import side_by_side

    console.print(f"[bold]table {spec.name}[/] at scale {scale}, {seeds} seed{'s' * (seeds > 1)}: {spec.title}")
    console.print(f"  {spec.notes.get(scale, '')}".rstrip())
    console.print("task graph:  plan -> " + " | ".join(f"{c.graph}({c.folder_name})" for c in cells)
                  + f" -> cells' numbers -> {folder}/table.{{md,csv,tex,png}} + manifest.json -> MLflow run + Prefect artifact")
    console.print("resource and sample plan:")
    total, measured = 0.0, True
    for cell in cells:
        cost = estimate(cell.cfg, scale)
        total += cost.seconds
        measured &= cost.measured
        try:
            check_data(cell.cfg, None)
            data = "data ok"
        except (PreflightError, ConfigError) as e:
            data = f"data needed: {e}"
        train = ", ".join(f"{label} {t.steps}x{t.batch_size}" for label, t in cost.stages)
        workers = {(t.num_workers or 1, t.use_gpu) for _, t in cost.stages}
        where = " / ".join(f"{n} {'GPU' if gpu else 'CPU'} worker{'s' * (n > 1)}" for n, gpu in sorted(workers))
        console.print(f"  [bold]{cell.folder_name}[/]  {cell.graph} -c {cell.config.stem} {escape(' '.join(cell.overrides))}")
        pairing = f" · {cost.plan_seconds * 1e3:.0f} ms a coupling plan" if cost.plan_seconds else ""
        console.print(f"      train {train} on {where}{pairing} · sample {cell.cfg.sample.n_samples} x "
                      f"{cell.cfg.sample.sets} set(s), {cost.sampled_evals:.3g} network evals · "
                      f"{cost.flops_per_item / 1e6:.3g} MFLOP/item · est. {_duration(cost.seconds)} · {data}")
    how = (f"this machine's {cpu_rate() / 1e9:.0f} GFLOP/s, measured now" if measured
           else f"an assumed {GPU_FLOPS / 1e12:g} TFLOP/s per GPU")
    lanes = side_by_side(cells)
    at_once = f"{lanes} cells side by side" if lanes > 1 else "one cell at a time"
    console.print(f"estimated cost: {_duration(total / lanes)} in all ({_duration(total)} of runs, {at_once}, at {how}); "
                  f"cells read: {len(spec.cells())} values")


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _show(record: dict, folder: Path) -> None:
    console.print((folder / "table.md").read_text())
    hits = record["cache"]
    console.print(f"cells reused whole {hits['cells_reused']}, run {hits['cells_run']}; models reused "
                  f"{hits['reused']['models']}, trained {hits['made']['models']}; coupling sets reused "
                  f"{hits['reused']['couplings']}, made {hits['made']['couplings']}")
    console.print(f"table: {folder}  (md, csv, tex, png, manifest.json) · mlflow run {record['mlflow_run_id']}")
