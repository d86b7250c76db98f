"""(f) The DDIM paper's Table 1 on the digits: FID by steps S and eta, one trained model.

Rows: eta = 0.0, 0.2, 0.5, 1.0 (DDIM, Song et al. 2021, Eq. 16) and sigma-hat (the
`ancestral` sampler with the large variance 1 - abar_t / abar_prev); columns S = 10, 20, 50,
100, 1000 (trailing spacing, the default). The table is made by the product itself:

    gendag sample <run folder> --sampler '{method: ddim, nfe: [...], eta: [...]}' \
        --sampler '{method: ancestral, nfe: [...], variance: large}' --set sample.sets=K

so the model is the registered version of a finished `gendag run ddpm -c ddpm/digits` (or ddim)
run, scored with that run's FID protocol (held-out reference, classifier features, the floor
on as many real training images) on K sets of 500 (every cell uses the same K noise draws).
Prints the table (mean FID and its standard error over the sets, and the floor), writes
`ddim_table.md` and `ddim_table.png` (FID against S per row) next to the summary, and checks
the paper's shape: for eta = 0 FID does not get worse as S grows (no collapse at S = 1000).

    cd <workspace of the run> && .venv/bin/python benchmarks/ddim_table.py --run runs/ddpm/digits [--sets 4]
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo on sys.path)

STEPS = (10, 20, 50, 100, 1000)
ETAS = (0.0, 0.2, 0.5, 1.0)
TARGET = "eta = 0: FID does not get worse as S grows (within 2 standard errors)"


def label(method: str, s: int, **params) -> str:
    from models.samplers import settings_for

    return settings_for(method, [s], params)[0].label


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="folder of a finished ddpm/ddim digits run")
    p.add_argument("--sets", type=int, default=4, help="sample sets of the run's size per cell")
    p.add_argument("--out", type=Path, default=None, help="output folder (default <run>-ddim-table)")
    args = p.parse_args()
    steps = (10, 20) if args.quick else STEPS
    out = args.out or args.run.with_name(args.run.name + "-ddim-table")
    grid = [f"{{method: ddim, nfe: {list(steps)}, eta: {list(ETAS)}}}",
            f"{{method: ancestral, nfe: {list(steps)}, variance: large}}"]
    cmd = [sys.executable, "-m", "flows.cli", "sample", str(args.run), "--out", str(out),
           "--set", f"sample.sets={args.sets}"] + [a for g in grid for a in ("--sampler", g)]
    print(f"machine before: {C.uptime()}\n$ {' '.join(cmd)}")
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - start
    metrics = json.loads((out / "summary.json").read_text())["metrics"]

    rows = [(f"eta = {eta:g}", {s: label("ddim", s, eta=eta) for s in steps}) for eta in ETAS]
    rows.append(("sigma-hat", {s: label("ancestral", s, variance="large") for s in steps}))
    se = lambda lab: metrics.get(f"fid_sd@{lab}", 0.0) / math.sqrt(args.sets)  # noqa: E731
    table = ["| | " + " | ".join(f"S = {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for name, labels in rows:
        table.append(f"| {name} | " + " | ".join(f"{metrics[f'fid@{lab}']:.3f} ± {se(lab):.3f}" for lab in labels.values()) + " |")
    floor = metrics["fid_floor"]
    table.append(f"\nfid_floor {floor:.3f} (sd over sets {metrics.get('fid_sd_floor', 0):.3f}); {args.sets} sets of "
                 f"{json.loads((out / 'config.json').read_text())['sample']['n_samples']} per cell; {seconds / 60:.1f} min")
    text = "\n".join(table)
    print(text)
    (out / "ddim_table.md").write_text(text + "\n")
    plot(rows, metrics, se, floor, out / "ddim_table.png")

    eta0 = [(s, metrics[f"fid@{lab}"], se(lab)) for s, lab in rows[0][1].items()]
    worse = [(a, b) for a, b in zip(eta0, eta0[1:]) if b[1] - a[1] > 2 * math.hypot(a[2], b[2])]
    summary = {name: {s: round(metrics[f"fid@{lab}"], 4) for s, lab in labels.items()} for name, labels in rows}
    summary |= {"fid_floor": round(floor, 4), "pass": not worse, "minutes": round(seconds / 60, 1)}
    C.finish(args, "f_ddim_table", TARGET, summary, {"metrics": metrics})


def plot(rows, metrics, se, floor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, labels in rows:
        s = list(labels)
        ax.errorbar(s, [metrics[f"fid@{lab}"] for lab in labels.values()], yerr=[se(lab) for lab in labels.values()],
                    fmt="o-", capsize=3, ms=4, label=name)
    ax.axhline(floor, ls="--", color="gray", label="real data (floor)")
    ax.set(xscale="log", yscale="log", xlabel="steps S (= NFE)", ylabel="FID", title="DDIM Table 1 on the digits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
