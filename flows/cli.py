"""`gendag`: run a task graph from a config, re-sample a registered model, list what exists
(the team's commands, retrain, serve, schedules, runs and services, are in `flows.team_cli`).

A user error (a config, a data file, an output folder, a resource request the machine cannot
meet) is one line on stderr and exit code 2, found before any service starts and before
anything is written (`tasks.preflight`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from flows import table_cli, team_cli
from flows.cli_support import _run_flows, console, fail, model_family, open_store

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # as tasks.config has it (imported late: torch)
ROOT = CONFIGS.parent

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.add_typer(team_cli.app)  # retrain, serve, schedules, runs, services
app.add_typer(table_cli.app)  # table
def resolve_config(graph: str, config: str | None) -> Path:
    """A path, or a name under configs/ (with or without `.yaml`)."""
    from flows.graphs import GRAPHS
    from tasks.config_loading import find_config

    path = find_config(graph, config or GRAPHS[graph].default_config)
    if path:
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
    from flows.graphs import GRAPHS
    from tasks.config import ConfigError
    from tasks.config_loading import load_config
    from tasks.preflight import preflight

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
            fail(f"{path}: graph: got {cfg.graph!r}; this command runs {graph!r} (use `gendag run {cfg.graph}`)")
        runs.append((cfg, _run_folder(out, path, cfg, scale, several), path))
    folders = [folder for _, folder, _ in runs]
    clashes = sorted({str(folder) for folder in folders if folders.count(folder) > 1})
    if clashes:
        fail(f"--config: two configs would write to the same folder {clashes[0]}")
    for cfg, folder, path in runs:
        try:
            preflight(cfg, folder, str(path), set_)
        except ConfigError as e:
            fail(str(e))
    _run_flows(GRAPHS[graph].flow, [(cfg, folder.resolve()) for cfg, folder, _ in runs])


def _run_folder(out: Path | None, config: Path, cfg, scale: str, several: bool) -> Path:
    """--out itself for one config; for several, --out/<config file name> each."""
    if out is None:
        return Path("runs") / f"{cfg.name}-{scale}"
    return out / config.stem if several else out


@app.command()
def sample(
    model: str = typer.Argument(..., help="models:/<name>@<alias>, models:/<name>/<version>, or a run folder."),
    sampler: list[str] = typer.Option(
        [], "--sampler", help="A sampler entry as YAML, e.g. '{method: ddim, nfe: [10, 50], eta: [0, 1]}'; "
        "repeat for several. Replaces the grid the model was evaluated with."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a value of the logged config: key=value."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output folder (default runs/<model>-v<version>-sample)."),
) -> None:
    """Sample and score a registered model with another sampler grid, without retraining.

    The model's logged config gives the data and the evaluation protocol; the result is a new
    MLflow run tagged with the model version it evaluated (no new version, no alias moved)."""
    import yaml

    from tasks.config import ConfigError
    from tasks.config_loading import apply_overrides, validate
    from tasks.preflight import preflight

    overrides = list(set_)
    if sampler:
        entries = []
        for item in sampler:
            try:
                entries.append(yaml.safe_load(item))
            except yaml.YAMLError as e:
                fail(f"--sampler {item!r}: not valid YAML ({str(e).splitlines()[0]})")
        overrides.insert(0, f"sample.samplers={yaml.safe_dump(entries, default_flow_style=True).strip()}")
    open_store(model)
    from tasks.registry import RegistryError, fetch_model_version

    try:
        version, model_dir, tree = fetch_model_version(model)
    except RegistryError as e:
        fail(str(e))
    origin = f"{model} (its logged config)"
    folder = (out or Path("runs") / f"{version['name']}-v{version['version']}-sample").resolve()
    try:
        apply_overrides(tree, overrides)
        cfg = validate(tree, origin, overrides, family=model_family(model_dir))
        preflight(cfg, folder, origin, overrides, model_dir=model_dir)
    except ConfigError as e:
        fail(str(e))

    from tasks.infra import Ref, folder_digest

    ref = Ref("model", str(model_dir), folder_digest(model_dir), cfg.digest())

    def make_flow():
        from prefect import flow

        from flows.pipeline import resample

        return flow(name="sample", validate_parameters=False)(resample)

    _run_flows(make_flow, [(cfg, folder)], ref, version)


@app.command(name="list")
def list_() -> None:
    """Show graphs, samplers, objectives, likelihoods, datasets and the configs that ship."""
    from flows.graphs import GRAPHS
    from models.data import DATASETS
    from models.likelihoods import LIKELIHOODS
    from models.objectives import OBJECTIVES
    from models.samplers import SAMPLERS, get_sampler

    get_sampler("euler")  # registers every method
    graphs = Table(title="graphs (gendag run <graph> -c <config>)")
    for column in ("graph", "what it does", "configs"):
        graphs.add_column(column)
    for g in GRAPHS.values():
        shipped = sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in (CONFIGS / g.name).rglob("*.yaml"))
        graphs.add_row(g.name, g.description, ", ".join(shipped))
    console.print(graphs)
    samplers = Table(title="samplers (sample.samplers: [{method: ..., nfe: [...], <param>: ...}])")
    for column in ("sampler", "needs", "parameters", "what it does"):
        samplers.add_column(column)
    for s in SAMPLERS.values():
        params = ", ".join(f"{k}={v.default}" + (f" ({'|'.join(map(str, v.choices))})" if v.choices else "")
                           for k, v in s.params.items())
        samplers.add_row(s.name, ", ".join(sorted(s.needs)), ("nfe: chosen by the solver; " if s.adaptive else "nfe; ")
                         + params, s.description)
    console.print(samplers)
    other = Table(title="more")
    other.add_column("kind")
    other.add_column("names")
    other.add_row("objectives", ", ".join(OBJECTIVES))
    other.add_row("likelihoods (evaluate.likelihood)", ", ".join(f"{k} ({v.description})" for k, v in LIKELIHOODS.items()))
    other.add_row("datasets", ", ".join(DATASETS))
    console.print(other)


@app.command()
def dvc(check: bool = typer.Option(False, "--check", help="Only check that dvc.yaml matches the graph registry.")) -> None:
    """Write dvc.yaml from the graph registry: the main job plus one stage per graph."""
    from flows.dvc_stages import dvc_yaml

    text, path = dvc_yaml(), ROOT / "dvc.yaml"
    if check:
        if not path.exists() or path.read_text() != text:
            fail("dvc.yaml is out of date with the graph registry: run `gendag dvc`", code=1)
        console.print("dvc.yaml matches the graph registry")
        return
    path.write_text(text)
    console.print(f"wrote {path}")


def main() -> None:
    app(prog_name="gendag")


if __name__ == "__main__":
    sys.exit(main())
