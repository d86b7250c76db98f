"""(i) Few-step generation side by side: every stage of finished multi-stage runs in one table and plot.

Reads the `summary.json` of each `--run` (rectified-flow, progressive-distillation,
consistency-distillation / -training runs on the same data, each stage's metrics as its
graph measured them) and writes `<out>.md` (one row per stage: its wall time, straightness where
measured, and the primary metric at every sampler setting, NFE in increasing order) and
`<out>.png` (quality against NFE, one curve per stage and sampler, with the real-data floor):
`tasks.report.stages_report` over the stages of all the runs. Rows are `<graph>: <stage>`.

    .venv/bin/python benchmarks/few_step_table.py --run runs/rf-moons --run runs/pd-moons ... --out docs/benchmarks/few-step-moons
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import _common as C  # noqa: I001

from tasks.report import stages_report


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, action="append", required=True, help="a finished run folder (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="path without suffix for the .md and .png")
    args = p.parse_args()
    metrics, seconds, kinds = {}, {}, set()
    for run in args.run:
        summary = json.loads((run / "summary.json").read_text())
        kinds.add("images" if any(k.startswith("fid") for k in summary["metrics"]) else "points")
        for stage in summary["stages"]:
            label = f"{summary['graph']}: {stage['stage']}"
            metrics[label], seconds[label] = stage["metrics"], stage.get("seconds", {})
    assert len(kinds) == 1, "the runs score different kinds of data"
    with tempfile.TemporaryDirectory() as d:
        table, plot = stages_report(metrics, kinds.pop(), Path(d), seconds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(table, args.out.with_suffix(".md"))
        shutil.copy(plot, args.out.with_suffix(".png"))
    print(args.out.with_suffix(".md").read_text())
    C.finish(args, "i_few_step_table", "one table and one plot of every stage", {"stages": len(metrics)},
             {"runs": [str(r) for r in args.run]})


if __name__ == "__main__":
    main()
