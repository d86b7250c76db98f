"""`gendag table <name>`: a paper's table, made by the method graphs.

    plan (configs/tables/<name>.yaml at a scale, with seeds)
      -> every cell: its finished run reused, or its graph run (a Prefect subflow, its MLflow run
         nested in the table's; trained models and coupling sets reused by the graphs' caches),
         as many side by side as the CPUs hold (`side_by_side`)
      -> the cells' numbers -> table.md / .csv / .tex / .png + manifest.json -> tables' index.md
      -> the table's MLflow run (parent of its cells' runs) and a Prefect artifact

A table's files reach its folder only when every cell succeeded (`run_outputs`).
"""

from __future__ import annotations

import contextvars
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flows.graphs import GRAPHS
from flows.summary import run_outputs
from tasks.progress import note
from tasks.register import PARENT_RUN, git_commit, tracked_run
from tasks.table_config import Cell, TableConfig
from tasks.tables import (Hits, cell_values, finished_cell, log_table, manifest, markdown, side_by_side, write_index,
                          write_table)
from tasks.train import stop_training

EXPERIMENT = "gendag-tables"


@dataclass(frozen=True)
class TableJob:
    table: TableConfig
    scale: str
    seeds: int
    cells: list[Cell]
    runs: Path  # where the cells' graph runs go (one folder each)
    fresh: bool = False  # rerun every cell's graph (their models and coupling sets are still reused)

    @property
    def name(self) -> str:  # what the command line's failures name
        return self.table.name


@contextmanager
def table_run(job: TableJob):
    """The table's MLflow run, open while its cells run (theirs are nested in it)."""
    commit = git_commit()
    tags = {"gendag.table": job.table.name, "gendag.scale": job.scale, "gendag.seeds": str(job.seeds),
            "gendag.git_commit": commit, "mlflow.source.git.commit": commit.removesuffix("-dirty"),
            "mlflow.note.content": f"{job.table.title} ({job.table.source.paper}, {job.table.source.table})"}
    with tracked_run("table", f"table-{job.table.name}-{job.scale}", EXPERIMENT, tags) as (_, run_id):
        token = PARENT_RUN.set(run_id)
        try:
            yield run_id, commit
        finally:
            PARENT_RUN.reset(token)


def make_table(job: TableJob, out: Path) -> dict:
    table = job.table
    with run_outputs(out) as staging, table_run(job) as (run_id, commit):
        hits, lanes = Hits(), side_by_side(job.cells)
        summaries = run_cells(job, hits, lanes)
        values = cell_values(table, {run: [summaries[c.folder_name] for c in job.cells if c.run == run]
                                     for run in table.runs})
        record = manifest(table, job.scale, job.seeds, job.cells, summaries, hits, commit, run_id) | {"side_by_side": lanes}
        files = write_table(table, values, record, staging)
        log_table(run_id, values, files, markdown(table, values, record), table.name)
    write_index(out.parent)
    return record | {"folder": str(out)}


def run_cells(job: TableJob, hits: Hits, lanes: int) -> dict[str, dict]:
    """Every cell's summary by folder name: a finished cell reused whole, the others' graphs run,
    `lanes` of them at once, each in a thread holding a copy of the table's context (so its
    Prefect flow run and MLflow run nest in the table's). A failed cell stops the cells not begun."""

    def one(cell: Cell) -> dict:
        folder = job.runs / cell.folder_name
        done = None if job.fresh else finished_cell(cell, folder)
        summary = done or GRAPHS[cell.graph].flow()(cell.cfg, folder)
        hits.count(summary, reused_whole=done is not None)
        return summary

    if lanes == 1:
        return {cell.folder_name: one(cell) for cell in job.cells}
    pool, running = ThreadPoolExecutor(max_workers=lanes, thread_name_prefix="cell"), {}
    try:
        running = {cell.folder_name: pool.submit(contextvars.copy_context().run, one, cell) for cell in job.cells}
        return {name: future.result() for name, future in running.items()}
    except KeyboardInterrupt:  # Ctrl-C: the running cells' fits stop too (Ray Train's own handler
        # is only installed for a fit in the main thread)
        pool.shutdown(wait=False, cancel_futures=True)
        begun = sum(future.running() for future in running.values())
        note(f"table {job.name}: interrupted; stopping the {begun} running cell(s). Finished cells and "
             "checkpoints are kept: the same command resumes.")
        stop_training()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
