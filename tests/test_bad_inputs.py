"""Bad inputs through the real `gendag` command line: each is refused up front (issue 9).

Every case runs `gendag run` (or `gendag sample`) in-process with typer's CliRunner, in a fresh
workspace (GENDAG_HOME) that is also the working directory, and checks what a user sees and
what is left behind:

- exit code 2, nothing on stdout and exactly one line on stderr, naming the file, key or value;
- nothing written: the whole temporary tree (workspace, inputs, output folders) is unchanged, so
  no run folder, no data/ version, no mlflow.db, no .dvc file and no Prefect home were made;
- no service started: no child process appeared and the case took well under 10 s (Prefect's
  server and Ray each take longer than that to boot here).

The bad data files are written by the `inputs` fixture. Two cases go through the installed
`gendag` script in a subprocess, to time the whole command, imports included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MOONS = CONFIGS / "flow-matching" / "gaussians-to-moons.yaml"
TOO_MANY = 4096  # workers: more CPUs (or GPUs) than any machine running these tests has
GPU = pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA GPU")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """One of every kind of bad input file or folder."""
    d = tmp_path_factory.mktemp("inputs")
    np.save(d / "nan.npy", np.array([[0.0, 1.0], [np.nan, 2.0]] * 10))
    np.save(d / "inf.npy", np.array([[0.0, 1.0], [3.0, -np.inf]] * 10))
    np.save(d / "empty.npy", np.zeros((0, 2)))
    np.save(d / "one.npy", np.zeros((1, 2)))
    np.save(d / "flat.npy", np.zeros(10))
    np.save(d / "wide.npy", np.zeros((5, 1, 2, 2, 2)))
    np.save(d / "objects.npy", np.array([[1, "a"], [None, 2]], dtype=object), allow_pickle=True)
    np.save(d / "strings.npy", np.array([["a", "b"], ["c", "d"]]))
    np.save(d / "huge.npy", np.full((10, 2), 1e300))
    np.save(d / "bright.npy", np.full((4, 1, 5, 5), 3.0))
    np.save(d / "good.npy", np.zeros((1000, 2)))
    (d / "truncated.npy").write_bytes((d / "good.npy").read_bytes()[:3000])
    (d / "text.npy").write_text("x,y\n1,2\n3,4\n")
    np.savez(d / "archive.npz", a=np.zeros((4, 2)))
    (d / "archive.npz").rename(d / "archive.npy")
    rng = np.random.default_rng(0)
    for folder in ("corrupt", "cut-png", "cut-jpg", "mixed"):
        (d / folder).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(d / folder / f"{i}.png")
    (d / "corrupt" / "1.png").write_bytes(b"not a png at all")
    png = (d / "cut-png" / "2.png").read_bytes()
    (d / "cut-png" / "2.png").write_bytes(png[: len(png) // 2])
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / "cut-jpg" / "x.jpg", quality=90)
    jpg = (d / "cut-jpg" / "x.jpg").read_bytes()
    (d / "cut-jpg" / "x.jpg").write_bytes(jpg[: len(jpg) // 2])
    Image.new("L", (7, 6)).save(d / "mixed" / "b.png")
    (d / "no-images").mkdir()
    (d / "no-images" / "notes.txt").write_text("no pictures here")
    (d / "plain-file").write_text("a file where a folder should be")
    (d / "broken.yaml").write_text("graph: flow-matching\nname: x\ndata: {name: moons}\ntrain: [1,\n")
    (d / "list.yaml").write_text("- graph\n- name\n")
    text = MOONS.read_text()
    (d / "bad-scales.yaml").write_text(text.replace("  tiny:\n", "  tiny: 5\n  xtiny:\n", 1))
    (d / "gpu-scale.yaml").write_text(text + "\n  gpu: {seed: 1}\n")
    return d


def npy(name: str) -> list[str]:
    return ["--set", "data.name=npy", "--set", f"data.path={{in}}/{name}"]


def folder(name: str) -> list[str]:
    return ["--set", "data.name=image_folder", "--set", f"data.path={{in}}/{name}"]


def case(name: str, args: list[str], expect: list[str], env: dict[str, str] | None = None, marks=()):
    return pytest.param(args, expect, env or {}, id=name, marks=marks)


RUN = ["run", "flow-matching"]
# case(id, arguments ({in}: the inputs folder), what the one line must contain, environment)
CASES = [
    # the command line and the config file
    case("unknown-graph", ["run", "gan"], ["graph 'gan': expected one of", "flow-matching"]),
    case("missing-config", RUN + ["-c", "nosuch"], ["--config nosuch: no such file"]),
    case("yaml-error-line", RUN + ["-c", "{in}/broken.yaml"], ["broken.yaml: not valid YAML at line 5"]),
    case("yaml-not-a-mapping", RUN + ["-c", "{in}/list.yaml"], ["list.yaml: expected a mapping"]),
    case("malformed-scales", RUN + ["-c", "{in}/bad-scales.yaml"], ["bad-scales.yaml: scales: expected a mapping"]),
    case("unknown-scale-in-file", RUN + ["-c", "{in}/gpu-scale.yaml"], ["scales.gpu: unknown scale"]),
    case("unknown-scale", RUN + ["--scale", "huge"], ["--scale 'huge': expected one of tiny, cpu, paper"]),
    case("graph-mismatch", ["run", "ddpm", "-c", "flow-matching/digits"], ["graph: got 'flow-matching'", "gendag run flow-matching"]),
    case("same-out-twice", RUN + ["-c", "flow-matching/digits", "-c", "flow-matching/digits"], ["two configs would write to the same folder"]),
    case("set-empty-key", RUN + ["--set", "=5"], ["--set '=5': '' is not a key"]),
    case("set-without-value", RUN + ["--set", "train.steps"], ["--set 'train.steps': expected key=value"]),
    case("set-bad-yaml", RUN + ["--set", "train.steps=[1"], ["--set 'train.steps=[1': the value is not valid YAML"]),
    case("set-into-a-value", RUN + ["--set", "train.steps.x=1"], ["train.steps.x: 'steps' is a value, not a section"]),
    case("unknown-key", RUN + ["--set", "train.stepz=3"], ["--set 'train.stepz=3': train.stepz: unknown key; valid keys: steps"]),
    case("unknown-section-key", RUN + ["--set", "sample.solvers=[]"], ["--set 'sample.solvers=[]': sample.solvers: unknown key"]),
    # strict types and values
    case("steps-boolean", RUN + ["--set", "train.steps=true"], ["train.steps: got True; input should be a valid integer"]),
    case("steps-negative", RUN + ["--set", "train.steps=-1"], ["train.steps: got -1; input should be greater than 0"]),
    case("steps-float", RUN + ["--set", "train.steps=1e3"], ["train.steps: got '1e3'"]),
    case("lr-boolean", RUN + ["--set", "train.lr=true"], ["train.lr: got True; expected a number, not a boolean"]),
    case("gpu-flag-integer", RUN + ["--set", "train.use_gpu=1"], ["train.use_gpu: got 1; input should be a valid boolean"]),
    case("seed-too-large", RUN + ["--set", "seed=1099511627776"], ["seed: got 1099511627776", "less than or equal to 4294967295"]),
    case("name-dots", RUN + ["--set", "name=.."], ["--set 'name=..': name: '..' must be letters"]),
    case("name-space", RUN + ["--set", "name=a b"], ["name: 'a b' must be letters"]),
    case("model-name-slash", RUN + ["--set", "registry.model_name=a/b c"], ["registry.model_name: 'a/b c' must be letters"]),
    case("alias-reserved", RUN + ["--set", "registry.alias=latest"], ["registry.alias: 'latest' is reserved by MLflow"]),
    case("alias-version", RUN + ["--set", "registry.champion_alias=v3"], ["registry.champion_alias: 'v3' is reserved"]),
    case("aliases-equal", RUN + ["--set", "registry.alias=champion"], ["--set 'registry.alias=champion': registry: alias and champion_alias are both"]),
    case("experiment-empty", RUN + ["--set", "registry.experiment="], ["registry.experiment: got None"]),
    case("samplers-empty", RUN + ["--set", "sample.samplers=[]"], ["sample.samplers: got []"]),
    case("sampler-unknown", RUN + ["--set", "sample.samplers=[{method: leapfrog, nfe: [2]}]"], ["unknown sampler 'leapfrog'"]),
    case("sampler-needs-gaussian", RUN + ["--set", "sample.samplers=[{method: ddim, nfe: [4]}]"], ["sampler 'ddim' needs a Gaussian source"]),
    case("sampler-needs-sde", RUN + ["-c", "flow-matching/digits", "--set", "sample.samplers=[{method: euler_maruyama, nfe: [4]}]"],
         ["sampler 'euler_maruyama' needs a path with a forward SDE", "'cond_ot' path"]),
    case("sampler-needs-noise-levels", ["run", "score-sde", "-c", "score-sde/vp", "--set",
                                        "sample.samplers=[{method: annealed_langevin, nfe: [10]}]"],
         ["sampler 'annealed_langevin' needs noise levels above zero", "'vp' path"]),
    case("scheduler-unknown", RUN + ["--set", "path.scheduler=warp"], ["path.scheduler: got 'warp'"]),
    case("npy-without-path", RUN + ["--set", "data.name=npy"], ["--set 'data.name=npy': data: dataset 'npy' needs a path"]),
    # data files
    case("npy-nan", RUN + npy("nan.npy"), ["data.path:", "nan.npy holds 10 NaN and 0 infinite values (first in item 1)"]),
    case("npy-inf", RUN + npy("inf.npy"), ["inf.npy holds 0 NaN and 10 infinite values"]),
    case("npy-float32-overflow", RUN + npy("huge.npy"), ["huge.npy holds values float32 cannot hold"]),
    case("npy-empty", RUN + npy("empty.npy"), ["empty.npy has shape (0, 2): 0 item(s) — need at least 2"]),
    case("npy-one-item", RUN + npy("one.npy"), ["one.npy has shape (1, 2): 1 item(s)"]),
    case("npy-1d", RUN + npy("flat.npy"), ["flat.npy has shape (10,) — expected (N, d) points"]),
    case("npy-5d", RUN + npy("wide.npy"), ["wide.npy has shape (5, 1, 2, 2, 2)"]),
    case("npy-objects", RUN + npy("objects.npy"), ["objects.npy holds Python objects (dtype object)"]),
    case("npy-strings", RUN + npy("strings.npy"), ["strings.npy has dtype <U1 — expected numbers"]),
    case("npy-is-text", RUN + npy("text.npy"), ["text.npy is not a .npy file: it is text starting 'x,y'"]),
    case("npy-is-npz", RUN + npy("archive.npy"), ["archive.npy is not a .npy file: it is a zip archive"]),
    case("npy-truncated", RUN + npy("truncated.npy"), ["truncated.npy is truncated: 3000 bytes"]),
    case("npy-missing", RUN + npy("nosuch.npy"), ["nosuch.npy does not exist"]),
    case("npy-images-out-of-range", RUN + npy("bright.npy"), ["bright.npy float images span [3, 3] — expected [-1, 1] or uint8"]),
    case("n-test-too-large", RUN + ["--set", "data.name=digits", "--set", "data.n_test=5000", "--set", "source.name=gaussian"],
     ["--set 'data.n_test=5000': data.n_test: 5000 must be between 1 and 1796: dataset digits has 1797 items"]),
    case("image-corrupt", RUN + folder("corrupt"), ["corrupt/1.png cannot be decoded as an image"]),
    case("image-truncated-png", RUN + folder("cut-png"), ["cut-png/2.png cannot be decoded as an image (image file is truncated)"]),
    case("image-truncated-jpeg", RUN + folder("cut-jpg"), ["cut-jpg/x.jpg cannot be decoded as an image"]),
    case("image-sizes-differ", RUN + folder("mixed"), ["b.png is 7x6 but 0.png is 16x16"]),
    case("image-folder-empty", RUN + folder("no-images"), ["no-images holds no .png/.jpg/.jpeg images"]),
    case("image-folder-is-a-file", RUN + folder("plain-file"), ["plain-file is not a folder"]),
    case("mnist-files-missing", RUN + ["--set", "data.name=mnist", "--set", "data.path={in}"],
     ["--set 'data.path=", "data.path: mnist file train-images-idx3-ubyte not found", "`download: true`"]),
    case("source-nan", RUN + ["--set", "source.name=npy", "--set", "source.path={in}/nan.npy"], ["source.path:", "nan.npy holds 10 NaN"]),
    case("source-shape-differs", RUN + ["--set", "data.name=digits"],
     ["source: eight_gaussians items have shape (2,) but the data's (digits) have shape (1, 8, 8)"]),
    # network and method keyword arguments
    case("network-unknown-kwarg", RUN + ["--set", "model.kwargs.bogus=1"],
     ["--set 'model.kwargs.bogus=1': model.kwargs.bogus: not an argument of network 'mlp'; valid: hidden, layers, time_dim"]),
    case("network-bad-value", RUN + ["--set", "model.kwargs.layers=1"], ["--set 'model.kwargs.layers=1': model: network 'mlp' cannot be built", "MLP needs layers >= 2"]),
    case("network-bad-type", RUN + ["--set", "model.kwargs.hidden=wide"], ["model: network 'mlp' cannot be built", "'hidden': 'wide'"]),
    case("unet-groups", RUN + ["-c", "flow-matching/digits", "--set", "model.kwargs.groups=5"], ["must be multiples of groups=5"]),
    case("unet-on-points", RUN + ["--set", "model.network=unet"], ["--set 'model.network=unet': model: network 'unet' cannot be built", "unet needs data_shape (channels, height, width), got (2,)"]),
    case("coupling-unknown-kwarg", RUN + ["--set", "coupling.kind=minibatch_ot", "--set", "coupling.kwargs.epsilon=1"],
     ["coupling.kwargs.epsilon: not an argument of coupling 'minibatch_ot'; valid: method, reg"]),
    case("coupling-bad-value", RUN + ["--set", "coupling.kind=minibatch_ot", "--set", "coupling.kwargs.method=greedy"],
     ["coupling: coupling 'minibatch_ot' cannot be built with {'method': 'greedy'} (unknown OT method 'greedy'"]),
    # resources
    case("train-workers-vs-cpus", RUN + ["--set", f"train.num_workers={TOO_MANY}"], [f"train.num_workers: {TOO_MANY} workers need {TOO_MANY} CPUs"]),
    case("sample-workers-vs-cpus", RUN + ["--set", f"sample.num_workers={TOO_MANY}"], [f"sample.num_workers: {TOO_MANY} workers need"]),
    case("gpu-without-gpu", RUN + ["--set", "train.use_gpu=true"], ["train.use_gpu: asks for a CUDA GPU; this machine has none"], marks=GPU),
    case("cuda-sampling-without-gpu", RUN + ["--set", "sample.device=cuda"], ["sample.device: asks for a CUDA GPU"], marks=GPU),
    case("paper-scale-here", RUN + ["--scale", "paper"], ["train.use_gpu: asks for a CUDA GPU"], marks=GPU),
    # memory
    case("samples-beyond-memory", RUN + ["--set", "sample.n_samples=1000000000000"], ["sample.n_samples:", "need 64 TB of memory"]),
    case("w2-beyond-memory", RUN + ["--set", "sample.n_samples=1000000"], ["sample.n_samples: exact W2 of 1000000 samples"]),
    case("data-beyond-memory", RUN + ["--set", "data.n_train=100000000000"], ["data.n_train: 100000010000 moons points need"]),
    case("network-beyond-memory", RUN + ["--set", "model.kwargs.hidden=1000000"], ["model.kwargs: 2 training worker(s)", "parameters, need"]),
    case("batch-beyond-memory", RUN + ["--set", "train.batch_size=10000000000"], ["train.batch_size: batches of 10000000000 items"]),
    # output folder
    case("out-is-a-file", RUN + ["--out", "{in}/plain-file"], ["output folder", "plain-file is a file, not a folder; choose another with --out"]),
    case("out-under-a-file", RUN + ["--out", "{in}/plain-file/run"], ["plain-file is a file, not a folder"]),
    case("out-not-writable", RUN + ["--out", "/proc/gendag-run"], ["output folder /proc/gendag-run: cannot write in /proc"], marks=pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux's /proc")),
    case("workspace-is-a-file", RUN, ["workspace (GENDAG_HOME)", "plain-file is a file, not a folder"],
         env={"GENDAG_HOME": "{in}/plain-file"}),
    # gendag sample
    case("sample-bad-sampler-yaml", ["sample", "models:/m@champion", "--sampler", "{method: ddim, nfe: [10"], ["--sampler", "not valid YAML"]),
    case("sample-without-registry", ["sample", "models:/gendag-x@champion"], ["models:/gendag-x@champion: no MLflow registry here"]),
]


@pytest.fixture
def workspace_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty workspace that is also the working directory; no service configured."""
    ws = tmp_path / "ws"
    ws.mkdir()
    monkeypatch.chdir(ws)
    monkeypatch.setenv("GENDAG_HOME", str(ws))
    monkeypatch.setenv("PREFECT_HOME", str(ws / ".gendag" / "prefect"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{ws / 'mlflow.db'}")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ws


def tree(*roots: Path) -> dict[str, int]:
    """Every file and folder under `roots` (path -> size; -1 for a folder)."""
    return {str(p): (-1 if p.is_dir() else p.stat().st_size) for root in roots for p in [root, *root.rglob("*")]}


def children() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("args, expect, env", CASES)
def test_bad_input_is_refused_in_one_line(args, expect, env, inputs, workspace_dir, tmp_path, monkeypatch) -> None:
    args = [a.replace("{in}", str(inputs)) for a in args]
    for key, value in env.items():
        monkeypatch.setenv(key, value.replace("{in}", str(inputs)))
    before, processes = tree(tmp_path, inputs), children()
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expect:
        assert text in lines[0], lines[0]
    assert tree(tmp_path, inputs) == before, "something was written"
    assert children() <= processes, "a process was started"
    assert elapsed < 10, f"{elapsed:.1f} s"


@pytest.mark.parametrize("args, expect", [
    (["run", "flow-matching", "--set", "data.name=npy", "--set", "data.path={in}/nan.npy"], "nan.npy holds 10 NaN"),
    (["run", "flow-matching", "--set", "model.kwargs.bogus=1"], "model.kwargs.bogus: not an argument"),
], ids=["data-error", "network-error"])
def test_the_installed_command_answers_in_seconds(args, expect, inputs, workspace_dir, tmp_path) -> None:
    """The whole command, interpreter start and imports included, as a user runs it."""
    gendag = Path(sys.executable).with_name("gendag")
    before = tree(tmp_path)
    start = time.perf_counter()
    done = subprocess.run([str(gendag), *[a.replace("{in}", str(inputs)) for a in args]],
                          capture_output=True, text=True, env=os.environ, timeout=60)
    elapsed = time.perf_counter() - start
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and expect in done.stderr, done.stderr
    assert tree(tmp_path) == before
    assert elapsed < 10, f"{elapsed:.1f} s"


def test_at_least_fifty_bad_inputs() -> None:
    assert len(CASES) >= 50


def test_resampling_refuses_data_of_another_shape(tmp_path: Path, workspace_dir: Path) -> None:
    """`gendag sample` with a `--set data.name=...` the registered model was not trained on."""
    from models.checkpoint import SPEC_FILE, ModelSpec
    from tasks.config import ConfigError
    from tasks.config_loading import load_config
    from tasks.preflight import preflight

    model = tmp_path / "model"
    model.mkdir()
    (model / SPEC_FILE).write_text(ModelSpec("unet", (1, 8, 8)).to_json())
    cfg = load_config(MOONS, overrides=["source.name=gaussian"])
    with pytest.raises(ConfigError, match=r"data: moons items have shape \(2,\) but the model was trained on "
                                          r"items of shape \(1, 8, 8\)"):
        preflight(cfg, tmp_path / "out", "models:/m@champion (its logged config)", model_dir=model)
    assert not (tmp_path / "out").exists()
