"""(k) One likelihood table: the test NLL of every family on the same test points, from finished runs.

    .venv/bin/python benchmarks/likelihood_table.py --run runs/realnvp-8g --run runs/cnf-8g ... [--markdown PATH] [--json PATH]

Each `--run` is a run folder (its `summary.json` and `config.json`); the table has one row per
run and likelihood estimator (a DDPM's bound and its probability-flow ODE are two rows): graph,
dataset, the estimator and its value (nats per point for vectors, bits/dim for images, with its
standard error), the true NLL of the same points where the data have one (`nll_floor`) and the
paired gap to it (`nll_gap@<estimator>`: the mean of model NLL - true NLL point by point, with
its standard error), the training wall time and steps, and the run's best trained sampler by W2
(2-D) or FID (images) with its NFE and score. Every estimator is computed the same way for its
family (`exact` change of variables for normalizing flows, `ode` through the ODE for CNFs, flow
matching and score SDEs (the probability-flow ODE), `ddpm_bound` the DDPM variational bound), on
the first `evaluate.likelihood_examples` points of the same test split when the runs' data match
(`data_hash` is shown so that a reader can check). Rows are sorted by dataset, unit, then NLL.
"""

from __future__ import annotations

import json
from pathlib import Path

import _common as C

from models.samplers import parse_label

TARGET = "a measurement: every family's test NLL on the same points"


def _nfe(label: str, metrics: dict) -> float | None:
    """The NFE a sampling setting cost: measured (`nfe@<label>`) where the label does not say
    it, else the label's own `nfe=`."""
    return metrics.get(f"nfe@{label}", parse_label(label)[1].get("nfe"))


def rows(folder: Path) -> list[list]:
    """One row per likelihood estimator of the run in `folder`."""
    summary = json.loads((folder / "summary.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    m = summary["metrics"]
    unit = "bpd" if any(k.startswith("bpd@") for k in m) else "nll"
    primary = "fid" if unit == "bpd" else "w2"
    trained = {k.split("@", 1)[1]: v for k, v in m.items()
               if k.startswith(f"{primary}@") and "untrained" not in parse_label(k.split("@", 1)[1])[1]}
    best = min(trained, key=trained.get) if trained else None
    nfe = float(_nfe(best, m)) if best else "-"
    spent = [summary.get("seconds", {})] + [s.get("seconds", {}) for s in summary.get("stages", [])]
    train_s = sum(s.get("train", 0.0) for s in spent) or "-"
    out = []
    for key in sorted(k for k in m if k.startswith(f"{unit}@")):
        name = key.split("@", 1)[1]
        gap = m.get(f"nll_gap@{name}")
        out.append([summary["dataset"], summary["graph"], name, m[key], m.get(f"{unit}_se@{name}", float("nan")),
                    m.get("nll_floor", "-"), gap if gap is not None else "-", m.get(f"nll_gap_se@{name}", "-"),
                    unit, train_s, config["train"]["steps"], best or "-", nfe,
                    trained[best] if best else "-", summary["data_hash"][:8]])
    return out


HEADER = ["data", "graph", "estimator", "NLL", "se", "true NLL", "gap", "gap se", "unit", "train s",
          "train steps", "best sampler", "its NFE", "W2 / FID there", "data hash"]


def markdown(table: list[list]) -> str:
    """The table as Markdown (numbers to 4 significant digits)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(C._fmt(c) for c in r) + " |" for r in table]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, action="append", required=True, help="a finished run folder (repeat)")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as Markdown to this file")
    args = p.parse_args()
    table = sorted((r for folder in args.run for r in rows(folder)), key=lambda r: (r[0], r[8], r[3]))
    C.print_table("test NLL of every family (nats/point, bits/dim for images)", HEADER, table)
    if args.markdown:
        args.markdown.write_text(markdown(table))
    C.finish(args, "likelihood table", TARGET, {"rows": len(table)}, {"rows": [dict(zip(HEADER, r)) for r in table]})


if __name__ == "__main__":
    main()
