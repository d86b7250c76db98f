"""Where an empty Ray Train fit's time goes: a `TorchTrainer` whose loop only writes the time it
starts, on this process's local Ray (started once, before), `--fits` times. Prints each fit's
wall time, the part before the loop (controller, worker actors, train context) and the part
after it (the workers' shutdown and Ray Train's per-fit placement-group cleaner stopping).

    .venv/bin/python benchmarks/ray_train_fit.py [--workers 1] [--fits 3]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common as C


def _loop(config: dict) -> None:
    Path(config["mark"]).write_text(repr(time.time()))


def main() -> None:
    parser = C.parser(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--fits", type=int, default=3)
    args = parser.parse_args()
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tasks.runtime import ensure_ray

    ensure_ray()
    with tempfile.TemporaryDirectory() as folder:
        mark = Path(folder) / "started"
        for i in range(args.fits):
            began = time.time()
            TorchTrainer(_loop, train_loop_config={"mark": str(mark)},
                         scaling_config=ScalingConfig(num_workers=args.workers),
                         run_config=RunConfig(name=f"empty-{i}", storage_path=folder)).fit()
            ended, started = time.time(), float(mark.read_text())
            print(f"fit {i + 1}: {ended - began:.2f} s = {started - began:.2f} s before the loop "
                  f"+ {ended - started:.2f} s after it ({args.workers} worker(s); {C.uptime()})")


if __name__ == "__main__":
    main()
