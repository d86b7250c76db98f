"""Training pairs (x0 from the source, x1 from the data, t), one batch per step.

Each batch is a pure function of (seed, rank, step): resuming at step k draws the
same batches an uninterrupted run would, with no random state to checkpoint, and
batches can be prepared ahead of time in background threads. Those threads are what
take minibatch-OT plans off the training step's critical path: POT's network simplex
(`ot.emd`) releases the GIL, so the plan for step k+1 is solved while step k trains,
and with `workers > 1` several plans are solved at once, on as many cores. A plan
can cost more than a training step (exact OT at batch 512 costs several steps of a
small MLP), so one thread alone cannot keep up; since a batch is a pure function of
its step, it is the same whichever thread builds it, and batches are handed out in
step order.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import Tensor

from models.couplings import Coupling, IndependentCoupling

_STEP_STRIDE = 1_000_003  # keeps (seed, rank, step) seeds apart


@dataclass
class Batch:
    step: int
    x0: Tensor
    x1: Tensor
    t: Tensor
    noise: Tensor | None = None  # N(0, I) like x1, for a path with noise around its mean


class PairSampler:
    """Draw coupled (x0, x1, t) batches from a data tensor and a source (tensor or N(0, I))."""

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        source: Tensor | None = None,
        coupling: Coupling | None = None,
        seed: int = 0,
        rank: int = 0,
        paired: bool = False,
        noise: bool = False,
    ) -> None:
        """``paired``: ``source`` and ``data`` are the two ends of a coupling set (a reflow
        coupling): a batch draws rows by one index for both, not independently. ``noise``: each
        batch also holds N(0, I) draws like ``x1`` (a path with noise around its mean), drawn last,
        so the rest of the batch is what it is without them."""
        if paired and (source is None or len(source) != len(data)):
            raise ValueError("paired rows need a source with as many rows as the data")
        self.paired = paired
        self.data, self.source = data, source
        self.batch_size = batch_size
        self.coupling = coupling or IndependentCoupling()
        self.seed, self.rank = seed, rank
        self.noise = noise

    def batch(self, step: int) -> Batch:
        g = torch.Generator().manual_seed((self.seed * 7919 + self.rank) * _STEP_STRIDE + step)
        rows = torch.randint(len(self.data), (self.batch_size,), generator=g)
        x1 = self.data[rows]
        if self.paired:
            x0 = self.source[rows]
        elif self.source is None:
            x0 = torch.randn(x1.shape, generator=g)
        else:
            x0 = self.source[torch.randint(len(self.source), (self.batch_size,), generator=g)]
        t = torch.rand(self.batch_size, generator=g)
        x0, x1 = self.coupling(x0, x1, generator=g)
        noise = torch.randn(x1.shape, generator=g) if self.noise else None
        return Batch(step, x0, x1, t, noise)

    def stream(self, start: int, stop: int, prefetch: int | None = None, workers: int = 1) -> Iterator[Batch]:
        """Batches for steps start..stop-1, in order.

        With ``prefetch > 0`` they are built ahead in background threads: one thread
        (``workers=1``, the default) keeps up to ``prefetch`` batches ready; ``workers > 1``
        threads build up to ``max(prefetch, workers)`` batches concurrently. The batches
        are identical in every case (each is ``self.batch(step)``). By default (None) only a
        coupling that solves plans is built ahead (2 batches): a batch of rows drawn at random
        costs a fraction of a millisecond, and a thread drawing it beside a training step on
        every core slows the step down (``benchmarks/workers_vs_threads.py``: the digits UNet at
        2 threads, 77 ms a step with a batch thread against 39 ms without).
        """
        if prefetch is None:
            prefetch = 2 if self.coupling.costly else 0
        if prefetch <= 0:
            yield from (self.batch(s) for s in range(start, stop))
            return
        if workers > 1:
            yield from self._pooled(start, stop, max(prefetch, workers), workers)
            return
        ready: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=prefetch)
        stopped = threading.Event()

        def produce() -> None:
            try:
                for s in range(start, stop):
                    if stopped.is_set():
                        return
                    ready.put(self.batch(s))
            except BaseException as e:  # surfaced to the consumer below
                ready.put(e)

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            for _ in range(start, stop):
                item = ready.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stopped.set()
            while not ready.empty():
                ready.get_nowait()

    def _pooled(self, start: int, stop: int, ahead: int, workers: int) -> Iterator[Batch]:
        """`workers` threads build batches concurrently, `ahead` steps in advance; yielded in step order."""
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pairs")
        pending: deque[Future] = deque()
        steps = iter(range(start, stop))
        try:
            for s in steps:
                pending.append(pool.submit(self.batch, s))
                if len(pending) >= ahead:
                    break
            while pending:
                batch = pending.popleft().result()  # re-raises a worker's error here
                s = next(steps, None)
                if s is not None:
                    pending.append(pool.submit(self.batch, s))
                yield batch
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
