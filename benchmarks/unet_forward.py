"""How fast this machine is right now: one forward of the digits UNet that `make run` trains
(`flow-matching/digits`'s network, 125 x 1 x 8 x 8, one thread), median of 50 after 10 warm-up
calls. BENCHMARKS.md quotes it beside every main-job time (31 ms in (c); the guide's slow
machine: 92 ms). The network is built in the contiguous NCHW layout those numbers were measured in
(the UNet keeps channels-last by default since 2026-12-07, about 10% faster: `benchmarks/unet_layout.py`),
so the figure stays comparable across sessions.

    .venv/bin/python benchmarks/unet_forward.py
"""

from __future__ import annotations

import statistics
import time

import torch

import _common as C

from models.networks import build_network
from tasks.config_loading import load_config


def main() -> None:
    C.parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(C.ROOT / "configs" / "flow-matching" / "digits.yaml")
    net = build_network(cfg.model.network, (1, 8, 8), **cfg.model.kwargs, channels_last=False).eval()
    x, t = torch.randn(125, 1, 8, 8), torch.rand(125)
    seconds = []
    with torch.no_grad():
        for _ in range(60):
            start = time.perf_counter()
            net(x, t)
            seconds.append(time.perf_counter() - start)
    print(f"digits UNet forward: {1000 * statistics.median(seconds[10:]):.1f} ms (median of 50; {C.uptime()})")


if __name__ == "__main__":
    main()
