"""What a finished run leaves behind for people and scripts: `summary.json`."""

from __future__ import annotations

import json
from pathlib import Path

from models.sampling import BASELINE_SETS
from tasks.config import RunConfig
from tasks.infra import Ref
from tasks.register import git_commit
from tasks.report import reading_order


def prefect_flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id)


def lineage(cfg: RunConfig, data: Ref) -> dict[str, str]:
    """Tags that tie a registered model to its code, data, config and orchestration run."""
    return {
        "gendag.git_commit": git_commit(),
        "gendag.data_hash": data.hash,
        "gendag.config_hash": cfg.digest(),
        "gendag.prefect_flow_run_id": prefect_flow_run_id(),
    }


def write_summary(out: Path, cfg: RunConfig, data: Ref, model: Ref, metrics: dict, registered: dict) -> dict:
    summary = {
        "graph": cfg.graph,
        "name": cfg.name,
        "dataset": cfg.data.name,
        "data_hash": data.hash,
        "config_hash": cfg.digest(),
        "model_hash": model.hash,
        "model_uri": model.uri,
        "metrics": {k: metrics[k] for k in sorted(metrics, key=reading_order)},
        "evaluation": {  # how to read the metrics: what was scored against what
            "samples_per_set": cfg.sample.n_samples,
            "sets": cfg.sample.sets,
            "baseline_sets": BASELINE_SETS,  # the untrained baseline
            "reference": "held-out test split",
            "floor": "the same protocol on random subsets of the training split",
        },
        "mlflow_run_id": registered["run_id"],
        "registered_model": {k: registered[k] for k in ("name", "version", "aliases")},
        "prefect_flow_run_id": prefect_flow_run_id(),
        "report": str(out / "report"),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
