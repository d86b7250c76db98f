"""`gendag table` (issue 14): a table is a config; every shipped table plans (and dry-runs) at the
cpu and paper scales; bad tables are one line; the cells' numbers, Markdown, LaTeX and CSV are
what the runs hold; and a tiny table runs through the real graphs, is recorded in MLflow and
Prefect, and reruns bit-identically from its cache (whole cells, or `--fresh` graphs reusing
their models and coupling sets)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from graph_runs import gendag_error, gendag_output

from tasks.config import ConfigError
from tasks.table_config import TableConfig, load_table, plan, table_names
from tasks.tables import TableError, Value, cell_values, latex, markdown, read_metric

SMOKE = Path(__file__).parent / "tables" / "smoke.yaml"
SHIPPED = table_names()


def test_the_issues_tables_are_shipped() -> None:
    assert {"ddim-steps", "flow-matching", "cfm-2d", "rectified-flow", "few-step", "normalizing-flows",
            "model-families"} <= set(SHIPPED)


@pytest.mark.parametrize("scale", ["cpu", "paper"])
@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_table_plans_at_both_scales(name: str, scale: str) -> None:
    """Every run's config loads at the scale with the table's overrides, and every cell that
    names a sampler setting names one its run samples."""
    table = load_table(name)
    cells = plan(table, scale)
    assert {c.run for c in cells} == set(table.runs)
    assert all(c.cfg.registry.experiment == f"gendag-table-{name}" and not c.cfg.registry.auto_champion for c in cells)
    assert len(cells) == len(table.runs) * table.seeds.get(scale, 1)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_table_dry_runs_at_the_paper_scale(name: str) -> None:
    out = gendag_output("table", name, "--dry-run", "--scale", "paper")
    assert f"table {name} at scale paper" in out and "estimated cost" in out and "assumed" in out


def test_a_cpu_dry_run_times_the_networks_here_and_trains_nothing(tmp_path: Path) -> None:
    out = gendag_output("table", "rectified-flow", "--dry-run", "--seeds", "2", "--out", str(tmp_path))
    assert "k1-seed0" in out and "k1-seed1" in out and "GFLOP/s, measured" in out and "1-RF 3000x512" in out
    assert not any(tmp_path.iterdir())


def test_a_dry_run_counts_the_coupling_plans_and_the_cells_side_by_side() -> None:
    """An OT-CFM cell costs one timed OT plan per training step more than its I-CFM twin, and the
    cfm-2d total is its runs' time over the cells that run at once."""
    from tasks.config_loading import load_config
    from tasks.table_cost import estimate
    from tasks.tables import side_by_side

    config = Path(__file__).resolve().parents[1] / "configs" / "flow-matching" / "cfm-2d" / "gaussian-to-moons.yaml"
    ot, independent = (estimate(load_config(config, scale="cpu", overrides=list(o)), "cpu")
                       for o in ((), ("coupling.kind=independent", "coupling.kwargs={}")))
    assert ot.plan_seconds > 0 and independent.plan_seconds == 0
    steps = ot.stages[0][1].steps
    assert ot.seconds - independent.seconds == pytest.approx(steps * ot.plan_seconds)
    out = gendag_output("table", "cfm-2d", "--dry-run", "--seeds", "1")
    lanes = side_by_side(plan(load_table("cfm-2d"), "cpu", 1))
    assert "ms a coupling plan" in out and (f"{lanes} cells side by side" in out if lanes > 1 else "one cell at a time" in out)


def test_list_names_every_table() -> None:
    out = gendag_output("table", "--list")
    assert all(name in out for name in ("ddim-steps", "cfm-2d", "normalizing-flows"))


