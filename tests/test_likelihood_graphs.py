"""The exact-likelihood graphs end to end at tiny scale (real Prefect, Ray Train, DVC, MLflow):
normalizing flows on 2-D points, a 30-D table and the digits, and a continuous normalizing flow
scored by the ODE likelihood beside the mixture's own NLL."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from graph_runs import gendag, gendag_error

from models.checkpoint import SPEC_FILE
from models.data import DatasetSpec, load_dataset

pytestmark = pytest.mark.integration
INVERT, INVERT_COLD = "invert,temperature=1", "invert,temperature=0.8"


def _standard_normal_nll(points: np.ndarray) -> float:
    """Mean NLL of the points under N(0, I): where an untrained flow (the identity) starts."""
    return float(0.5 * (points.astype(np.float64) ** 2).sum(1).mean() + 0.5 * points.shape[1] * math.log(2 * math.pi))


def _run(workspace: Path, graph: str, config: str, *extra: str) -> dict:
    return gendag("run", graph, "-c", config, "--scale", "tiny", "--out", str(workspace / "runs" / config), *extra)


def _test_points(run: dict, examples: int = 100) -> np.ndarray:
    """The test points the tiny scale's likelihood is averaged over (its first 100)."""
    sizes = {} if run["dataset"] == "breast_cancer" else {"n_train": 2000, "n_test": 1000}
    return load_dataset(DatasetSpec(run["dataset"], **sizes)).test[:examples]


def test_realnvp_on_moons_learns_a_density_and_draws_a_heat_map(workspace: Path) -> None:
    run = _run(workspace, "realnvp", "realnvp/moons")
    m = run["metrics"]
    assert m["nll@exact"] < _standard_normal_nll(_test_points(run)) - 0.2 and m["nll_se@exact"] > 0
    assert m[f"w2@{INVERT}"] < m[f"w2@{INVERT},untrained"]
    assert m[f"nfe@{INVERT}"] == 4  # one pass through the 4 couplings of the tiny flow
    assert f"w2@{INVERT_COLD}" in m
    report = Path(run["report"])
    assert (report / "density.png").stat().st_size > 0 and (report / "scatter.png").exists()
    spec = json.loads((Path(run["model_uri"]) / SPEC_FILE).read_text())
    assert (spec["family"], spec["network"]) == ("normalizing_flow", "realnvp")


def test_maf_on_the_breast_cancer_table(workspace: Path) -> None:
    run = _run(workspace, "maf", "maf/breast-cancer")
    m = run["metrics"]
    assert m["nll@exact"] < _standard_normal_nll(_test_points(run))  # 30-D, standardized
    assert m[f"nfe@{INVERT}"] == 30 * 2  # sampling a MAF: one pass per dimension, 2 layers


def test_glow_on_the_digits_reports_bits_per_dim_and_fid(workspace: Path) -> None:
    run = _run(workspace, "glow", "glow/digits")
    m = run["metrics"]
    assert 0 < m["bpd@exact"] < 8 and m[f"fid@{INVERT}"] < m[f"fid@{INVERT},untrained"]
    assert (Path(run["report"]) / "samples.png").exists()


def test_cnf_reports_the_ode_likelihood_beside_the_mixture(workspace: Path) -> None:
    run = _run(workspace, "cnf", "cnf/eight-gaussians")
    m = run["metrics"]
    assert m["nll_floor"] < m["nll@ode"] < _standard_normal_nll(_test_points(run))
    assert m["nll_gap@ode"] == pytest.approx(m["nll@ode"] - m["nll_floor"]) and m["nll_gap_se@ode"] > 0
    assert m["w2@euler,nfe=4"] < m["w2@euler,nfe=4,untrained"]
    assert (Path(run["report"]) / "density.png").exists()


def test_two_flow_kinds_on_one_config_are_two_models(workspace: Path) -> None:
    """The graph names the flow: NICE and IAF with the same config values are different runs."""
    nice = _run(workspace, "nice", "nice/moons")
    iaf = gendag("run", "iaf", "-c", "iaf/moons", "--scale", "tiny", "--out", str(workspace / "runs" / "iaf"))
    assert nice["model_uri"] != iaf["model_uri"]
    assert iaf["metrics"][f"nfe@{INVERT}"] == 2  # IAF samples in one pass (a MAF would need 2 x 2)


def test_a_flow_with_an_ode_sampler_is_one_line(workspace: Path) -> None:
    line = gendag_error("run", "realnvp", "-c", "realnvp/moons", "--scale", "tiny",
                        "--set", "sample.samplers=[{method: euler, nfe: [4]}]",
                        "--out", str(workspace / "runs" / "bad"))
    assert "sample.samplers.0.method" in line and "velocity" in line and "normalizing flow provides" in line
