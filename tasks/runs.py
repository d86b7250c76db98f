"""Read the MLflow tracking store for people: the latest runs of an experiment, one run found by
the start of its id, and two runs' params and metrics side by side (`gendag runs`)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from tasks.infra import tracking_uri


class RunLookupError(ValueError):
    """An experiment or a run that is not in the store, phrased as one line."""


@dataclass(frozen=True)
class RunRow:
    """What `gendag runs list` shows of a run."""

    run_id: str
    name: str
    nested: bool  # a stage's run, inside its graph's
    graph: str
    dataset: str
    status: str
    start: float  # seconds since the epoch
    seconds: float  # its duration (so far, while it runs)
    score: tuple[str, float] | None  # the primary score (`best_fid`, `best_w2`), if it has one

    @classmethod
    def of(cls, run) -> RunRow:
        info, tags = run.info, run.data.tags
        end = info.end_time or time.time() * 1000
        scores = sorted((k, v) for k, v in run.data.metrics.items() if k.startswith("best_"))
        return cls(info.run_id, info.run_name or "", "mlflow.parentRunId" in tags, tags.get("gendag.graph", ""),
                   tags.get("gendag.dataset", ""), info.status, info.start_time / 1000,
                   (end - info.start_time) / 1000, scores[0] if scores else None)


def latest_runs(experiment: str, limit: int) -> list[RunRow]:
    """The `limit` latest runs of `experiment` (stages' runs included), newest first."""
    from mlflow import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise RunLookupError(f"--experiment {experiment}: no such experiment in {tracking_uri()} (there: {names})")
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit)
    return [RunRow.of(run) for run in runs]


def find_run(prefix: str):
    """The one run (of any experiment) whose id starts with `prefix`."""
    from mlflow import MlflowClient

    client = MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = [run for run in client.search_runs(experiments, max_results=50_000) if run.info.run_id.startswith(prefix)]
    if len(runs) != 1:
        why = "no such run" if not runs else f"{len(runs)} runs start so ({', '.join(r.info.run_id[:12] for r in runs[:3])}...)"
        raise RunLookupError(f"run {prefix!r}: {why} in {tracking_uri()}")
    return runs[0]


def compare(first, second, everything: bool = False) -> list[tuple[str, str, str, str]]:
    """(`param` | `metric`, name, first run's value, second's) for every param and metric of
    either run: those that differ first, then (`everything`) those that are the same."""
    rows = []
    for kind, a, b in (("param", first.data.params, second.data.params),
                       ("metric", first.data.metrics, second.data.metrics)):
        for key in sorted(set(a) | set(b)):
            rows.append((kind, key, _show(a.get(key)), _show(b.get(key))))
    differ = [row for row in rows if row[2] != row[3]]
    return differ + ([row for row in rows if row[2] == row[3]] if everything else [])


def _show(value) -> str:
    if value is None:
        return "-"
    return f"{value:.5g}" if isinstance(value, float) else str(value)
