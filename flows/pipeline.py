"""The sub-graphs every graph is made of, and the standard graph body.

    prepare data (DVC) -> train (Ray Train) -> sample (Ray) -> evaluate -> report + register (MLflow)

A graph's body is a short composition of these; `train_and_evaluate` is the standard one
(flow matching, DDPM, DDIM). `resample` re-samples and re-scores a registered model with
another sampler grid (`gendag sample`). A body runs inside `started` (`run_outputs` and
`graph_run`): its report and summary reach the output folder only when all of it succeeded,
and its MLflow run is open from its first step to its last.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flows.summary import lineage, run_outputs, write_summary
from models.sampling import sampling_grid
from tasks.config import RunConfig
from tasks.data import read_dataset, version_dataset
from tasks.evaluate import evaluate, feature_extractor
from tasks.infra import Ref
from tasks.register import GraphRun, graph_run, log_evaluation, register
from tasks.report import DENSITY_LIKELIHOODS, write_report
from tasks.sample import sample
from tasks.train import train, train_seconds


@dataclass(frozen=True)
class Inputs:
    data: Ref
    source: Ref | None
    features: Ref | None  # the FID feature network (images only)


def prepare_data(cfg: RunConfig) -> Inputs:
    """Version the data (and the source dataset, if any) with DVC; the FID feature network."""
    data = version_dataset(cfg.data, cfg.seed)
    source_data = cfg.source_config.as_data()
    source = version_dataset(source_data, cfg.seed + 1) if source_data else None
    return Inputs(data, source, feature_extractor(cfg, data))


@dataclass(frozen=True)
class Started:
    staging: Path  # where the run's files go until it has succeeded (`run_outputs`)
    mlflow: GraphRun  # the graph's MLflow run, open from its first step
    inputs: Inputs
    seconds: dict[str, float]  # wall time of each part so far ({"data": ...}); the body adds its own


@contextmanager
def started(cfg: RunConfig, out: Path):
    """A graph from its first step: its staging folder, its MLflow run (open until the body ends),
    and its data versioned and logged as the run's inputs."""
    with run_outputs(out) as staging, graph_run(cfg, lineage(cfg, None)) as run:
        inputs, seconds = timed(prepare_data, cfg)
        run.log_datasets({"train": inputs.data, "source": inputs.source})
        yield Started(staging, run, inputs, {"data": seconds})


def sample_and_evaluate(cfg: RunConfig, model: Ref, inputs: Inputs, seconds: dict[str, float],
                        baseline: bool = True) -> tuple[dict[str, Ref], dict[str, float]]:
    """Every setting of the config's sampler grid (and the untrained baseline), scored against
    held-out data and the floor; the wall time of each into `seconds` ("sample", "evaluate")."""
    samples, seconds["sample"] = timed(sample, cfg, model, inputs.source, sampling_grid(cfg.sample.samplers, baseline))
    metrics, seconds["evaluate"] = timed(evaluate, cfg, samples, inputs.data, inputs.features, model, inputs.source)
    return samples, metrics


def report(cfg: RunConfig, folder: Path, model: Ref, inputs: Inputs, samples: dict[str, Ref], metrics: dict):
    """The run's plots and tables into `folder`; (data kind, the files)."""
    splits = read_dataset(inputs.data)
    density = next((name for name in cfg.evaluate.likelihood if name in DENSITY_LIKELIHOODS), None)
    return splits.kind, write_report(folder, splits.kind, samples, splits.test, metrics, model,
                                     (density, cfg.data.name) if density else None)


def timed(work, *args, **kwargs):
    """(work's result, its wall time in seconds)."""
    began = time.perf_counter()
    return work(*args, **kwargs), round(time.perf_counter() - began, 1)


def train_and_evaluate(cfg: RunConfig, out: Path) -> dict:
    """data -> train -> sample (the config's grid) -> evaluate -> report -> register, all in one MLflow run."""
    with started(cfg, out) as graph:
        inputs = graph.inputs
        levels = read_dataset(inputs.data).levels  # a likelihood objective dequantizes by them
        seconds = graph.seconds
        model, seconds["train"] = timed(train, cfg, inputs.data, inputs.source, options=cfg.objective_options(levels))
        seconds["model_train"] = train_seconds(model)  # the model's own fit (this run's "train" is ~0 if reused)
        samples, metrics = sample_and_evaluate(cfg, model, inputs, seconds)
        (kind, files), seconds["report"] = timed(report, cfg, graph.staging / "report", model, inputs, samples, metrics)
        registered, seconds["register"] = timed(register, cfg, kind, model, inputs.data, metrics, files,
                                                lineage(cfg, inputs.data), run=graph.mlflow.run_id, source=inputs.source)
        return write_summary(graph.staging, out, cfg, inputs.data, model, metrics, registered, seconds=seconds)


def resample(cfg: RunConfig, out: Path, model: Ref, version: dict) -> dict:
    """A registered model (no training) -> sample (another grid) -> evaluate -> report -> a new
    MLflow run linked to the model version `version` ({name, version, run_id})."""
    with started(cfg, out) as graph:
        samples, metrics = sample_and_evaluate(cfg, model, graph.inputs, graph.seconds)
        _, files = report(cfg, graph.staging / "report", model, graph.inputs, samples, metrics)
        logged = log_evaluation(cfg, model, metrics, files, lineage(cfg, graph.inputs.data), version, run=graph.mlflow.run_id)
        return write_summary(graph.staging, out, cfg, graph.inputs.data, model, metrics, logged, seconds=graph.seconds)
