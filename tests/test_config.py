"""Config validation: every mistake is one line naming the key and what was expected."""

from pathlib import Path

import pytest

from tasks.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MOONS = CONFIGS / "flow-matching" / "gaussians-to-moons.yaml"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.name)
@pytest.mark.parametrize("scale", ["tiny", "cpu", "paper"])
def test_shipped_configs_validate_at_every_scale(path: Path, scale: str) -> None:
    cfg = load_config(path, scale)
    assert cfg.graph == "flow-matching"


def test_scale_overlay_and_overrides_apply_in_order() -> None:
    assert load_config(MOONS, "cpu").train.steps == 3000
    assert load_config(MOONS, "tiny").train.steps == 1000
    cfg = load_config(MOONS, "tiny", ["train.steps=7", "coupling.kind=minibatch_ot", "sample.solvers=[{method: rk4, nfe: [4]}]"])
    assert (cfg.train.steps, cfg.coupling.kind, cfg.sample.solvers[0].nfe) == (7, "minibatch_ot", [4])


def test_digest_changes_with_numbers_only_when_values_change() -> None:
    a, b = load_config(MOONS), load_config(MOONS)
    assert a.digest() == b.digest()
    assert a.digest() != load_config(MOONS, overrides=["seed=1"]).digest()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.stepz=3"], "train.stepz: unknown key; valid keys: steps, batch_size"),
        (["train.steps=-1"], "train.steps: got -1; input should be greater than 0"),
        (["train.lr=abc"], "train.lr: got 'abc'"),
        (["model.network=resnet"], "model.network: got 'resnet'; input should be 'mlp' or 'unet'"),
        (["data.name=mnistt"], "data.name: got 'mnistt'; input should be 'moons'"),
        (["data.name=npy"], "data: dataset 'npy' needs a path"),
        (["sample.solvers=[{method: rk4}]"], "sample.solvers.0: solver 'rk4' needs a list of nfe"),
        (["sample.solvers=[{method: dopri5, nfe: [4]}]"], "solver 'dopri5' is adaptive"),
        (["train.ema_decay=1.5"], "train.ema_decay: got 1.5"),
        (["name=a b"], "name: 'a b' must be letters"),
        (["train.steps"], "--set 'train.steps': expected key=value"),
        (["train.steps.x=1"], "train.steps.x: 'steps' is a value, not a section"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(MOONS, "cpu", overrides)
    text = str(err.value)
    assert message in text and "\n" not in text


def test_bad_files_and_scales(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")
    with pytest.raises(ConfigError, match="--scale 'huge'"):
        load_config(MOONS, "huge")
    (tmp_path / "scales.yaml").write_text(MOONS.read_text() + "\n  gpu: {seed: 1}\n")
    with pytest.raises(ConfigError, match="scales.gpu: unknown scale"):
        load_config(tmp_path / "scales.yaml")
