"""Champion / challenger: a retrained model against the champion, on one protocol.

`gendag retrain` (flows/retrain.py) trains a challenger from the champion's logged config; these
are its steps of real work: find the champion, say whether two configs score models the same
way (`protocol_differences`), decide by a margin, move the alias, and write the report.

Promotion is one alias write (`set_registered_model_alias`, a single row in the registry's
database): before it the old champion holds the alias, after it the new one does, so a crash
at any point leaves a champion whose version is READY and whose metrics are logged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.infra import RunError, flatten

#: The config sections that decide what a score means: the reference data (and its split), the
#: samples (count, sets, sampler grid, seeds) and the evaluation (feature network, likelihoods).
PROTOCOL_SECTIONS = ("seed", "data", "sample", "evaluate")
#: Settings inside them that change where the work runs, not its numbers.
NOT_PROTOCOL = {"sample.num_workers", "sample.device"}


@dataclass(frozen=True)
class Champion:
    """The version that holds the champion alias, and how it was scored."""

    name: str
    version: int
    run_id: str
    alias: str
    data_hash: str | None  # the DVC version of the data it was trained and scored on
    score_name: str  # e.g. best_fid
    score: float | None
    tree: dict  # the config its training run logged
    graph_tree: dict  # the config of the graph that made it (its parent run's, for a stage of a multi-stage graph)


class PromotionError(RunError):
    """A retraining that cannot start or compare, phrased as one line."""


def find_champion(name: str, alias: str = "champion") -> Champion:
    """The version of registered model `name` at `alias`, its score and its logged config."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from tasks.registry import fetch_model_version

    client = MlflowClient()
    try:
        version = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        raise PromotionError(f"models:/{name}@{alias}: the registry has no such model and alias; "
                             f"`gendag run` registers one first") from None
    _, _, tree = fetch_model_version(f"models:/{name}/{version.version}")
    score_name = next((k for k in version.tags if k.startswith("best_")), None)
    if score_name is None:
        raise PromotionError(f"models:/{name}/{version.version}: its version has no best_<metric> tag to compare by")
    run = client.get_run(version.run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    graph_tree = client.download_artifacts(parent, "config.json") if parent else None
    graph_tree = json.loads(Path(graph_tree).read_text()) if graph_tree else tree
    return Champion(name, int(version.version), version.run_id, alias, version.tags.get("gendag.data_hash"),
                    score_name, run.data.metrics.get(score_name), tree, graph_tree)


def protocol(tree: dict) -> dict[str, object]:
    """The evaluation protocol of a config tree, flattened to `section.key` -> value."""
    flat = flatten({k: tree.get(k) for k in PROTOCOL_SECTIONS})
    return {k: v for k, v in flat.items() if k not in NOT_PROTOCOL}


def protocol_differences(champion: dict, challenger: dict) -> list[str]:
    """Where two configs score differently, one phrase per setting (empty: the same protocol)."""
    a, b = protocol(champion), protocol(challenger)
    return [f"{key}: {json.dumps(a.get(key))} (champion) vs {json.dumps(b.get(key))} (challenger)"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


def best_score(metrics: dict[str, float], score_name: str) -> float:
    """`best_<metric>` of a run's metrics: the lowest `<metric>@<setting>` of the trained model."""
    metric = score_name.removeprefix("best_")
    scores = [v for k, v in metrics.items() if k.startswith(f"{metric}@") and "untrained" not in k]
    if not scores:
        raise PromotionError(f"no {metric}@<sampler> metric to compare by")
    return min(scores)


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(champion: float | None, challenger: float, margin: float, score_name: str,
           differences: list[str]) -> Decision:
    """Promote when the challenger is lower than the champion by at least `margin` (relative:
    0.05 asks for 5 % better), on the same protocol; never across protocols."""
    if differences:
        return Decision(False, f"not compared: the protocols differ ({'; '.join(differences)})")
    if champion is None or not math.isfinite(champion):
        return Decision(True, f"the champion has no finite {score_name}")
    bar = champion * (1 - margin)
    if challenger < bar:
        return Decision(True, f"{score_name} {challenger:.5g} < {bar:.5g} = champion {champion:.5g} x (1 - margin {margin:g})")
    return Decision(False, f"{score_name} {challenger:.5g} is not below {bar:.5g} = champion {champion:.5g} x (1 - margin {margin:g})")


@task(name="promote", cache_policy=NO_CACHE)
def promote(name: str, version: int, alias: str, previous: int) -> None:
    """Point `alias` at `version` (one registry write) and tag the version with what it replaced."""
    from mlflow import MlflowClient

    client = MlflowClient()
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), "gendag.promoted_over", str(previous))


def report_markdown(champion: Champion, challenger: dict, champion_score: float | None, rescored: str | None,
                    data_hash: str, decision: Decision, margin: float) -> str:
    """What was compared, the numbers, and why the challenger was or was not promoted."""
    def fmt(value):
        return "-" if value is None else f"{value:.5g}"

    verdict = (f"**promoted**: `{champion.alias}` moved to v{challenger['version']}" if decision.promote
               else f"**not promoted**: v{challenger['version']} stays `{challenger['alias']}`, "
                    f"`{champion.alias}` stays on v{champion.version}")
    data_note = ("unchanged" if data_hash == champion.data_hash
                 else f"changed: {champion.data_hash} -> {data_hash}")
    lines = [
        f"# Retraining `{champion.name}`", "",
        verdict, "", f"Why: {decision.reason}.", "",
        f"| | version | MLflow run | trained on data | {champion.score_name} as registered | "
        f"{champion.score_name} compared (data {data_hash}) |",
        "|---|---|---|---|---|---|",
        f"| champion (before) | v{champion.version} | {champion.run_id} | {champion.data_hash} | "
        f"{fmt(champion.score)} | {fmt(champion_score)} |",
        f"| challenger | v{challenger['version']} | {challenger['run_id']} | {data_hash} | "
        f"{fmt(challenger['score'])} | {fmt(challenger['score'])} |", "",
        f"- data: {data_note}",
        f"- the champion's score: " + (f"re-scored on the new data version with its own protocol (MLflow run {rescored})"
                                       if rescored else "as recorded (same data version and protocol)"),
        f"- margin: {margin:g} (relative; lower is better)",
        f"- protocol: {', '.join(PROTOCOL_SECTIONS)} sections of the config, "
        "compared key by key (the reference split, sample count and sets, sampler grid, feature network, seeds)",
    ]
    return "\n".join(lines) + "\n"


def publish_report(text: str, folder: Path, run_id: str) -> Path:
    """The report as `retrain.md` in `folder`, an MLflow artifact of `run_id` and a Prefect artifact."""
    from mlflow import MlflowClient
    from prefect.artifacts import create_markdown_artifact

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "retrain.md"
    path.write_text(text)
    MlflowClient().log_artifact(run_id, str(path), artifact_path="report")
    create_markdown_artifact(text, key="retrain-report", description="champion / challenger decision")
    return path