def _table(tmp_path: Path, **changes) -> Path:
    """The smoke table with `changes`: `rows` replaces its rows (all on run fm), `runs` its runs'."""
    import yaml

    raw = yaml.safe_load(SMOKE.read_text())
    if "rows" in changes:
        raw["runs"].pop("rf")
    raw["runs"] |= changes.pop("runs", {})
    raw |= changes
    if "rows" not in changes:
        raw["rows"] = raw["rows"][:1]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("changes, expected", [
    ({"rows": [{"label": "x", "run": "nope", "metric": "w2@euler,nfe={key}"}]}, "run 'nope' is not one of runs"),
    ({"rows": [{"label": "x", "run": "fm", "metrics": {"2 steps": "w2@euler,nfe=2"}}]}, "'2 steps' is not a column"),
    ({"rows": [{"label": "x", "run": "fm"}]}, "expected either metric (a template) or metrics"),
    ({"rows": [{"label": "x", "run": "fm", "metric": "w2@euler,nfe=16"}]}, "does not sample 'euler,nfe=16'"),
    ({"runs": {"fm": {"graph": "flow-matching", "config": "no/such"}}}, "runs.fm.config: 'no/such': no such config"),
    ({"runs": {"fm": {"graph": "ddpm", "config": "flow-matching/gaussians-to-moons"}}}, "is a 'flow-matching' config"),
    ({"runs": {"fm": {"graph": "flow-matching", "config": "flow-matching/gaussians-to-moons",
                      "set": ["train.steps=-1"]}}}, "train.steps"),
    ({"runs": {"fm": {"graph": "no-graph", "config": "x"}}}, "runs.fm.graph: got 'no-graph'"),
])
def test_a_bad_table_is_one_line_naming_what_is_wrong(tmp_path: Path, changes: dict, expected: str) -> None:
    line = gendag_error("table", str(_table(tmp_path, **changes)), "--scale", "tiny", "--dry-run")
    assert expected in line


def test_unknown_table_and_scale_are_one_line() -> None:
    assert "no such table" in gendag_error("table", "no-such-table")
    assert "--scale 'gpu'" in gendag_error("table", "rectified-flow", "--scale", "gpu")


SUMMARY = {"metrics": {"w2@euler,nfe=1": 1.0, "w2@euler,nfe=4": 0.5},
           "stages": [{"stage": "2-RF", "metrics": {"w2@euler,nfe=1": 0.25, "w2@euler,nfe=4": 0.2}},
                      {"stage": "2-RF + distill", "metrics": {"w2@euler,nfe=1": 0.125}}]}


def test_a_cell_reads_its_runs_metric_or_its_stages() -> None:
    assert read_metric(SUMMARY, "w2@euler,nfe=4") == 0.5
    assert read_metric(SUMMARY, "2-RF/w2@euler,nfe=1") == 0.25
    assert read_metric(SUMMARY, "2-RF + distill/w2@euler,nfe=1") == 0.125
    assert read_metric(SUMMARY, "3-RF/w2@euler,nfe=1") is None


def test_a_cell_reads_a_recorded_wall_time() -> None:
    timed = {**SUMMARY, "seconds": {"train": 0.1, "model_train": 42.5}}
    assert read_metric(timed, "seconds:model_train") == 42.5  # the model's own fit, reused or not
    assert read_metric(timed, "seconds:train") == 0.1
    assert read_metric(SUMMARY, "seconds:model_train") is None


def test_cells_are_means_over_seeds_beside_the_papers_numbers() -> None:
    table = load_table(str(SMOKE))
    second = json.loads(json.dumps(SUMMARY))
    second["metrics"]["w2@euler,nfe=1"] = 3.0
    values = cell_values(table, {"fm": [SUMMARY, second], "rf": [SUMMARY]})
    fm = {v.column: v for v in values if v.row == "flow matching"}
    assert fm["1 step"].values == (1.0, 3.0) and fm["1 step"].mean == 2.0 and fm["1 step"].std == pytest.approx(2 ** 0.5)
    assert fm["1 step"].paper == 1.5
    assert [(v.row, v.column) for v in values][-1] == ("2-RF distilled", "1 step")  # only the cells it names
    manifest = {"seeds": 2, "scale": "tiny", "git_commit": "abc", "cache": {
        "cells_reused": 0, "cells_run": 2, "reused": {"models": 1, "couplings": 0}, "made": {"models": 2, "couplings": 1}}}
    text = markdown(table, values, manifest)
    assert "| flow matching | 2 ± 1.4 | 1.5 | 0.5 ± 0 | 0.3 |" in text
    assert "| 2-RF distilled | 0.125 | — | — | — |" in text
    assert r"2 $\pm$ 1.4 & 1.5" in latex(table, values)


