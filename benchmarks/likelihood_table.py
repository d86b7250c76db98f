"""(k) One likelihood table: the test NLL of every family on the same test points, from finished runs.

    .venv/bin/python benchmarks/likelihood_table.py --run runs/realnvp-8g --run runs/cnf-8g ... [--json PATH]

Each `--run` is a run folder (its `summary.json`); the table has one row per run: graph, dataset,
the likelihood estimator and its value (nats per point for vectors, bits/dim for images, with
its standard error), the true NLL of the same points where the data have one (`nll_floor`),
the training wall time, and the sampling NFE of the run's cheapest trained sampler with its
score. Every estimator is computed the same way for its family (`exact` change of variables
for normalizing flows, `ode` through the ODE for CNFs, flow matching and score SDEs (the
probability-flow ODE), `ddpm_bound` the DDPM variational bound), on the first
`evaluate.likelihood_examples` points of the same test split when the runs' data match
(`data_hash` is shown so that a reader can check). Rows are sorted by dataset, then NLL.
"""

from __future__ import annotations

import json
from pathlib import Path

import _common as C

TARGET = "a measurement: every family's test NLL on the same points"


def row(folder: Path) -> list:
    summary = json.loads((folder / "summary.json").read_text())
    m = summary["metrics"]
    unit = "bpd" if any(k.startswith("bpd@") for k in m) else "nll"
    name, value = next((k.split("@", 1)[1], v) for k, v in m.items() if k.startswith(f"{unit}@"))
    se = m.get(f"{unit}_se@{name}", float("nan"))
    nfe = {k.split("@", 1)[1]: v for k, v in m.items() if k.startswith("nfe@") and not k.endswith("untrained")}
    cheapest = min(nfe, key=nfe.get) if nfe else None
    primary = "fid" if unit == "bpd" else "w2"
    score = m.get(f"{primary}@{cheapest}") if cheapest else None
    spent = [summary.get("seconds", {})] + [s.get("seconds", {}) for s in summary.get("stages", [])]
    train_s = sum(s.get("train", 0.0) for s in spent) or None
    config = json.loads((folder / "config.json").read_text())
    return [summary["dataset"], summary["graph"], name, value, se, m.get("nll_floor", "-"), unit,
            train_s if train_s is not None else "-", cheapest or "-", nfe.get(cheapest, "-"),
            score if score is not None else "-", config["train"]["steps"], summary["data_hash"][:8]]


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, action="append", required=True, help="a finished run folder (repeat)")
    args = p.parse_args()
    rows = sorted((row(folder) for folder in args.run), key=lambda r: (r[0], r[6], r[3]))
    header = ["data", "graph", "estimator", "NLL", "se", "true NLL", "unit", "train s", "cheapest sampler",
              "NFE", "W2 / FID there", "train steps", "data"]
    C.print_table("test NLL of every family (nats/point, bits/dim for images)", header, rows)
    C.finish(args, "likelihood table", TARGET, {"rows": len(rows)}, {"rows": [dict(zip(header, r)) for r in rows]})


if __name__ == "__main__":
    main()
