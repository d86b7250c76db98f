"""Config validation: every mistake is one line naming the key and what was expected."""

from pathlib import Path

import pytest

from flows.graphs import GRAPHS
from tasks.config import ConfigError, schemas
from tasks.config_loading import load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MOONS = CONFIGS / "flow-matching" / "gaussians-to-moons.yaml"
DDPM = CONFIGS / "ddpm" / "moons.yaml"


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.rglob("*.yaml") if p.parent.name != "tables"),  # tables: test_tables
                         ids=lambda p: str(p.relative_to(CONFIGS)))
@pytest.mark.parametrize("scale", ["tiny", "cpu", "paper"])
def test_shipped_configs_validate_at_every_scale(path: Path, scale: str) -> None:
    cfg = load_config(path, scale)
    # a graph's configs live under configs/<graph>/ (sets of them in subfolders, e.g. flow-matching/cfm-2d/)
    assert cfg.graph == path.relative_to(CONFIGS).parts[0] and isinstance(cfg, GRAPHS[cfg.graph].schema)


def test_every_graph_has_a_schema_and_its_shipped_configs() -> None:
    assert set(GRAPHS) == set(schemas())
    for graph in GRAPHS.values():
        for name in (graph.default_config, *graph.configs):
            assert load_config(CONFIGS / f"{name}.yaml").graph == graph.name


def test_dvc_yaml_is_written_from_the_graph_registry() -> None:
    from flows.dvc_stages import dvc_yaml

    assert (CONFIGS.parent / "dvc.yaml").read_text() == dvc_yaml(), "run `gendag dvc` after changing GRAPHS"


def test_scale_overlay_and_overrides_apply_in_order() -> None:
    assert load_config(MOONS, "cpu").train.steps == 3000
    assert load_config(MOONS, "tiny").train.steps == 1000
    cfg = load_config(MOONS, "tiny", ["train.steps=7", "coupling.kind=minibatch_ot", "sample.samplers=[{method: rk4, nfe: [4]}]"])
    assert (cfg.train.steps, cfg.coupling.kind, cfg.sample.samplers[0].nfe) == (7, "minibatch_ot", [4])


