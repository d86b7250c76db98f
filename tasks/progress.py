"""Progress of work running in Ray workers, shown as a rich progress bar in the driver.

Workers push (step, total, loss, rate) to a small named actor; the driver polls it
while it waits. This works the same on a local Ray and on a cluster. A worker that stops
the work on purpose (a non-finite loss) leaves its reason there too (`halt`), for the
driver to read once the workers have returned.
"""

from __future__ import annotations

import contextlib
import threading

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@ray.remote(num_cpus=0)
class _Board:
    def __init__(self) -> None:
        self.state: dict = {}
        self.reason: str | None = None

    def update(self, step: int, total: int, loss: float, rate: float) -> None:
        self.state = {"step": step, "total": total, "loss": loss, "rate": rate}

    def read(self) -> dict:
        return self.state

    def halt(self, reason: str) -> None:
        """Why the work stopped early; the first reason given is kept."""
        self.reason = self.reason or reason

    def halted(self) -> str | None:
        return self.reason


class ProgressBoard:
    """Handle to the named progress actor of one run."""

    def __init__(self, name: str, actor) -> None:
        self.name, self.actor = name, actor
        self.update, self.halt = actor.update, actor.halt

    @classmethod
    def create(cls, run: str) -> "ProgressBoard":
        """The board of training run `run` in this driver: named by the driver's job too, so two
        workstations training the same run on one cluster do not share (and kill) one board."""
        name = f"gendag-progress-{run}-{ray.get_runtime_context().get_job_id()}"
        return cls(name, _Board.options(name=name, get_if_exists=True, lifetime="detached").remote())

    @classmethod
    def find(cls, name: str | None) -> "ProgressBoard | None":
        if not name:
            return None
        try:
            return cls(name, ray.get_actor(name))
        except ValueError:
            return None


def note(message: str) -> None:
    """One line for the person running gendag (e.g. what a rerun kept from an interrupted run)."""
    Console(highlight=False, soft_wrap=True).print(message)


_SHARED: dict = {"bar": None, "users": 0}
_SHARED_GUARD = threading.Lock()


@contextlib.contextmanager
def progress_bar():
    """The process's one live progress display, shown while anyone uses it: two table cells
    running side by side add their bars to it (rich allows one live display at a time)."""
    with _SHARED_GUARD:
        if _SHARED["bar"] is None:
            _SHARED["bar"] = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                transient=False,
            )
            _SHARED["bar"].start()
        _SHARED["users"] += 1
        bar = _SHARED["bar"]
    try:
        yield bar
    finally:
        with _SHARED_GUARD:
            _SHARED["users"] -= 1
            if not _SHARED["users"]:
                bar.stop()
                _SHARED["bar"] = None


@contextlib.contextmanager
def track_progress(actor, description: str, total: int, poll: float = 0.5):
    """Show a bar fed by `actor.read()` while the body runs (e.g. `trainer.fit()`)."""
    done = threading.Event()
    with progress_bar() as bar:
        job = bar.add_task(description, total=total, info="starting workers")

        def poll_board() -> None:
            while not done.wait(poll):
                try:
                    s = ray.get(actor.read.remote(), timeout=5)
                except Exception:
                    continue
                if s:
                    bar.update(job, completed=s["step"], info=f"loss {s['loss']:.4f}  {s['rate']:.1f} it/s")

        poller = threading.Thread(target=poll_board, daemon=True)
        poller.start()
        try:
            yield
        finally:
            done.set()
            poller.join()
            try:
                s = ray.get(actor.read.remote(), timeout=5)
                if s:
                    bar.update(job, completed=s["step"], info=f"loss {s['loss']:.4f}")
            except Exception:
                pass
            ray.kill(actor)
