"""(h) Reflow coupling generation with 2 Ray workers vs 1: the same coupling set, timed side by side.

What is generated: the coupling set of reflow round 1 (`tasks.couplings.generate_couplings`, the
task the rectified-flow graph runs) of the digits config's UNet (`configs/rectified-flow/digits.yaml`,
freshly initialised with seed 0, its zero output layer given small random weights so the field is
not zero), `--count` pairs with Euler at `--nfe` steps in shards of 250, in a temporary workspace
(its own DVC repo). Each timed run starts from no coupling set (the folder and its `.dvc` file are
removed), so it samples every shard, writes the set and `dvc add`s it. Runs alternate 1, 2, 2, 1
workers; the speed-up is the median over pairs. The sets must be identical for 1 and 2 workers
(same DVC hash and bytes): the script asserts it.

    .venv/bin/python benchmarks/coupling_generation.py [--quick] [--count N] [--nfe K] [--pairs P]
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import _common as C  # noqa: I001
import numpy as np

TARGET = "speed-up (1 worker wall / 2 workers wall) >= 1.8x on 2 cores, identical sets"


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=None, help="pairs in the set (default 4000)")
    p.add_argument("--nfe", type=int, default=32, help="Euler steps per pair")
    p.add_argument("--pairs", type=int, default=None, help="(1-worker, 2-worker) pairs of runs (default 2)")
    args = p.parse_args()
    count, pairs = args.count or (500 if args.quick else 4000), args.pairs or (1 if args.quick else 2)
    home = Path(tempfile.mkdtemp(prefix="gendag-couplings-"))
    os.environ["GENDAG_HOME"] = str(home)
    from tasks.infra import configure_environment

    configure_environment()
    from parallel_sampling import make_model
    from tasks.config_loading import load_config
    from tasks.couplings import generate_couplings
    from tasks.infra import Ref, folder_digest
    from tasks.runtime import ensure_ray

    print(f"machine before: {C.uptime()}")
    ensure_ray()
    config = C.ROOT / "configs" / "rectified-flow" / "digits.yaml"
    model_dir = make_model(home / "model", load_config(config).model_spec((1, 8, 8)))
    model = Ref("model", model_dir, folder_digest(Path(model_dir)))
    sets: dict[int, tuple[str, np.ndarray]] = {}
    walls: dict[int, list[float]] = {1: [], 2: []}
    order = [w for k in range(pairs) for w in ((1, 2) if k % 2 == 0 else (2, 1))]
    for workers in order:
        cfg = load_config(config, "cpu", [f"reflow.num_workers={workers}", f"reflow.pairs={count}",
                                          "reflow.shard_size=250", f"reflow.solver={{method: euler, nfe: [{args.nfe}]}}"])
        start = time.perf_counter()
        made = generate_couplings.fn(cfg, model, None, 1)
        walls[workers].append(time.perf_counter() - start)
        print(f"  {workers} worker(s): {walls[workers][-1]:.2f} s   {C.uptime()}")
        x1 = np.load(made.path / "x1.npy")
        if workers in sets:
            assert sets[workers][0] == made.hash
        sets[workers] = (made.hash, x1)
        shutil.rmtree(made.path)
        made.path.with_name(made.path.name + ".dvc").unlink()
    same = sets[1][0] == sets[2][0] and np.array_equal(sets[1][1], sets[2][1])
    speedup = C.median(walls[1]) / C.median(walls[2])
    C.print_table(f"coupling generation: {count} pairs, Euler NFE {args.nfe}, digits UNet", ["workers", "median wall s"],
                  [[1, C.median(walls[1])], [2, C.median(walls[2])]])
    shutil.rmtree(home, ignore_errors=True)
    assert same, "the coupling sets differ between 1 and 2 workers"
    C.finish(args, "h_coupling_generation", TARGET,
             {"speed-up": speedup, "identical sets": same, "1 worker s": C.median(walls[1]),
              "2 workers s": C.median(walls[2])}, {"walls": walls, "count": count, "nfe": args.nfe})


if __name__ == "__main__":
    main()
