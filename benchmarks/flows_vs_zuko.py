"""(j) gendag's MAF and RealNVP against zuko's, on the same data, budget and seed.

    .venv/bin/pip install zuko==1.6.0   # the benchmark environment only: not a gendag dependency
    .venv/bin/python benchmarks/flows_vs_zuko.py [--quick] [--steps N] [--json PATH]

For each dataset (moons, eight_gaussians, breast_cancer) and each kind (MAF, RealNVP), one gendag
flow (`models.normalizing_flows.build_flow`) and one zuko flow of the same shape (as many
transforms, the same hidden widths) are trained in this process, one thread each, by the same
loop: Adam at lr 1e-3, the same batches (indices drawn from one seeded generator), the same
number of steps, minimizing the mean NLL. Each is then scored by its exact test NLL (nats per
point) on the whole test split; eight_gaussians also gives the mixture's own NLL of the same
points (the true-density limit). Wall time is the training loop's; the two libraries alternate
dataset by dataset so the machine's drift hits both.

Targets: NLL no worse (gendag - zuko <= its standard error), training time no slower (ratio
gendag / zuko <= 1).
"""

from __future__ import annotations

import math
import time

import _common as C
import numpy as np
import torch

from models.data import DatasetSpec, load_dataset
from models.normalizing_flows import build_flow
from models.toys import true_log_density

TARGET = "NLL no worse than zuko's (within a standard error), training time ratio <= 1"
DATASETS = {"moons": 512, "eight_gaussians": 512, "breast_cancer": 128}  # name -> batch size
KINDS = ("maf", "realnvp")
LAYERS, HIDDEN = 8, 128


def zuko_flow(kind: str, features: int):
    import zuko

    make = {"maf": zuko.flows.MAF, "realnvp": zuko.flows.RealNVP}[kind]
    return make(features, transforms=LAYERS, hidden_features=(HIDDEN, HIDDEN))


def gendag_flow(kind: str, features: int):
    return build_flow(kind, (features,), layers=LAYERS, hidden=HIDDEN, depth=2)


def log_prob_fn(library: str, flow):
    return flow.log_prob if library == "gendag" else (lambda x: flow().log_prob(x))


def train(library: str, kind: str, train_x: torch.Tensor, batch: int, steps: int, seed: int = 0):
    """The flow after `steps` Adam steps on seeded batches, and the loop's wall time."""
    torch.manual_seed(seed)
    flow = (gendag_flow if library == "gendag" else zuko_flow)(kind, train_x.shape[1])
    log_prob = log_prob_fn(library, flow)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    rows = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for _ in range(steps):
        x = train_x[torch.randint(len(train_x), (batch,), generator=rows)]
        loss = -log_prob(x).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return flow, time.perf_counter() - start


@torch.no_grad()
def test_nll(library: str, flow, test_x: torch.Tensor) -> tuple[float, float]:
    nll = torch.cat([-log_prob_fn(library, flow)(chunk) for chunk in test_x.split(2000)]).double()
    return float(nll.mean()), float(nll.std() / math.sqrt(len(nll)))


def main() -> None:
    p = C.parser(__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="training steps per flow (default 3000; --quick 200)")
    args = p.parse_args()
    steps = args.steps or (200 if args.quick else 3000)
    torch.set_num_threads(1)
    print(f"(j) {steps} steps per flow, {LAYERS} transforms of hidden width {HIDDEN} x 2; {C.uptime()}")
    rows, details = [], {}
    for d, (name, batch) in enumerate(DATASETS.items()):
        splits = load_dataset(DatasetSpec(name))
        train_x, test_x = (torch.from_numpy(a) for a in (splits.train, splits.test))
        true = true_log_density(name, splits.test)
        for kind in KINDS:
            result = {}
            order = ("gendag", "zuko") if d % 2 == 0 else ("zuko", "gendag")
            for library in order:
                flow, seconds = train(library, kind, train_x, batch, steps)
                nll, se = test_nll(library, flow, test_x)
                result[library] = {"nll": nll, "se": se, "seconds": seconds}
            g, z = result["gendag"], result["zuko"]
            true_nll = None if true is None else float(-true.mean())
            rows.append([name, kind, g["nll"], z["nll"], g["nll"] - z["nll"], g["se"],
                         "-" if true_nll is None else true_nll, g["seconds"], z["seconds"], g["seconds"] / z["seconds"]])
            details[f"{name}/{kind}"] = {**result, "true_nll": true_nll}
    C.print_table("test NLL (nats/point) and training time, gendag vs zuko",
                  ["data", "flow", "gendag NLL", "zuko NLL", "gendag - zuko", "se", "true NLL",
                   "gendag s", "zuko s", "time ratio"], rows)
    worst_gap = max(r[4] - r[5] for r in rows)
    worst_time = max(r[9] for r in rows)
    C.finish(args, "flows vs zuko", TARGET,
             {"worst NLL gap beyond its se": worst_gap, "worst time ratio": worst_time,
              "NLL no worse": worst_gap <= 0, "time no slower": worst_time <= 1}, details)


if __name__ == "__main__":
    main()
