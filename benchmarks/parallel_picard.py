"""(g) Picard-parallel sampling (ParaDiGMS) vs the sequential sampler it converges to.

On a trained model (a finished run's folder, e.g. `gendag run ddpm -c ddpm/digits` or a score-sde
run), for the sequential `euler` (probability-flow ODE) and `ddim` (eta = 0) at N steps and their
Picard twins at several windows, all from the same draws, side by side in one process:

- sequential rounds (network calls one after another) against N: the target is rounds <= N / 4
  at matching output;
- NFE (all evaluations; a window call evaluates p points of every sample);
- the largest difference to the sequential samples, in units of the data's range (tol bounds each
  point's last change, RMS per dimension);
- wall time against the sequential sampler. On this CPU a window call of p points costs about p
  forwards, so the parallel sampler is slower here; with p points evaluated in parallel (a GPU,
  or p devices) a round costs about one forward, and the ideal wall ratio is rounds / N.

    .venv/bin/python benchmarks/parallel_picard.py --run <run folder> [--steps 100] [--windows 4,8,16,32,100]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo on sys.path)
import torch

from models.checkpoint import load_model
from models.samplers import sample_with, settings_for

TARGET = "sequential rounds <= N / 4 at matching output (max difference within a few tol)"


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="folder of a finished run (its summary.json names the model)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--windows", default="4,8,16,32,100")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--samples", type=int, default=125)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    summary_file = json.loads((args.run / "summary.json").read_text())
    model = load_model(Path(summary_file["model_uri"]))
    shape = tuple(json.loads((Path(summary_file["model_uri"]) / "model.json").read_text())["data_shape"])
    steps = 20 if args.quick else args.steps
    windows = [w for w in map(int, args.windows.split(",")) if w <= steps] or [steps]
    x = model.prior(shape, args.samples, torch.Generator().manual_seed(0))
    print(f"machine before: {C.uptime()}; model {summary_file['model_uri']}, {args.samples} samples, N = {steps}")
    rows, worst = [], {}
    for base in ("euler", "ddim"):
        (seq,) = settings_for(base, [steps], {})
        start = time.perf_counter()
        reference = sample_with(seq, model, x.clone())
        seq_s = time.perf_counter() - start
        rows.append([base, "-", reference.rounds, reference.nfe, 0.0, seq_s, 1.0])
        for window in windows:
            (par,) = settings_for(f"picard_{base}", [steps], {"window": window, "tol": args.tol})
            start = time.perf_counter()
            out = sample_with(par, model, x.clone())
            wall = time.perf_counter() - start
            diff = float((out.x - reference.x).abs().max())
            rows.append([f"picard_{base}", window, out.rounds, out.nfe, diff, wall, wall / seq_s])
            worst[f"picard_{base},window={window}"] = {"rounds": out.rounds, "rounds / N": out.rounds / steps,
                                                       "nfe": out.nfe, "max |diff|": diff, "wall ratio": wall / seq_s}
    C.print_table(f"Picard vs sequential, N = {steps}, tol = {args.tol}",
                  ["sampler", "window", "rounds", "NFE", "max |x - sequential|", "wall s", "wall / sequential"], rows)
    full = {k: v for k, v in worst.items() if k.endswith(f"window={max(windows)}")}
    summary = {f"{k} rounds / N": round(v["rounds / N"], 3) for k, v in full.items()}
    summary |= {f"{k} max diff": round(v["max |diff|"], 5) for k, v in full.items()}
    summary["pass"] = all(v["rounds / N"] <= 0.25 for v in full.values())
    C.finish(args, "g_parallel_picard", TARGET, summary, {"settings": worst})


if __name__ == "__main__":
    main()
