"""A paper's table as a config (`configs/tables/<name>.yaml`, read by `gendag table <name>`).

A table names the graph runs it needs (`runs:` a graph, one of its configs, `--set` overrides,
more overrides per scale), its columns, and its rows: each row reads one run's metrics (or
each column its own run: `runs:`), one per column, by a metric key (`fid@ddim,nfe=10,eta=0,spacing=trailing`; a stage of a multi-stage
graph by `<stage>/<key>`, e.g. `2-RF/w2@euler,nfe=1`) or by one template for every column
(`{key}` is replaced by the column's `key`). A row may carry the paper's published numbers
(`paper:` column -> value) and the table its source (paper, table, dataset). Every run is made
`seeds` times (seed = the config's seed + 0, 1, ...); a cell is the mean over seeds (± their
standard deviation). A new table is a new file: no code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, model_validator

from tasks.config import SCALES, ConfigError, RunConfig, schemas
from tasks.config_loading import CONFIGS, find_config, load_config
from tasks.config_sections import Strict

TABLES = CONFIGS / "tables"
Scale = Literal[SCALES]  # type: ignore[valid-type]


class PaperSource(Strict):
    """Where the published numbers beside gendag's come from."""

    paper: str
    table: str
    dataset: str  # the paper's dataset (gendag's cpu scale may use a smaller one: `scales:` says which)


class Column(Strict):
    name: str
    key: str = ""  # what `{key}` becomes in a row's metric template
    # the plot's panel: columns of one quantity share an axis (default: the metric its cells read)
    panel: str = ""


class TableRun(Strict):
    """One graph run the table reads: `gendag run <graph> -c <config> --set ...`."""

    graph: str
    config: str  # a name under configs/ (as `gendag run -c` takes it)
    set: list[str] = []
    scales: dict[Scale, list[str]] = {}  # more overrides at one scale (e.g. the paper's dataset)

    def overrides(self, scale: str) -> list[str]:
        return [*self.set, *self.scales.get(scale, [])]


class Row(Strict):
    label: str
    run: str | None = None  # a key of `runs`: where the row's cells are read
    runs: dict[str, str] = {}  # column name -> the run that column's cell reads (instead of `run`)
    metric: str | None = None  # a template for every column: `{key}` is the column's key
    metrics: dict[str, str] = {}  # column name -> metric key (columns without one are empty)
    paper: dict[str, float | None] = {}  # column name -> the published number

    @model_validator(mode="after")
    def _one_way(self):
        if (self.metric is None) == (not self.metrics):
            raise ValueError(f"rows: {self.label!r}: expected either metric (a template) or metrics (per column)")
        return self


class TableConfig(Strict):
    name: str
    title: str
    description: str = ""
    source: PaperSource
    lower_is_better: bool = True
    columns: list[Column] = Field(min_length=1)
    runs: dict[str, TableRun] = Field(min_length=1)
    rows: list[Row] = Field(min_length=1)
    seeds: dict[Scale, int] = {"cpu": 1, "paper": 5}
    notes: dict[Scale, str] = {}  # what a scale trades (e.g. the digits for CIFAR-10)
    _origin: Path | None = PrivateAttr(default=None)  # the file it was read from

    def digest(self) -> str:
        """Content hash of the table's file (the manifest's `table_config_hash`)."""
        import hashlib

        return hashlib.sha256(self._origin.read_bytes()).hexdigest()[:16] if self._origin else ""

    @model_validator(mode="after")
    def _references(self):
        names = [c.name for c in self.columns]
        if len(set(names)) < len(names):
            raise ValueError("columns: two columns have the same name")
        labels = [r.label for r in self.rows]
        if len(set(labels)) < len(labels):
            raise ValueError("rows: two rows have the same label")
        for row in self.rows:
            for run in {row.run, *row.runs.values()} - {None}:
                if run not in self.runs:
                    raise ValueError(f"rows: {row.label!r}: run {run!r} is not one of runs ({', '.join(self.runs)})")
            if row.run is None and set(row.metrics or names) - set(row.runs):
                raise ValueError(f"rows: {row.label!r}: a cell has no run (set run, or runs for every column it reads)")
            for what, keys in (("metrics", row.metrics), ("paper", row.paper), ("runs", row.runs)):
                unknown = sorted(set(keys) - set(names))
                if unknown:
                    raise ValueError(f"rows: {row.label!r}: {what}: {unknown[0]!r} is not a column ({', '.join(names)})")
        for key, value in self.seeds.items():
            if value < 1:
                raise ValueError(f"seeds.{key}: got {value}; expected at least 1")
        return self

    def metric(self, row: Row, column: Column) -> str | None:
        """The metric key a cell reads (None: the row has no value in that column)."""
        if row.metric is not None:
            return row.metric.replace("{key}", column.key)
        return row.metrics.get(column.name)

    def cells(self) -> list[tuple[Row, Column, str, str]]:
        """Every (row, column, run, metric key) the table reads, in reading order."""
        return [(row, col, row.runs.get(col.name, row.run), key) for row in self.rows for col in self.columns
                if (key := self.metric(row, col)) is not None]