def test_a_missing_metric_is_one_line_naming_the_cell() -> None:
    table = load_table(str(SMOKE))
    less = json.loads(json.dumps(SUMMARY))
    del less["stages"][0]["metrics"]["w2@euler,nfe=4"]
    with pytest.raises(TableError, match="row '2-RF', column '4 steps': run 'rf' has no metric '2-RF/w2@euler,nfe=4'"):
        cell_values(table, {"fm": [SUMMARY], "rf": [less]})


def test_table_config_refuses_duplicate_rows() -> None:
    with pytest.raises(ValueError, match="two rows have the same label"):
        TableConfig.model_validate({
            "name": "t", "title": "t", "source": {"paper": "p", "table": "1", "dataset": "d"},
            "columns": [{"name": "a"}], "runs": {"r": {"graph": "flow-matching", "config": "x"}},
            "rows": [{"label": "x", "run": "r", "metric": "m"}, {"label": "x", "run": "r", "metric": "m"}]})
    with pytest.raises(ConfigError, match="no such table"):
        load_table("nope")


@pytest.fixture(scope="module")
def smoke(workspace: Path) -> tuple[Path, str]:
    out = workspace / "tables"
    return out, gendag_output("table", str(SMOKE), "--scale", "tiny", "--out", str(out))


def test_a_table_runs_through_the_graphs_and_writes_every_format(smoke: tuple[Path, str], workspace: Path) -> None:
    out, printed = smoke
    folder = out / "smoke-tiny"
    assert {p.name for p in folder.iterdir()} == {"table.md", "table.csv", "table.tex", "table.png", "manifest.json"}
    assert (out / "index.md").read_text().count("smoke-tiny/table.md") == 1
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["seeds"] == 2 and len(manifest["cells"]) == 4  # fm and rf, two seeds each
    cell = manifest["cells"][0]
    assert {"config_hash", "data_hash", "mlflow_run_id", "model_hash", "samples", "feature_extractor", "seed"} <= set(cell)
    assert manifest["cache"]["made"]["models"] == 2 * (1 + 3)  # fm; rf's 1-RF, 2-RF, distilled, per seed
    assert manifest["cache"]["made"]["couplings"] == 2 * 2
    assert manifest["side_by_side"] == min(4, os.cpu_count() or 1)  # one thread a cell: as many as the cores
    rows = list(csv.DictReader((folder / "table.csv").open()))
    fm = next(r for r in rows if r["row"] == "flow matching" and r["column"] == "1 step")
    assert int(fm["seeds"]) == 2 and fm["paper"] == "1.5" and len(fm["values"].split()) == 2
    assert "flow matching" in printed and "trained 8" in printed


