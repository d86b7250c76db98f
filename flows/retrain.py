"""Retraining: a challenger from the champion's own config, promoted only if it wins on the
champion's protocol.

    champion (registry) -> data version now (DVC) -- unchanged and not --force: done
                        -> the champion's graph, registered as `challenger` (no alias decided)
                        -> the champion re-scored on the new data version (when it changed)
                        -> decide (same protocol, margin) -> promote (one alias write) -> report

A retraining run writes `out/challenger/` (the graph's run folder), `out/champion/` (the
champion's new scores, when re-scored), `out/retrain.md` and `out/summary.json`.
"""

from __future__ import annotations

import json
from pathlib import Path

from flows.graphs import GRAPHS
from flows.summary import prefect_flow_run_id
from tasks.config import RunConfig
from tasks.data import version_dataset
from tasks.infra import Ref
from tasks.promote import (Champion, best_score, decide, promote, protocol_differences, publish_report,
                           report_markdown)


def challenger_entry(summary: dict, name: str) -> dict:
    """The version a graph run registered under `name` (its last stage, or any earlier one)."""
    entries = [{**summary["registered_model"], "run_id": summary["mlflow_run_id"]}]
    entries += [{"name": s["name"], "version": s["version"], "run_id": s["mlflow_run_id"]} for s in summary.get("stages", [])]
    found = next((e for e in entries if e["name"] == name), None)
    if found is None:
        raise RuntimeError(f"the retrained graph registered no model named {name}")
    return found


def retrain(cfg: RunConfig, out: Path, champion: Champion, rescore: tuple[RunConfig, Ref, dict], force: bool) -> dict:
    """The retraining flow body (see the module docstring); `rescore`: the champion's own
    evaluation config, its model folder and version, to score it again on new data."""
    data = version_dataset(cfg.data, cfg.seed)
    summary = {"graph": "retrain", "name": champion.name, "dataset": cfg.data.name, "data_hash": data.hash,
               "champion": {"version": champion.version, "data_hash": champion.data_hash,
                            champion.score_name: champion.score},
               "prefect_flow_run_id": prefect_flow_run_id()}
    if data.hash == champion.data_hash and not force:
        summary["decision"] = {"retrained": False, "promoted": False,
                               "reason": f"data version {data.hash} unchanged since v{champion.version} (--force retrains anyway)"}
        return _write(out, summary)
    graph = GRAPHS[cfg.graph].flow()(cfg, out / "challenger")
    entry = challenger_entry(graph, champion.name)
    from mlflow import MlflowClient

    metrics = MlflowClient().get_run(entry["run_id"]).data.metrics
    challenger = {**entry, "alias": cfg.registry.alias, "score": metrics[champion.score_name]}
    differences = protocol_differences(champion.graph_tree, cfg.model_dump(mode="json"))
    champion_score, rescored = champion.score, None
    if not differences and data.hash != champion.data_hash:
        from prefect import flow

        from flows.pipeline import resample

        eval_cfg, model, version = rescore
        scored = flow(name="sample", validate_parameters=False)(resample)(eval_cfg, out / "champion", model, version)
        champion_score, rescored = best_score(scored["metrics"], champion.score_name), scored["mlflow_run_id"]
    decision = decide(champion_score, challenger["score"], cfg.registry.promotion_margin, champion.score_name,
                      differences)
    if decision.promote:
        promote(champion.name, challenger["version"], champion.alias, champion.version)
    text = report_markdown(champion, challenger, champion_score, rescored, data.hash, decision,
                           cfg.registry.promotion_margin)
    report = publish_report(text, out, challenger["run_id"])
    summary["champion"]["score_on_challenger_protocol"] = champion_score
    summary["challenger"] = challenger
    summary["decision"] = {"retrained": True, "promoted": decision.promote, "reason": decision.reason,
                           "report": str(report)}
    return _write(out, summary)


def _write(out: Path, summary: dict) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