def test_digest_changes_with_numbers_only_when_values_change() -> None:
    a, b = load_config(MOONS), load_config(MOONS)
    assert a.digest() == b.digest()
    assert a.digest() != load_config(MOONS, overrides=["seed=1"]).digest()


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        (MOONS, ["train.stepz=3"], "train.stepz: unknown key; valid keys: steps, batch_size"),
        (MOONS, ["train.steps=-1"], "train.steps: got -1; input should be greater than 0"),
        (MOONS, ["train.lr=abc"], "train.lr: got 'abc'"),
        (MOONS, ["model.network=resnet"], "model.network: got 'resnet'; input should be 'mlp' or 'unet'"),
        (MOONS, ["data.name=mnistt"], "data.name: got 'mnistt'; input should be 'moons'"),
        (MOONS, ["data.name=npy"], "data: dataset 'npy' needs a path"),
        (MOONS, ["sample.samplers=[{method: rk4}]"], "sample.samplers.0.nfe: sampler 'rk4' needs a list of NFE"),
        (MOONS, ["sample.samplers=[{method: dopri5, nfe: [4]}]"], "sampler 'dopri5' is adaptive"),
        (MOONS, ["sample.samplers=[{method: heun, nfe: [3]}]"], "sample.samplers.0.nfe: sampler 'heun' uses 2 evaluations per step"),
        (MOONS, ["sample.samplers=[{method: dopri5, atol: -1}]"], "sample.samplers.0.atol: got -1; expected a number in"),
        (MOONS, ["sample.samplers=[{method: leapfrog, nfe: [2]}]"], "unknown sampler 'leapfrog'; expected one of ancestral, annealed_langevin, consistency, ddim"),
        (MOONS, ["sample.samplers=[{method: ddim, nfe: [4]}]"], "sample.samplers.0.method: sampler 'ddim' needs a Gaussian source"),
        (MOONS, ["sample.samplers=[]"], "sample.samplers: got []"),
        (MOONS, ["path.scheduler=vp", "path.betas=1"], "--set 'path.betas=1': path.betas: unknown key; valid keys: scheduler, beta_min, beta_max"),
        (MOONS, ["path.scheduler=ddpm", "path.beta_schedule=quadratic"], "path.beta_schedule: got 'quadratic'; input should be 'linear' or 'cosine'"),
        (MOONS, ["path.scheduler=warp"], "path.scheduler: got 'warp'; expected one of 'cond_ot', 'vp', 've', 'ddpm'"),
        (MOONS, ["train.steps=true"], "train.steps: got True; input should be a valid integer"),
        (MOONS, ["=5"], "--set '=5': '' is not a key"),
        (MOONS, ["graph=ddpm"], "path.scheduler: got 'cond_ot'; input should be 'ddpm'"),
        (MOONS, ["name=.."], "name: '..' must be letters"),
        (MOONS, ["train.ema_decay=1.5"], "train.ema_decay: got 1.5"),
        (MOONS, ["name=a b"], "name: 'a b' must be letters"),
        (MOONS, ["train.steps"], "--set 'train.steps': expected key=value"),
        (MOONS, ["train.steps.x=1"], "train.steps.x: 'steps' is a value, not a section"),
        # a DDPM config (tiny scale: 100 steps) checks its own keys
        (DDPM, ["sample.samplers=[{method: ddim, nfe: [1000]}]"], "sample.samplers.0.nfe: 1000 steps exceed the model's 100 training steps"),
        (DDPM, ["sample.samplers=[{method: ddim, nfe: [10], etaa: 1}]"], "sample.samplers.0.etaa: unknown key for sampler 'ddim'; valid keys: nfe, eta, spacing"),
        (DDPM, ["sample.samplers=[{method: ddim, nfe: [10], eta: [0, 2]}]"], "sample.samplers.0.eta: got 2; expected a number in [0.0, 1.0]"),
        (DDPM, ["sample.samplers=[{method: ancestral, nfe: [10], variance: huge}]"], "variance: got 'huge'; expected one of small, large"),
        (DDPM, ["path.betas=foo"], "path.betas: unknown key; valid keys: scheduler, beta_schedule, timesteps"),
        (DDPM, ["path.scheduler=vp"], "path.scheduler: got 'vp'; input should be 'ddpm'"),
        (DDPM, ["source.name=moons"], "source: unknown key"),
        (DDPM, ["model.parameterization=velocity"], "model.parameterization: got 'velocity'; graph 'ddpm' trains one of epsilon, v, x1"),
        (DDPM, ["evaluate.likelihood=[exakt]"], "evaluate.likelihood: unknown likelihood 'exakt'"),
        (DDPM, ["evaluate.likelihood=[exact]"], "evaluate.likelihood: 'exact' needs a model that provides log_prob"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(config, overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(config, "tiny" if config == DDPM else "cpu", overrides)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_bad_files_and_scales(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("graph: ddpm\nname: x\na: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML at line 4"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "nograph.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="graph: required key is missing; expected one of cnf, consistency-distillation, consistency-training, ddim, ddpm, flow-matching, glow"):
        load_config(tmp_path / "nograph.yaml")
    (tmp_path / "badscales.yaml").write_text(MOONS.read_text().replace("  tiny:\n", "  tiny: 5\n  xtiny:\n", 1))
    with pytest.raises(ConfigError, match="scales: expected a mapping"):
        load_config(tmp_path / "badscales.yaml")
    with pytest.raises(ConfigError, match="--scale 'huge'"):
        load_config(MOONS, "huge")
    (tmp_path / "scales.yaml").write_text(MOONS.read_text() + "\n  gpu: {seed: 1}\n")
    with pytest.raises(ConfigError, match="scales.gpu: unknown scale"):
        load_config(tmp_path / "scales.yaml")




def test_typed_scheduler_settings_and_sampler_grids_are_accepted() -> None:
    cfg = load_config(DDPM, "tiny", ["path.beta_schedule=cosine", "sample.samplers=[{method: ddim, nfe: [4, 10], eta: [0, 0.5, 1]}]"])
    assert cfg.path.beta_schedule == "cosine" and cfg.sample.samplers[0].params == {"eta": [0, 0.5, 1]}
    fm = load_config(MOONS, "tiny", ["path.scheduler=ve", "path.sigma_max=80", "source.name=gaussian",
                                     "sample.samplers=[{method: ddim, nfe: [4]}]"])
    assert fm.model_spec((2,)).scheduler_kwargs == {"sigma_min": 0.01, "sigma_max": 80.0}
    with pytest.raises(ConfigError, match="evaluate.likelihood: 'ddpm_bound' needs a discrete-time"):
        load_config(MOONS, "tiny", ["evaluate.likelihood=[ddpm_bound]"])
