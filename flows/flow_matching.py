"""The flow-matching graph: data -> train -> sample (NFE grid) -> evaluate -> register."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from flows.summary import lineage, write_summary
from models.sampling import sampling_grid
from tasks.config import RunConfig
from tasks.data import read_dataset, version_dataset
from tasks.evaluate import evaluate, feature_extractor
from tasks.register import register
from tasks.report import write_report
from tasks.sample import sample
from tasks.train import train


@flow(name="flow-matching", validate_parameters=False)
def flow_matching(cfg: RunConfig, out: Path) -> dict:
    data = version_dataset(cfg.data, cfg.seed)
    source_data = cfg.source.as_data()
    source = version_dataset(source_data, cfg.seed + 1) if source_data else None
    features = feature_extractor(cfg, data)
    model = train(cfg, data, source)
    samples = sample(cfg, model, source, sampling_grid(cfg.sample.solvers))
    metrics = evaluate(cfg, samples, data, features)
    splits = read_dataset(data)
    report = write_report(out / "report", splits.kind, samples, splits.test, metrics, model)
    registered = register(cfg, splits.kind, model, data, metrics, report, lineage(cfg, data))
    return write_summary(out, cfg, data, model, metrics, registered)
