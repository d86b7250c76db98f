"""The digits UNet's memory layout: channels-last (what `models.networks.UNet` keeps) against
the usual contiguous NCHW, side by side in one process on one thread: a training step (batch 32,
one DDP worker's share of the main job's 64, AdamW) and a sampling forward (125 x 1 x 8 x 8),
interleaved rounds, medians; and whether the two layouts give the same numbers.

    .venv/bin/python benchmarks/unet_layout.py [--quick] [--json PATH]
"""

from __future__ import annotations

import torch

import _common as C

from models.networks import build_network
from tasks.config_loading import load_config


def main() -> None:
    args = C.parser(__doc__.splitlines()[0]).parse_args()
    rounds, steps = (2, 3) if args.quick else (8, 20)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(C.ROOT / "configs" / "flow-matching" / "digits.yaml")
    nets = {name: build_network(cfg.model.network, (1, 8, 8), **cfg.model.kwargs, channels_last=last)
            for name, last in (("contiguous", False), ("channels-last", True))}
    torch.nn.init.normal_(nets["contiguous"].out[-1].weight, std=0.01)  # a field that is not zero
    nets["channels-last"].load_state_dict(nets["contiguous"].state_dict())
    optimizers = {k: torch.optim.AdamW(n.parameters(), 1e-3, foreach=True) for k, n in nets.items()}
    x, t = torch.randn(32, 1, 8, 8), torch.rand(32)
    xb, tb = torch.randn(125, 1, 8, 8), torch.rand(125)
    with torch.no_grad():
        gap = (nets["channels-last"](xb, tb) - nets["contiguous"](xb, tb)).abs().max().item()

    def step(name: str) -> None:
        optimizers[name].zero_grad()
        (nets[name](x, t) - x).pow(2).mean().backward()
        optimizers[name].step()

    def forward(name: str) -> None:
        with torch.no_grad():
            nets[name](xb, tb)

    times = {(k, what): [] for k in nets for what in ("step", "forward")}
    for _ in range(rounds):
        for name in nets:
            for what, fn in (("step", step), ("forward", forward)):
                fn(name)
                times[name, what] += C.timeit(lambda: fn(name), repeat=1, number=steps)
    ms = {key: 1000 * C.median(v) for key, v in times.items()}
    rows = [[what, ms["contiguous", what], ms["channels-last", what], ms["channels-last", what] / ms["contiguous", what]]
            for what in ("step", "forward")]
    C.print_table(f"digits UNet, one thread ({C.uptime()}); largest output difference {gap:.2g}",
                  ["", "contiguous ms", "channels-last ms", "ratio"], rows)
    summary = {"step ratio": rows[0][3], "forward ratio": rows[1][3], "largest output difference": gap}
    C.finish(args, "unet_layout", "channels-last no slower (ratio <= 1), outputs equal to float rounding", summary,
             {f"{k} {w} ms": v for (k, w), v in ms.items()})


if __name__ == "__main__":
    main()
