"""Graphs whose trained model feeds further training stages.

    rectified flow:            data -> 1-RF -> [couplings -> k-RF] x reflow.rounds -> couplings -> one-step distillation
    progressive distillation:  data -> teacher (trained, or from the registry) -> student N/2 -> N/4 -> ...
    consistency distillation:  data -> teacher (trained, or from the registry) -> consistency model
    consistency training:      data -> consistency model

Every stage is a model of its own: trained (or reused: a stage's run name hashes its config and
its inputs: data, coupling set, the weights it starts from), sampled, evaluated, reported under
`report/<stage>/` and registered as `gendag-<name>-<stage>`, its MLflow run nested in the graph's
run and tagged with the stage it came from. The graph's run holds the table and the plot of
every stage side by side (`report/stages.md`, `report/stages.png`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from flows.pipeline import Inputs, report, sample_and_evaluate, started, timed
from flows.summary import lineage, write_summary
from tasks.config import RunConfig
from tasks.couplings import coupling_manifest, generate_couplings, measure_straightness
from tasks.infra import Ref, folder_digest
from tasks.register import GraphRun, describe, log_evaluation, register
from tasks.registry import fetch_model_version
from tasks.report import reading_order, stages_report
from tasks.train import train


@dataclass
class Stage:
    label: str  # how people read it: "1-RF", "2-RF", "2-RF + distill"
    cfg: RunConfig  # the stage's own config (name, train overrides, sampler grid)
    model: Ref
    tags: dict[str, str] = field(default_factory=dict)  # lineage beyond the graph's
    registered: dict | None = None  # a model taken from the registry: evaluated, not registered again
    seconds: dict[str, float] = field(default_factory=dict)  # wall time of each part (couplings, train: ~0 if reused; sample, ...)


class StageRunner:
    """Evaluates, reports and registers stages one after another, nested in the graph's run."""

    def __init__(self, cfg: RunConfig, staging: Path, inputs: Inputs, parent: str) -> None:
        self.cfg, self.staging, self.inputs, self.parent = cfg, staging, inputs, parent
        self.done: list[dict] = []
        self.metrics: dict[str, dict[str, float]] = {}
        self.seconds: dict[str, dict[str, float]] = {}

    def finish(self, stage: Stage, extra: Callable[[], dict[str, float]] | None = None) -> dict:
        """Sample, evaluate (plus the metrics `extra` returns once that is done), report and
        register `stage`."""
        spent = stage.seconds
        samples, metrics = sample_and_evaluate(stage.cfg, stage.model, self.inputs, spent, baseline=not self.done)
        metrics |= extra() if extra else {}
        (kind, files), spent["report"] = timed(report, stage.cfg, self.staging / "report" / stage.cfg.name,
                                               stage.model, self.inputs, samples, metrics)
        tags = lineage(stage.cfg, self.inputs.data) | stage.tags | {"gendag.stage": stage.label}
        if self.done:
            tags["gendag.parent_stage_model"] = f"{self.done[-1]['name']}/{self.done[-1]['version']}"
        if stage.registered:
            registered, spent["register"] = timed(log_evaluation, stage.cfg, stage.model, metrics, files, tags,
                                                  stage.registered, parent=self.parent)
        else:
            registered, spent["register"] = timed(register, stage.cfg, kind, stage.model, self.inputs.data, metrics,
                                                  files, tags, parent=self.parent, source=self.inputs.source)
        self.kind, self.last = kind, (stage, metrics, registered)
        self.metrics[stage.label], self.seconds[stage.label] = metrics, stage.seconds
        self.done.append({"stage": stage.label, "name": registered["name"], "version": registered["version"],
                          "mlflow_run_id": registered["run_id"], "model_uri": stage.model.uri,
                          "model_hash": stage.model.hash, "seconds": stage.seconds, **stage.tags,
                          "metrics": {k: metrics[k] for k in sorted(metrics, key=reading_order)}})
        return registered

    def close(self, graph: GraphRun, out: Path, seconds: dict[str, float]) -> dict:
        """Every stage side by side (table, plot) on the graph's run; the summary of the last stage
        (`seconds`: the graph's own parts, e.g. versioning the data; each stage lists its own)."""
        files = stages_report(self.metrics, self.kind, self.staging / "report", self.seconds)
        results = {f"{label}/{name}": value for label, metrics in self.metrics.items() for name, value in metrics.items()}
        results |= {f"{label}/seconds_{what}": value for label, spent in self.seconds.items() for what, value in spent.items()}
        last, metrics, registered = self.last
        stages = ", ".join(f"{s['stage']} ({s['name']} v{s['version']})" for s in self.done)
        graph.log_results(results, files, describe(self.cfg, f"stages {stages}", registered))
        return write_summary(self.staging, out, last.cfg, self.inputs.data, last.model, metrics, registered, self.done,
                             seconds=seconds, graph_cfg=self.cfg, graph_run=graph.run_id)


def staged(body):
    """Run a stage graph's `body(cfg, inputs, runner)` inside its outputs folder and parent MLflow run."""
    def graph(cfg: RunConfig, out: Path) -> dict:
        with started(cfg, out) as begun:
            runner = StageRunner(cfg, begun.staging, begun.inputs, begun.mlflow.run_id)
            body(cfg, begun.inputs, runner)
            return runner.close(begun.mlflow, out, begun.seconds)
    graph.__doc__ = body.__doc__
    return graph


