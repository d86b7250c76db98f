"""(g) Picard-parallel sampling (ParaDiGMS) vs the sequential sampler it converges to.

On a trained model (a finished run's folder, e.g. `gendag run ddpm -c ddpm/digits` or a score-sde
run), for the sequential `euler` (probability-flow ODE) and `ddim` (eta = 0) at N steps and their
Picard twins at several windows, all from the same draws, side by side in one process:

- sequential rounds (network calls one after another) against N: the target is rounds <= N / 4
  at matching output;
- NFE (all evaluations; a window call evaluates p points of every sample);
- each sample's RMS difference (per dimension, data units) to the sequential sampler's sample from
  the same draw, median and largest, and the share of samples within 10 tol of it (tol bounds
  each point's last change, RMS per dimension relative to the path's scale, so a sample's error
  is a few tol unless its trajectory amplifies it: the DDIM ODE of a trained digits model turns
  some draws' 1e-3 perturbation into another digit);
- wall time against the sequential sampler. On this CPU a window call of p points costs about p
  forwards, so the parallel sampler is slower here; with p points evaluated in parallel (a GPU,
  or p devices) a round costs about one forward, and the ideal wall ratio is rounds / N.

    .venv/bin/python benchmarks/parallel_picard.py --run <run folder> [--steps 100] [--windows 4,8,16,32,100] [--tols 1e-3,1e-4]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import _common as C  # noqa: I001  (puts the repo on sys.path)
import torch

from models.checkpoint import load_model
from models.samplers import sample_with, settings_for

MATCH = 10  # a sample matches when its RMS difference to the sequential sampler's is within MATCH * tol
MATCHED = 0.9  # ... and the output matches when at least this share of samples does
TARGET = (f"sequential rounds <= N / 4 at matching output (at the widest window, >= {MATCHED:.0%} of the samples "
          f"within {MATCH} tol RMS of the sequential sampler's, at every tol)")


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, required=True, help="folder of a finished run (its summary.json names the model)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--windows", default="4,8,16,32,100")
    p.add_argument("--tols", default="1e-3,1e-4", help="Picard tolerances (the samplers' tol), comma-separated")
    p.add_argument("--samples", type=int, default=125)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    summary_file = json.loads((args.run / "summary.json").read_text())
    model = load_model(Path(summary_file["model_uri"]))
    shape = tuple(json.loads((Path(summary_file["model_uri"]) / "model.json").read_text())["data_shape"])
    steps = 20 if args.quick else args.steps
    windows = [w for w in map(int, args.windows.split(",")) if w <= steps] or [steps]
    tols = [float(t) for t in args.tols.split(",")]
    x = model.prior(shape, args.samples, torch.Generator().manual_seed(0))
    print(f"machine before: {C.uptime()}; model {summary_file['model_uri']}, {args.samples} samples, N = {steps}")
    rows, results = [], {}
    for base in ("euler", "ddim"):
        (seq,) = settings_for(base, [steps], {})
        start = time.perf_counter()
        reference = sample_with(seq, model, x.clone())
        seq_s = time.perf_counter() - start
        rows.append([base, "-", "-", reference.rounds, reference.nfe, 0.0, 0.0, "-", seq_s, 1.0])
        for tol in tols:
            for window in windows:
                (par,) = settings_for(f"picard_{base}", [steps], {"window": window, "tol": tol})
                start = time.perf_counter()
                out = sample_with(par, model, x.clone())
                wall = time.perf_counter() - start
                # each sample's RMS difference per dimension, in data units (the scale tol is relative to)
                diff = (out.x - reference.x).flatten(1).pow(2).mean(1).sqrt()
                matched = float((diff <= MATCH * tol).float().mean())
                rows.append([f"picard_{base}", tol, window, out.rounds, out.nfe, float(diff.median()),
                             float(diff.max()), f"{matched:.0%}", wall, wall / seq_s])
                results[f"picard_{base},window={window},tol={tol:g}"] = {
                    "rounds": out.rounds, "rounds / N": out.rounds / steps, "nfe": out.nfe,
                    "median rms diff": float(diff.median()), "max rms diff": float(diff.max()),
                    "matched": matched, "wall ratio": wall / seq_s}
    C.print_table(f"Picard vs sequential, N = {steps}; diff = each sample's RMS difference to the sequential "
                  f"sampler's; matched = samples within {MATCH:g} tol",
                  ["sampler", "tol", "window", "rounds", "NFE", "median diff", "max diff", "matched", "wall s",
                   "wall / sequential"], rows)
    full = {k: v for k, v in results.items() if f",window={max(windows)}," in k}
    summary = {f"{k} rounds / N": round(v["rounds / N"], 3) for k, v in full.items()}
    summary |= {f"{k} matched": round(v["matched"], 3) for k, v in full.items()}
    summary["pass"] = all(v["rounds / N"] <= 0.25 and v["matched"] >= MATCHED for v in full.values())
    C.finish(args, "g_parallel_picard", TARGET, summary, {"settings": results})


if __name__ == "__main__":
    main()
