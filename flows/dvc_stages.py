"""dvc.yaml, written from the graph registry (`gendag dvc`; `gendag dvc --check` in the tests).

Each graph gets a stage that runs its shipped configs at cpu scale in one process, so
`dvc repro <graph>` reruns a graph only when its code, configs or the pinned stack changed;
each table (`configs/tables/`) a stage `table-<name>` that remakes it at cpu scale when its
table file, its runs' configs, the code or the stack changed.
The main job's graph (`MAIN_JOB`) is the stage `main`, which runs `make run`. Prefect owns the task graph; DVC owns data
versions and decides what to rerun.
"""

from __future__ import annotations

from flows.graphs import GRAPHS

HEADER = """\
# Written by `gendag dvc` from the graph registry (flows/graphs.py); do not edit by hand.
# `dvc repro main` reruns the main job, `dvc repro <graph>` one graph's shipped configs at cpu
# scale, `dvc repro` all of them, each only when its code, configs or the pinned stack changed.
"""
CODE = ("models", "tasks", "flows", "constraints.txt")
MAIN_JOB = "rectified-flow"  # `make run` runs this graph's configs into runs/main


def _stage(name: str, cmd: str, configs: list[str], outs: list[str]) -> list[str]:
    lines = [f"  {name}:", f"    cmd: {cmd}", "    deps:"]
    lines += [f"      - {dep}" for dep in (*CODE, *configs)]
    lines += ["    outs:"] + [f"      - {out}:\n          cache: false" for out in outs]
    return lines


def dvc_yaml() -> str:
    lines = ["stages:"]
    for graph in GRAPHS.values():
        main = graph.name == MAIN_JOB
        stage, out = ("main", "runs/main") if main else (graph.name, f"runs/{graph.name}")
        args = " ".join(f"-c {c}" for c in graph.configs)
        cmd = "make run" if main else f".venv/bin/gendag run {graph.name} {args} --scale cpu --out {out}"
        lines += _stage(stage, cmd, [f"configs/{c}.yaml" for c in graph.configs],
                        [f"{out}/{c.split('/')[-1]}/summary.json" for c in graph.configs])
    from tasks.table_config import load_table, table_names

    for name in table_names():
        table = load_table(name)
        configs = sorted({f"configs/{run.config}.yaml" for run in table.runs.values()})
        lines += _stage(f"table-{name}", f".venv/bin/gendag table {name} --scale cpu",
                        [f"configs/tables/{name}.yaml", *configs],
                        [f"reports/tables/{name}/table.md", f"reports/tables/{name}/manifest.json"])
    return HEADER + "\n".join(lines) + "\n"