def test_the_table_is_an_mlflow_parent_of_its_cells_and_a_prefect_artifact(smoke: tuple[Path, str]) -> None:
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    out, _ = smoke
    manifest = json.loads((out / "smoke-tiny" / "manifest.json").read_text())
    client = MlflowClient()
    table = client.get_run(manifest["mlflow_run_id"])
    assert table.info.status == "FINISHED" and table.data.tags["gendag.table"] == "smoke"
    assert {a.path for a in client.list_artifacts(table.info.run_id, "table")} >= {"table/table.md", "table/manifest.json"}
    for cell in manifest["cells"]:
        assert client.get_run(cell["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == table.info.run_id
    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts()
    assert any(a.key == "table-smoke" for a in artifacts)


def test_a_rerun_is_bit_identical_from_the_cache(smoke: tuple[Path, str]) -> None:
    """A rerun reuses every finished cell; `--fresh` reruns the graphs, which reuse every trained
    model and coupling set and give the same numbers bit for bit."""
    out, _ = smoke
    first = (out / "smoke-tiny" / "table.csv").read_bytes()
    gendag_output("table", str(SMOKE), "--scale", "tiny", "--out", str(out))
    again = json.loads((out / "smoke-tiny" / "manifest.json").read_text())["cache"]
    assert again["cells_reused"] == 4 and again["cells_run"] == 0
    assert (out / "smoke-tiny" / "table.csv").read_bytes() == first
    gendag_output("table", str(SMOKE), "--scale", "tiny", "--out", str(out), "--fresh")
    fresh = json.loads((out / "smoke-tiny" / "manifest.json").read_text())["cache"]
    assert fresh["cells_run"] == 4 and fresh["made"] == {"models": 0, "couplings": 0}
    assert fresh["reused"] == {"models": 8, "couplings": 4}
    assert (out / "smoke-tiny" / "table.csv").read_bytes() == first


def test_a_table_that_cannot_be_made_writes_nothing(workspace: Path, tmp_path: Path) -> None:
    """A cell whose metric is missing after its run fails the table in one line; no table files."""
    path = _table(tmp_path, rows=[{"label": "x", "run": "fm", "metrics": {"1 step": "w2_nothing"}}])
    out = workspace / "tables-bad"
    line = gendag_error("table", str(path), "--scale", "tiny", "--seeds", "1", "--out", str(out))
    assert "has no metric 'w2_nothing'" in line
    assert not (out / "bad-tiny").exists()


def test_best_reads_the_lowest_trained_setting_and_its_nfe() -> None:
    summary = {"metrics": {"w2@euler,nfe=1": 1.0, "w2@euler,nfe=4": 0.5, "w2@euler,nfe=4,untrained": 0.1,
                           "w2@dopri5,atol=0.001,rtol=0.001": 0.4, "nfe@dopri5,atol=0.001,rtol=0.001": 38.0}}
    assert read_metric(summary, "best:w2") == 0.4 and read_metric(summary, "best_nfe:w2") == 38.0
    del summary["metrics"]["w2@dopri5,atol=0.001,rtol=0.001"]
    assert read_metric(summary, "best:w2") == 0.5 and read_metric(summary, "best_nfe:w2") == 4.0
    assert read_metric(summary, "best:fid") is None
    summary["metrics"] |= {"recall@euler,nfe=4": 0.9, "recall@euler,nfe=1": 0.2}
    assert read_metric(summary, "best_recall:w2") == 0.9  # the recall where W2 is best
    assert read_metric({"metrics": {}, "stages": [{"stage": "2-RF", "metrics": summary["metrics"]}]},
                       "2-RF/best_recall:w2") == 0.9
    assert read_metric(summary, "nfe@euler,nfe=4") == 4.0 and read_metric(summary, "nfe@dopri5,atol=1,rtol=1") is None


def test_a_row_may_read_each_column_from_its_own_run() -> None:
    base = {"name": "t", "title": "t", "source": {"paper": "p", "table": "1", "dataset": "d"},
            "columns": [{"name": "a"}, {"name": "b"}],
            "runs": {"r1": {"graph": "flow-matching", "config": "x"}, "r2": {"graph": "flow-matching", "config": "y"}}}
    table = TableConfig.model_validate(base | {"rows": [
        {"label": "m", "runs": {"a": "r1", "b": "r2"}, "metric": "w2@euler,nfe=1"}]})
    assert [(c.name, run) for _, c, run, _ in table.cells()] == [("a", "r1"), ("b", "r2")]
    with pytest.raises(ValueError, match="a cell has no run"):
        TableConfig.model_validate(base | {"rows": [{"label": "m", "runs": {"a": "r1"}, "metric": "w2@euler,nfe=1"}]})
    with pytest.raises(ValueError, match="run 'r3' is not one of runs"):
        TableConfig.model_validate(base | {"rows": [{"label": "m", "run": "r1", "runs": {"a": "r3"}, "metric": "w"}]})


def test_cells_run_side_by_side_only_when_each_says_its_threads() -> None:
    """A worker with no `train.threads` takes the whole machine: then cells run one at a time."""
    from tasks.tables import side_by_side

    cells = plan(load_table(str(SMOKE)), "tiny")
    assert side_by_side(cells) == min(len(cells), os.cpu_count() or 1)
    assert side_by_side(plan(load_table("ddim-steps"), "cpu") * 2) == 1


def test_a_claim_lets_one_thread_make_a_thing_the_other_finds() -> None:
    import threading
    import time

    from tasks.infra import claimed

    made, inside, crowd = [], [], []

    def make() -> None:
        with claimed("the-thing"):
            inside.append(1)
            crowd.append(len(inside))  # how many were inside the claim at once
            if not made:
                time.sleep(0.05)
                made.append("it")
            inside.pop()

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert made == ["it"] and max(crowd) == 1


def test_the_plot_gives_each_quantity_its_own_panel(tmp_path: Path) -> None:
    """cfm-2d: W2 and the path energy on two axes (four tasks each), never joined across tasks;
    model-families: every column a quantity of its own."""
    from tasks.tables import panels, plot

    def values(table: TableConfig) -> list[Value]:
        return [Value(row.label, column.name, key, run, (0.1 + i, 0.2 + i), None)
                for i, (row, column, run, key) in enumerate(table.cells())]

    cfm = load_table("cfm-2d")
    groups = panels(cfm, values(cfm))
    assert [len(columns) for columns in groups.values()] == [4, 4]
    assert all(c.name.endswith(" W2") for c in groups["W2 (Euler 100 vs held-out points)"])
    families = load_table("model-families")
    assert all(len(columns) == 1 for columns in panels(families, values(families)).values())
    assert plot(cfm, values(cfm), tmp_path / "cfm.png").stat().st_size > 10_000


@pytest.mark.slow
def test_ctrl_c_stops_the_cells_side_by_side_and_the_same_command_resumes_them(workspace: Path, tmp_path: Path) -> None:
    """SIGINT to a table whose two cells train side by side (in threads, where Ray Train's own
    SIGINT handler is not installed): every running fit stops at its next step with a checkpoint
    there, nothing is kept as finished, the command fails; the same command resumes each fit
    where it stopped and ends with the weights of the same fits run without a stop."""
    import signal

    import torch
    import yaml
    from graph_runs import start_gendag, wait_for
    from safetensors.torch import load_file

    def table(name: str) -> list[str]:
        raw = yaml.safe_load(SMOKE.read_text())
        fm = ["train.steps=3000", "train.checkpoint_every=1000", "train.num_workers=1", "train.threads=1", f"name={name}"]
        raw |= {"name": name, "runs": {"fm": {"graph": "flow-matching", "config": "flow-matching/gaussians-to-moons", "set": fm}},
                "rows": raw["rows"][:1]}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        return ["table", str(tmp_path / f"{name}.yaml"), "--scale", "tiny", "--out", str(tmp_path / "out")]

    args = table("fm-stopped")
    child = start_gendag(workspace, *args)
    ray_runs, models = workspace / ".gendag" / "ray", workspace / ".gendag" / "models"
    wait_for(lambda: list(ray_runs.glob("fm-stopped-*/checkpoint_manager_snapshot.json")), "a first checkpoint", child)
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=300) != 0
    assert not list(models.glob("fm-stopped-*")), "a fit ran to its end after the stop"
    stopped_at = {}
    for snapshot in ray_runs.glob("fm-stopped-*/checkpoint_manager_snapshot.json"):
        steps = [c["metrics"]["step"] for c in json.loads(snapshot.read_text())["checkpoint_results"]]
        stopped_at[snapshot.parent.name] = max(steps)
    assert stopped_at and all(0 < step < 3000 for step in stopped_at.values()), stopped_at

    gendag_output(*args)
    gendag_output(*table("fm-uninterrupted"))
    for name, step in stopped_at.items():
        state = json.loads((models / name / "state.json").read_text())
        assert state["resumed_from"] == [step] and state["step"] == 3000
        mine, theirs = (load_file(str(models / n / "model.safetensors")) for n in (name, name.replace("stopped", "uninterrupted")))
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
