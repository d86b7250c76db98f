"""The steps of a table (`flows.table`): reuse a finished cell, read the cells' numbers, write
the table (Markdown, CSV, LaTeX, a plot, a provenance manifest), the index of every table, and
record it in MLflow and Prefect.

A cell's graph run is reused whole when its folder holds the summary of a run of the same
config (`config_hash`) on the same data version (`data_hash`, by content); otherwise the graph
runs, and the graphs' own caches reuse its trained models and coupling sets (what was made
anew is counted from the workspace's model and coupling folders, before and after).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import threading
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from prefect import task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from tasks.config import RunConfig  # noqa: E402
from tasks.config_loading import CONFIGS  # noqa: E402
from tasks.data import version_dataset  # noqa: E402
from tasks.infra import RunError, home, store  # noqa: E402
from tasks.runtime import ray_cpus  # noqa: E402
from tasks.table_config import Cell, Column, TableConfig  # noqa: E402

FORMATS = ("md", "csv", "tex", "png")


class TableError(RunError):
    """A finished cell lacks a number the table reads (one line naming row, column and run)."""


@task(name="reuse-cell", cache_policy=NO_CACHE)
def finished_cell(cell: Cell, folder: Path) -> dict | None:
    """The summary of `folder` when it is a finished run of this cell's config on today's data."""
    path = folder / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("graph_config_hash") != cell.cfg.digest():
        return None
    return summary if summary.get("data_hash") == version_dataset(cell.cfg.data, cell.cfg.seed).hash else None


def made_things() -> set[str]:
    """The trained models and coupling sets in the workspace (to count what a cell made anew)."""
    folders = [store() / "models", home() / "data" / "couplings"]
    return {f"{f.parent.name}/{f.name}" for folder in folders if folder.is_dir() for f in folder.iterdir() if f.is_dir()}


def used_things(summary: dict) -> set[str]:
    """The models and coupling sets a finished graph run used (its stages', or its own)."""
    stages = summary.get("stages") or [summary]
    used = {f"models/{Path(s['model_uri']).name}" for s in stages if "model_uri" in s}
    used |= {f"couplings/{Path(s['gendag.couplings_uri']).name}" for s in stages if "gendag.couplings_uri" in s}
    return used


@dataclass
class Hits:
    """What a table run reused and what it made (the cache's hits and misses): a model or coupling
    set a cell used is made when the workspace did not hold it as the table began (`before`), else
    reused; counted as cells finish, from any thread."""

    before: set[str] = field(default_factory=made_things)
    cells_reused: int = 0
    cells_run: int = 0
    reused: set[str] = field(default_factory=set)  # models/... and couplings/... taken from the cache
    made: set[str] = field(default_factory=set)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def count(self, summary: dict, reused_whole: bool) -> None:
        used = used_things(summary)
        with self._guard:
            self.cells_reused += reused_whole
            self.cells_run += not reused_whole
            self.made |= used - self.before
            self.reused |= used & self.before

    def as_dict(self) -> dict:
        def kinds(things: set[str]) -> dict[str, int]:
            return {kind: sum(t.startswith(f"{kind}/") for t in things) for kind in ("models", "couplings")}

        return {"cells_reused": self.cells_reused, "cells_run": self.cells_run,
                "reused": kinds(self.reused), "made": kinds(self.made)}


def side_by_side(cells: list[Cell]) -> int:
    """How many of the cells to run at once: as many as the CPUs of this Ray hold, when every
    cell's training says what it takes (`train.threads` per worker, on CPU workers); one at a time
    otherwise (a worker with no `train.threads` uses the whole machine). Cells side by side that
    need the same dataset version, model or coupling set make it once (`tasks.infra.claimed`)."""
    if len(cells) < 2 or any(c.cfg.train.threads is None or c.cfg.train.use_gpu for c in cells):
        return 1
    need = max(c.cfg.train.num_workers * c.cfg.train.threads for c in cells)
    return max(1, min(len(cells), ray_cpus() // need))


def read_metric(summary: dict, key: str) -> float | None:
    """`key` in a run's metrics; `<stage>/<key>` in that stage's (a multi-stage graph);
    `best:<name>` the lowest `<name>@<setting>` over the trained sampler settings, and
    `best_<metric>:<name>` the `<metric>` of that setting (`best_nfe:w2`, `best_recall:w2`);
    `nfe@<setting>` is measured where the setting does not fix it, else read from it;
    `seconds:<part>` a wall time the summary records (`seconds:model_train`: the model's fit)."""
    if key.startswith("seconds:"):
        return summary.get("seconds", {}).get(key.split(":", 1)[1])
    head = key.split("@", 1)[0]
    stage, _, name = key.rpartition("/") if "/" in head else ("", "", key)
    metrics = summary["metrics"] if not stage else next(
        (s["metrics"] for s in summary.get("stages", []) if s["stage"] == stage), None)
    if metrics is None:
        return None
    from models.samplers import parse_label

    what, _, score = name.partition(":")
    if what != "best" and not what.startswith("best_"):
        if name in metrics or not name.startswith("nfe@"):
            return metrics.get(name)
        nfe = parse_label(name.split("@", 1)[1])[1].get("nfe")  # a fixed-step setting: its label says it
        return None if nfe is None else float(nfe)

    trained = {k.split("@", 1)[1]: v for k, v in metrics.items()
               if k.startswith(f"{score}@") and "untrained" not in parse_label(k.split("@", 1)[1])[1]}
    if not trained:
        return None
    label = min(trained, key=trained.get)
    if what == "best":
        return trained[label]
    return read_metric(summary, f"{stage}/{what[5:]}@{label}" if stage else f"{what[5:]}@{label}")


@dataclass(frozen=True)
class Value:
    row: str
    column: str
    metric: str
    run: str
    values: tuple[float, ...]  # one per seed
    paper: float | None

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None


def cell_values(table: TableConfig, summaries: dict[str, list[dict]]) -> list[Value]:
    """Every cell's numbers over seeds (`summaries`: run -> its summary per seed), in reading order."""
    out = []
    for row, column, run, key in table.cells():
        found = [read_metric(s, key) for s in summaries[run]]
        if any(v is None for v in found):
            have = ", ".join(sorted(summaries[run][0]["metrics"]))[:300]
            raise TableError(f"table {table.name}: row {row.label!r}, column {column.name!r}: run {run!r} "
                             f"has no metric {key!r} (it has {have} ...)")
        out.append(Value(row.label, column.name, key, run, tuple(float(v) for v in found),
                         row.paper.get(column.name)))
    return out


def _number(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "—"
    return f"{x:.4g} ± {std:.2g}" if std is not None else f"{x:.4g}"


def _grid(table: TableConfig, values: list[Value]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: each column beside its paper column (when the paper has numbers for it)."""
    by = {(v.row, v.column): v for v in values}
    published = [c.name for c in table.columns if any(c.name in r.paper for r in table.rows)]
    header = ["", *[h for c in table.columns for h in ([c.name, f"{c.name} (paper)"] if c.name in published
                                                         else [c.name])]]
    rows = []
    for row in table.rows:
        cells = [row.label]
        for c in table.columns:
            v = by.get((row.label, c.name))
            cells.append(_number(v.mean, v.std) if v else "—")
            if c.name in published:
                cells.append(_number(row.paper.get(c.name)))
        rows.append(cells)
    return header, rows


def markdown(table: TableConfig, values: list[Value], manifest: dict) -> str:
    header, rows = _grid(table, values)
    seeds = manifest["seeds"]
    lines = [f"# {table.title}", "", *([table.description.strip(), ""] if table.description else []),
             f"Paper: {table.source.paper}, {table.source.table} ({table.source.dataset}). "
             f"gendag at scale `{manifest['scale']}`: {manifest.get('note') or 'as configured'}; "
             f"{'mean ± std over ' + str(seeds) + ' seeds' if seeds > 1 else 'one seed'}; "
             f"{'lower' if table.lower_is_better else 'higher'} is better.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    hits = manifest["cache"]
    lines += ["", f"Commit `{manifest['git_commit']}`; cells reused whole: {hits['cells_reused']}, run: "
              f"{hits['cells_run']}; models reused {hits['reused']['models']}, trained {hits['made']['models']}; "
              f"coupling sets reused {hits['reused']['couplings']}, made {hits['made']['couplings']}. "
              "Provenance: `manifest.json`."]
    return "\n".join(line for line in lines) + "\n"


def latex(table: TableConfig, values: list[Value]) -> str:
    header, rows = _grid(table, values)

    def tex(cell: str) -> str:
        return cell.replace("±", r"$\pm$").replace("—", "--").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")

    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{tex(table.title)}}}",
             rf"\begin{{tabular}}{{l{'r' * (len(header) - 1)}}}", r"\toprule",
             " & ".join(tex(h) for h in header) + r" \\", r"\midrule"]
    lines += [" & ".join(tex(c) for c in r) + r" \\" for r in rows]
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def plot(table: TableConfig, values: list[Value], path: Path) -> Path:
    """One panel per quantity (`panels`), the rows side by side in each: gendag's mean with its
    spread over the seeds (filled markers), the paper's number (crosses). A panel whose columns
    all have numeric keys (steps S = 10 ... 1000) is an axis: its points are joined, at their
    numbers; other columns are categories and their points stand alone."""
    groups = panels(table, values)
    width = [max(1.6, 0.9 * len(columns)) for columns in groups.values()]
    fig, axes = plt.subplots(1, len(groups), figsize=(sum(width) + 2.5, 4.2), squeeze=False,
                             gridspec_kw={"width_ratios": width})
    for ax, (name, columns) in zip(axes[0], groups.items()):
        _plot_panel(ax, table, values, columns)
        if len(columns) == 1:  # a quantity of its own: the column names it
            ax.set_xticks([])
            name = columns[0].name
        ax.set_title(name, fontsize=9)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    order = sorted(range(len(labels)), key=lambda i: labels[i].endswith("(paper)"))  # gendag's rows first
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    fig.suptitle(table.title, fontsize=10)
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def panels(table: TableConfig, values: list[Value]) -> dict[str, list[Column]]:
    """The table's columns by the quantity they show, in column order: a column's `panel`, else
    the metric its first cell reads (`w2@euler,nfe=100` and `2-RF/w2@...` are both `w2`)."""
    first = {}
    for v in values:
        first.setdefault(v.column, v.metric)
    groups: dict[str, list[Column]] = {}
    for column in table.columns:
        metric = first.get(column.name)
        if metric is None and not column.panel:
            continue  # an empty column
        name = column.panel or metric.split("@", 1)[0].rpartition("/")[2]
        groups.setdefault(name, []).append(column)
    return groups or {"": list(table.columns)}


def _plot_panel(ax, table: TableConfig, values: list[Value], columns: list[Column]) -> None:
    names = [c.name for c in columns]
    try:
        at = [float(c.key) for c in columns]
        joined = True
    except ValueError:
        at, joined = list(range(len(columns))), False
    width = 0.8 / max(1, len(table.rows))
    colours = plt.get_cmap("tab10" if len(table.rows) <= 10 else "tab20")
    every = []
    for i, row in enumerate(table.rows):
        shift = 0.0 if joined else (i - (len(table.rows) - 1) / 2) * width
        mine = [(at[names.index(v.column)] + shift, v.mean, v.std or 0.0) for v in values
                if v.row == row.label and v.column in names]
        style = {"color": colours(i % colours.N), "ls": "-" if joined else "none"}
        if mine:
            x, y, s = zip(*mine)
            ax.errorbar(x, y, yerr=s, marker="o", capsize=3, label=row.label, **style)
            every += y
        paper = sorted((at[names.index(c)] + shift, v) for c, v in row.paper.items() if v is not None and c in names)
        if paper:
            x, y = zip(*paper)
            ax.plot(x, y, marker="x", alpha=0.7, label=f"{row.label} (paper)", **{**style, "ls": "--" if joined else "none"})
            every += y
    positive = [v for v in every if v > 0]
    if positive and len(positive) == len(every) and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
    if joined and min(at) > 0 and max(at) / min(at) > 30:
        ax.set_xscale("log")
    ax.set_xticks(at, names, rotation=25, ha="right", fontsize=8)
    ax.minorticks_off()
    if not joined:
        ax.set_xlim(-0.6, len(columns) - 0.4)



def write_table(table: TableConfig, values: list[Value], manifest: dict, folder: Path) -> list[Path]:
    """`folder`/table.{md,csv,tex,png} and manifest.json; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "table.md").write_text(markdown(table, values, manifest))
    (folder / "table.tex").write_text(latex(table, values))
    with open(folder / "table.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["row", "column", "mean", "std", "seeds", "values", "paper", "metric", "run"])
        for v in values:
            out.writerow([v.row, v.column, repr(v.mean), "" if v.std is None else repr(v.std), len(v.values),
                          " ".join(repr(x) for x in v.values), "" if v.paper is None else v.paper, v.metric, v.run])
    plot(table, values, folder / "table.png")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return [folder / f"table.{ext}" for ext in FORMATS] + [folder / "manifest.json"]


def feature_extractor(cfg: RunConfig, kind: str) -> str:
    if kind != "image":
        return "none (vectors: W2 / MMD on the points)"
    if cfg.evaluate.inception_weights:
        return f"Inception-v3 pool features (torch-fidelity, weights {cfg.evaluate.inception_weights})"
    return f"the digits classifier's features ({cfg.evaluate.feature_epochs} epochs, trained on the training split)"


def manifest(table: TableConfig, scale: str, seeds: int, cells: list[Cell], summaries: dict[str, dict],
             hits: Hits, commit: str, mlflow_run: str) -> dict:
    """What the numbers came from: commit, table config, and per cell its config, data, seed,
    MLflow run, model, sample counts and feature extractor."""
    def one(cell: Cell) -> dict:
        s = summaries[cell.folder_name]
        kind = "image" if any(k.startswith("fid@") for k in s["metrics"]) else "vector"
        config = cell.config.resolve()
        shown = config.relative_to(CONFIGS) if config.is_relative_to(CONFIGS) else config
        return {"run": cell.run, "seed": cell.seed, "graph": cell.graph, "config": str(shown),
                "overrides": list(cell.overrides), "config_hash": s["graph_config_hash"],
                "data_hash": s["data_hash"], "dataset": s["dataset"], "model_hash": s["model_hash"],
                "mlflow_run_id": s.get("graph_mlflow_run_id", s["mlflow_run_id"]),  # the graph's run
                "registered_run_id": s["mlflow_run_id"],  # the run of the model version it registered
                "registered_model": s["registered_model"], "prefect_flow_run_id": s["prefect_flow_run_id"],
                "samples": {"per_set": cell.cfg.sample.n_samples, "sets": cell.cfg.sample.sets},
                "feature_extractor": feature_extractor(cell.cfg, kind),
                "seconds": {**s.get("seconds", {}), **{f"{st['stage']}/{k}": v for st in s.get("stages", [])
                                                      for k, v in st.get("seconds", {}).items()}}}

    return {"table": table.name, "title": table.title, "scale": scale, "seeds": seeds,
            "note": table.notes.get(scale, ""), "source": table.source.model_dump(),
            "table_config_hash": table.digest(), "git_commit": commit,
            "mlflow_run_id": mlflow_run, "cache": hits.as_dict(), "cells": [one(c) for c in cells]}


def write_index(root: Path) -> Path:
    """`root`/index.md: every table written under `root`, with its scale, seeds and commit."""
    lines = ["# Tables", "", "Made by `gendag table <name>`; each folder holds table.md / .csv / .tex / .png "
             "and manifest.json (provenance).", "", "| table | scale | seeds | paper | commit |", "|---|---|---|---|---|"]
    for path in sorted(root.glob("*/manifest.json")):
        m = json.loads(path.read_text())
        lines.append(f"| [{m['title']}]({path.parent.name}/table.md) | {m['scale']} | {m['seeds']} | "
                     f"{m['source']['paper']}, {m['source']['table']} | `{m['git_commit'][:12]}` |")
    index = root / "index.md"
    root.mkdir(parents=True, exist_ok=True)
    index.write_text("\n".join(lines) + "\n")
    return index


def log_table(run_id: str, values: list[Value], files: list[Path], text: str, name: str) -> None:
    """The table's numbers and files on its MLflow run, its Markdown as a Prefect artifact."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from prefect.artifacts import create_markdown_artifact

    client = MlflowClient()
    from tasks.register import mlflow_metric_name

    metrics = {mlflow_metric_name(f"{v.row}/{v.column}"): v.mean for v in values if math.isfinite(v.mean)}
    client.log_batch(run_id, metrics=[Metric(k, x, 0, 0) for k, x in metrics.items()])
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="table")
    create_markdown_artifact(text, key=f"table-{name}", description=f"gendag table {name}")