def table_names() -> list[str]:
    return sorted(p.stem for p in TABLES.glob("*.yaml"))


def table_path(name: str) -> Path:
    """`name` under configs/tables/ (or a path to a table file)."""
    for path in (Path(name), TABLES / f"{name}.yaml"):
        if path.is_file():
            return path
    raise ConfigError(f"table {name!r}: no such table; expected one of {', '.join(table_names())} "
                      f"(configs/tables/) or a table file")


def load_table(name: str) -> TableConfig:
    path = table_path(name)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of table keys at the top level")
    try:
        table = TableConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: {where + ': ' if where else ''}{err['msg']}") from None
    if table.name != path.stem and path.parent == TABLES:
        raise ConfigError(f"{path}: name: got {table.name!r}; expected the file's name {path.stem!r}")
    table._origin = path
    return table


@dataclass(frozen=True)
class Cell:
    """One graph run of the table at one seed: what `gendag run` would be given."""

    run: str  # the table's name for it
    seed: int
    graph: str
    config: Path
    overrides: tuple[str, ...]
    cfg: RunConfig

    @property
    def folder_name(self) -> str:
        return f"{self.run}-seed{self.seed}"


def plan(table: TableConfig, scale: str, seeds: int | None = None) -> list[Cell]:
    """Every graph run the table needs at `scale` (seeds: the table's own count by default),
    validated: a config that does not load, or a cell whose sampler is not in its run's grid,
    is one line naming the table, the run and the key."""
    count = seeds or table.seeds.get(scale, 1)
    cells = []
    for name, run in table.runs.items():
        where = f"table {table.name}: runs.{name}"
        if run.graph not in schemas():
            raise ConfigError(f"{where}.graph: got {run.graph!r}; expected one of {', '.join(sorted(schemas()))}")
        path = find_config(run.graph, run.config)
        if path is None:
            raise ConfigError(f"{where}.config: {run.config!r}: no such config under configs/")
        isolated = ["registry.auto_champion=false", f"registry.experiment=gendag-table-{table.name}"]
        base = _load(path, scale, run.overrides(scale), where)
        if base.graph != run.graph:
            raise ConfigError(f"{where}: {path} is a {base.graph!r} config, not {run.graph!r}")
        for i in range(count):
            overrides = (*run.overrides(scale), *isolated, f"seed={base.seed + i}")
            cells.append(Cell(name, base.seed + i, run.graph, path, overrides, _load(path, scale, list(overrides), where)))
    _check_metrics(table, {c.run: c.cfg for c in cells})
    return cells


def _load(path: Path, scale: str, overrides: list[str], where: str) -> RunConfig:
    try:
        return load_config(path, scale=scale, overrides=overrides)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _check_metrics(table: TableConfig, configs: dict[str, RunConfig]) -> None:
    """A cell that names a sampler setting must name one its run samples (else it would be
    found missing only after the run)."""
    from models.samplers import SAMPLERS, parse_label, settings_for

    for row, column, run, key in table.cells():
        label = key.split("/", 1)[-1].split("@", 1)[1] if "@" in key else ""
        if parse_label(label)[0] not in SAMPLERS:
            continue  # an estimator (nll@exact) or a summary number, not a sampler setting
        cfg = configs[run]
        labels = {s.label for entries, _ in cfg.sampler_lists().values()
                  for entry in (entries if isinstance(entries, list) else [entries])
                  for s in settings_for(entry.method, entry.nfe, entry.params)}
        if re.sub(r",untrained$", "", label) not in labels:
            raise ConfigError(f"table {table.name}: rows: {row.label!r}, column {column.name!r}: the run "
                              f"{run!r} does not sample {label!r}; its grid: {', '.join(sorted(labels))}")