@staged
def rectified_flow(cfg: RunConfig, inputs: Inputs, stages: StageRunner) -> None:
    """1-RF -> k-RF (reflow on couplings of the previous flow) -> one-step distillation; each
    stage sampled, evaluated and registered as soon as it is trained."""
    def finish(stage: Stage) -> None:  # straightness (one CPU) runs beside the stage's sampling
        straightness = measure_straightness.submit(stage.cfg, stage.model, inputs.source)
        stages.finish(stage, lambda: {"straightness": straightness.result()})

    flow = cfg.stage("1rf")
    model, seconds = timed(train_stage, flow, inputs)
    finish(Stage("1-RF", flow, model, seconds={"train": seconds}))
    k = 1
    for k in range(2, cfg.reflow.rounds + 2):
        pairs, paired = timed(generate_couplings, cfg, model, inputs.source, k - 1)
        start = {"init": model} if cfg.reflow.init == "previous" else {}
        flow = cfg.stage(f"{k}rf", cfg.reflow.train, cfg.reflow.samplers)
        model, seconds = timed(train_stage, flow, inputs, start, pairs)
        finish(Stage(f"{k}-RF", flow, model, couplings_tags(pairs), seconds={"couplings": paired, "train": seconds}))
    if cfg.distill.enabled:
        pairs, paired = timed(generate_couplings, cfg, model, inputs.source, k)
        student = cfg.stage(f"{k}rf-distill", cfg.distill.train, cfg.distill.samplers)
        model, seconds = timed(train_stage, student, inputs, {"init": model}, pairs, "one_step_distillation")
        stages.finish(Stage(f"{k}-RF + distill", student, model, couplings_tags(pairs),
                            seconds={"couplings": paired, "train": seconds}))


def teacher_stage(cfg: RunConfig, inputs: Inputs, samplers) -> Stage:
    """The teacher: the registered model `cfg.teacher`, or trained here from the config."""
    teacher_cfg = cfg.stage("teacher", samplers=samplers)
    if cfg.teacher:
        version, folder, _ = fetch_model_version(cfg.teacher)
        model = Ref("model", str(folder), folder_digest(folder), cfg.digest())
        return Stage(f"teacher ({version['name']} v{version['version']})", teacher_cfg, model, registered=version)
    model, seconds = timed(train_stage, teacher_cfg, inputs)
    return Stage("teacher", teacher_cfg, model, seconds={"train": seconds})


def teacher_tags(teacher: Ref) -> dict[str, str]:
    return {"gendag.teacher_hash": teacher.hash, "gendag.teacher_uri": teacher.uri}


@staged
def progressive_distillation(cfg: RunConfig, inputs: Inputs, stages: StageRunner) -> None:
    """teacher (DDIM at 2N steps) -> student at N -> student at N/2 -> ...: each round's student
    starts from its teacher's weights and learns two of its DDIM steps in one."""
    ladder = cfg.distill.ladder()
    teacher = teacher_stage(cfg, inputs, cfg.sample.samplers + cfg.distill.ddim(ladder))
    stages.finish(teacher)
    model = teacher.model
    for steps in ladder[1:]:
        student = cfg.stage(f"pd{steps}", cfg.distill.train, cfg.distill.ddim([steps]))
        tags = teacher_tags(model)
        model, seconds = timed(train_stage, student, inputs, {"teacher": model, "init": model},
                               objective="progressive_distillation", options={"student_steps": steps})
        stages.finish(Stage(f"PD {steps} step{'s' if steps > 1 else ''}", student, model, tags, seconds={"train": seconds}))


@staged
def consistency(cfg: RunConfig, inputs: Inputs, stages: StageRunner) -> None:
    """Consistency distillation (teacher -> consistency model) or consistency training (no teacher)."""
    c = cfg.consistency
    start: dict[str, Ref] = {}
    objective = "consistency_training"
    if cfg.graph == "consistency-distillation":
        teacher = teacher_stage(cfg, inputs, cfg.sample.samplers)
        stages.finish(teacher)
        start, objective = {"teacher": teacher.model, "init": teacher.model}, "consistency_distillation"
    suffix, label = ("cd", "CD") if start else ("ct", "CT")
    student = cfg.stage(suffix, c.train, c.samplers)
    model, seconds = timed(train_stage, student, inputs, start, objective=objective, family="consistency",
                           options=c.options(objective, student.train.steps))
    stages.finish(Stage(label, student, model, teacher_tags(start["teacher"]) if start else {},
                        seconds={"train": seconds}))


def train_stage(cfg: RunConfig, inputs: Inputs, start: dict[str, Ref] | None = None, pairs: Ref | None = None,
                objective: str | None = None, **kwargs) -> Ref:
    return train(cfg, inputs.data, inputs.source, start, pairs=pairs, objective=objective, **kwargs)


def couplings_tags(pairs: Ref) -> dict[str, str]:
    manifest = coupling_manifest(pairs)
    return {"gendag.couplings_hash": pairs.hash, "gendag.couplings_uri": pairs.uri,
            "gendag.couplings_solver": manifest["solver"], "gendag.couplings_nfe": f"{manifest['nfe']:g}"}
