"""Where a graph run's wall time went: its Prefect task runs, read from the workspace's Prefect
database (the embedded server's SQLite file; nothing is started).

    .venv/bin/python benchmarks/task_times.py runs/main/moons runs/main/digits

For each run folder (its `summary.json` names the Prefect flow run), every task run inside the
flow run's time window in start order, then the seconds per task name, then what no task covers
(Prefect / Ray start-up, the flow's own code between tasks).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections import defaultdict
from datetime import datetime
from pathlib import Path

from _common import ROOT, parser


def _when(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text.replace("Z", "+00:00"))


def flow_window(db: sqlite3.Connection, flow_run_id: str) -> tuple[datetime, datetime, str]:
    row = db.execute("SELECT start_time, end_time, name FROM flow_run WHERE id = ?", (flow_run_id,)).fetchone()
    if row is None or row[0] is None:
        raise SystemExit(f"flow run {flow_run_id} is not in this Prefect database (or never started)")
    return _when(row[0]), _when(row[1]), row[2]


def task_runs(db: sqlite3.Connection, start: datetime, end: datetime) -> list[tuple[str, datetime, datetime]]:
    rows = db.execute("SELECT name, start_time, end_time FROM task_run WHERE start_time IS NOT NULL "
                      "ORDER BY start_time").fetchall()
    runs = [(name, _when(a), _when(b) or end) for name, a, b in rows]
    return [r for r in runs if start <= r[1] <= end]


def covered(runs: list[tuple[str, datetime, datetime]]) -> float:
    """Seconds inside at least one task run (tasks may overlap)."""
    total, reach = 0.0, None
    for _, a, b in sorted(runs, key=lambda r: r[1]):
        if reach is None or a > reach:
            total += (b - a).total_seconds()
            reach = b
        elif b > reach:
            total += (b - reach).total_seconds()
            reach = b
    return total


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each holds summary.json)")
    p.add_argument("--home", type=Path, default=None, help="the workspace (default: GENDAG_HOME or the repo)")
    args = p.parse_args()
    home = args.home or Path(os.environ.get("GENDAG_HOME", ROOT))
    db = sqlite3.connect(home / ".gendag" / "prefect" / "prefect.db")
    for folder in args.runs:
        summary = json.loads((folder / "summary.json").read_text())
        start, end, name = flow_window(db, summary["prefect_flow_run_id"])
        runs = task_runs(db, start, end)
        wall = (end - start).total_seconds()
        print(f"\n{folder}: flow run {name}, {wall:.1f} s ({start:%H:%M:%S} - {end:%H:%M:%S})")
        print("| start s | task run | seconds |\n|---|---|---|")
        for task, a, b in runs:
            print(f"| {(a - start).total_seconds():.1f} | {task} | {(b - a).total_seconds():.1f} |")
        per_task: dict[str, float] = defaultdict(float)
        for task, a, b in runs:
            per_task[task.rsplit("-", 1)[0]] += (b - a).total_seconds()
        print("\n| task | seconds | share |\n|---|---|---|")
        for task, seconds in sorted(per_task.items(), key=lambda kv: -kv[1]):
            print(f"| {task} | {seconds:.1f} | {seconds / wall:.0%} |")
        print(f"| (outside any task) | {wall - covered(runs):.1f} | {(wall - covered(runs)) / wall:.0%} |")


if __name__ == "__main__":
    main()
