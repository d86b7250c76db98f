"""What a finished run leaves behind for people and scripts: `summary.json` and the report,
and only a finished run (`run_outputs`)."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

from models.sampling import BASELINE_SETS
from tasks.config import RunConfig
from tasks.infra import DISK_FULL, Ref, disk_full_error
from tasks.register import git_commit
from tasks.report import reading_order


def prefect_flow_run_id() -> str:
    from prefect.runtime import flow_run

    return str(flow_run.id)


def lineage(cfg: RunConfig, data: Ref | None) -> dict[str, str]:
    """Tags that tie a registered model to its code, data, config and orchestration run (with
    MLflow's own tags for the code: the UI shows them as the run's source and commit)."""
    from prefect.runtime import flow_run

    commit = git_commit()
    return {
        "mlflow.source.git.commit": commit.removesuffix("-dirty"),
        "mlflow.source.name": f"gendag {flow_run.flow_name}",
        "mlflow.source.type": "LOCAL",
        "gendag.git_commit": commit,
        **({"gendag.data_hash": data.hash} if data else {}),
        "gendag.config_hash": cfg.digest(),
        "gendag.prefect_flow_run_id": prefect_flow_run_id(),
    }


@contextmanager
def run_outputs(out: Path):
    """Yield the staging folder a run writes its files to (`.<out name>.partial` next to `out`).

    Guarantees: `out` only ever holds the files of a finished run. When the body succeeds, the
    staged files are moved into `out`, `summary.json` last (its presence means finished; the
    old one is removed first); when it fails, the staging folder is removed (and one left by a
    killed run is removed at the next start). A full disk, anywhere in the run, becomes a
    one-line `RunError`."""
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        yield staging
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").unlink(missing_ok=True)
        for item in sorted(staging.iterdir(), key=lambda path: path.name == "summary.json"):
            target = out / item.name
            if target.is_dir():
                shutil.rmtree(target)
            item.replace(target)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full_error(e) from e
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_summary(staging: Path, out: Path, cfg: RunConfig, data: Ref, model: Ref, metrics: dict,
                  registered: dict, stages: list[dict] | None = None, seconds: dict | None = None,
                  graph_cfg: RunConfig | None = None, graph_run: str | None = None) -> dict:
    """`summary.json` and `config.json` of a run, into its staging folder (see `run_outputs`). A
    multi-stage graph's summary describes its last stage's model, and lists every stage;
    `seconds`: the wall time of each part of the run (`data`, `train`: ~0 when the model was reused,
    `model_train`: what the model's own fit took, whenever it was trained, `sample`, `evaluate`,
    `report`, `register`; a multi-stage graph's stages list their own);
    `graph_cfg`, `graph_run`: the whole graph's config and MLflow run (a multi-stage graph's:
    its stages' runs are nested in it)."""
    summary = {
        "graph": cfg.graph,
        "name": cfg.name,
        "dataset": cfg.data.name,
        "data_hash": data.hash,
        "config_hash": cfg.digest(),
        "graph_config_hash": (graph_cfg or cfg).digest(),  # what `gendag run` was given
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
        "graph_mlflow_run_id": graph_run or registered["run_id"],
        "registered_model": {k: registered[k] for k in ("name", "version", "aliases")},
        "prefect_flow_run_id": prefect_flow_run_id(),
        "report": str(out / "report"),
    }
    if stages:
        summary["stages"] = stages
    if seconds:
        summary["seconds"] = seconds
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2))
    (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
