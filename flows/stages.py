"""Graphs whose trained model feeds further training stages.

    rectified flow:  data -> 1-RF -> [couplings -> k-RF] x reflow.rounds -> couplings -> one-step distillation

Every stage is a model of its own: trained (or reused: a stage's run name hashes its config and
its inputs: data, coupling set, the weights it starts from), sampled, evaluated, reported under
`report/<stage>/` and registered as `gendag-<name>-<stage>`, its MLflow run nested in the graph's
run and tagged with the stage it came from. The graph's run holds the table and the plot of
every stage side by side (`report/stages.md`, `report/stages.png`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flows.pipeline import Inputs, prepare_data, report, sample_and_evaluate
from flows.summary import lineage, run_outputs, write_summary
from tasks.config import RunConfig
from tasks.couplings import coupling_manifest, generate_couplings, measure_straightness
from tasks.infra import Ref
from tasks.register import graph_run, log_graph_results, register
from tasks.report import stages_report
from tasks.train import train


@dataclass
class Stage:
    label: str  # how people read it: "1-RF", "2-RF", "2-RF + distill"
    cfg: RunConfig  # the stage's own config (name, train overrides, sampler grid)
    model: Ref
    tags: dict[str, str] = field(default_factory=dict)  # lineage beyond the graph's
    straight: bool = True  # a flow whose straightness is measured (not a one-step student)


class StageRunner:
    """Evaluates, reports and registers stages one after another, nested in the graph's run."""

    def __init__(self, cfg: RunConfig, staging: Path, inputs: Inputs, parent: str) -> None:
        self.cfg, self.staging, self.inputs, self.parent = cfg, staging, inputs, parent
        self.done: list[dict] = []
        self.metrics: dict[str, dict[str, float]] = {}

    def finish(self, stage: Stage) -> dict:
        first = not self.done
        samples, metrics = sample_and_evaluate(stage.cfg, stage.model, self.inputs, baseline=first)
        if stage.straight:
            metrics["straightness"] = measure_straightness(stage.cfg, stage.model, self.inputs.source)
        kind, files = report(stage.cfg, self.staging / "report" / stage.cfg.name, stage.model, self.inputs,
                             samples, metrics)
        tags = lineage(stage.cfg, self.inputs.data) | stage.tags | {"gendag.stage": stage.label}
        if self.done:
            tags["gendag.parent_stage_model"] = f"{self.done[-1]['name']}/{self.done[-1]['version']}"
        registered = register(stage.cfg, kind, stage.model, self.inputs.data, metrics, files, tags, parent=self.parent)
        self.kind, self.last = kind, (stage, metrics, registered)
        self.metrics[stage.label] = metrics
        self.done.append({"stage": stage.label, "name": registered["name"], "version": registered["version"],
                          "mlflow_run_id": registered["run_id"], "model_uri": stage.model.uri,
                          "model_hash": stage.model.hash, **stage.tags})
        return registered


def rectified_flow(cfg: RunConfig, out: Path) -> dict:
    """1-RF -> k-RF (reflow on couplings of the previous flow) -> one-step distillation; each
    stage sampled, evaluated and registered as soon as it is trained."""
    with run_outputs(out) as staging, graph_run(cfg, lineage(cfg, None)) as (client, parent):
        inputs = prepare_data(cfg)
        stages = StageRunner(cfg, staging, inputs, parent)
        flow = cfg.stage("1rf")
        model = train_stage(flow, inputs)
        stages.finish(Stage("1-RF", flow, model))
        k = 1
        for k in range(2, cfg.reflow.rounds + 2):
            pairs = generate_couplings(cfg, model, inputs.source, k - 1)
            start = {"init": model} if cfg.reflow.init == "previous" else {}
            flow = cfg.stage(f"{k}rf", cfg.reflow.train)
            model = train_stage(flow, inputs, start, pairs)
            stages.finish(Stage(f"{k}-RF", flow, model, couplings_tags(pairs)))
        if cfg.distill.enabled:
            pairs = generate_couplings(cfg, model, inputs.source, k)
            student = cfg.stage(f"{k}rf-distill", cfg.distill.train, cfg.distill.samplers)
            model = train_stage(student, inputs, {"init": model}, pairs, "one_step_distillation")
            stages.finish(Stage(f"{k}-RF + distill", student, model, couplings_tags(pairs), straight=False))
        files = stages_report(stages.metrics, stages.kind, staging / "report")
        log_graph_results(client, parent, {f"{label}/{name}": value for label, metrics in stages.metrics.items()
                                           for name, value in metrics.items()}, files)
        last, metrics, registered = stages.last
        return write_summary(staging, out, last.cfg, inputs.data, last.model, metrics, registered, stages.done)


def train_stage(cfg: RunConfig, inputs: Inputs, start: dict[str, Ref] | None = None, pairs: Ref | None = None,
                objective: str | None = None) -> Ref:
    return train(cfg, inputs.data, inputs.source, start, pairs=pairs, objective=objective)


def couplings_tags(pairs: Ref) -> dict[str, str]:
    manifest = coupling_manifest(pairs)
    return {"gendag.couplings_hash": pairs.hash, "gendag.couplings_uri": pairs.uri,
            "gendag.couplings_solver": manifest["solver"], "gendag.couplings_nfe": f"{manifest['nfe']:g}"}
