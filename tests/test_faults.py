"""Faults injected into real runs of the tiny moons graph, each compared with an uninterrupted
run of the same command (docs/RELIABILITY.md lists them):

- a Ray Train worker SIGKILLed mid-training: the run goes on from the last checkpoint and ends
  with the uninterrupted run's weights, bit for bit;
- the graph's process (and everything it started) SIGKILLed during sampling, then during
  evaluation: the same command again redoes only the unfinished shards / scores, and says so;
- the MLflow store taken away while the report is written: one line, no run, no alias, and the
  same command registers once the store is back;
- a full disk (a 1 MB tmpfs over the sample store, filled to 16 KB of room) during sampling:
  one line, no partial file kept or taken as finished, and the same command, with room again,
  keeps the finished shards and ends with the same numbers.

Marked slow (`make test-all`): they start their own `gendag` processes and services.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from graph_runs import MOONS, gendag, gendag_error, gendag_output, kill_group, start_gendag, wait_for
from safetensors.torch import load_file

from tasks.config_loading import load_config
from tasks.infra import Ref, store
from tasks.sample import sample_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flow-matching" / "gaussians-to-moons.yaml"
REGISTERED = ["--set", "registry.model_name=gendag-faults"]
# Finer shards and four sample sets: 520 shards and 17 scores, so a kill lands in the middle.
FINE = [*REGISTERED, "--set", "sample.shard_size=10", "--set", "sample.sets=4"]


@pytest.fixture(scope="module")
def reference(workspace: Path) -> dict:
    """The uninterrupted run (it trains the tiny moons model unless an earlier test did)."""
    return gendag(*MOONS, *REGISTERED, "--out", str(workspace / "faults" / "reference"))


@pytest.fixture(scope="module")
def fine(reference: dict, workspace: Path) -> dict:
    """The uninterrupted run with the fine sampling protocol (the same model)."""
    return gendag(*MOONS, *FINE, "--out", str(workspace / "faults" / "fine"))


def in_background(work) -> threading.Thread:
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


def train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this test session's Ray (its processes descend from this one)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.cmdline()[0].startswith("ray::RayTrainWorker"):
                found.append(process)
        except (psutil.Error, IndexError):  # gone, or no command line (a zombie)
            pass
    return found


def model_folder(name: str) -> Path:
    (folder,) = (p for p in (store() / "models").glob(f"{name}-*") if not p.name.endswith(".partial"))
    return folder


def fine_samples(fine: dict) -> Path:
    """Where the fine protocol's sample sets of the model live."""
    overrides = [value for flag, value in zip(FINE[::2], FINE[1::2]) if flag == "--set"]
    return sample_folder(load_config(CONFIG, "tiny", overrides), Ref("model", fine["model_uri"], fine["model_hash"]))


def test_a_killed_training_worker_costs_a_restart_not_the_run(reference: dict, workspace: Path) -> None:
    """SIGKILL one of the two DDP workers after the first checkpoint: Ray Train restarts the worker
    group from the latest checkpoint (FailureConfig.max_failures), the same command finishes,
    and the weights are the uninterrupted run's, bit for bit."""
    name = "fm-worker-kill"
    killed = {}

    def kill_one_worker() -> None:
        wait_for(lambda: list((store() / "ray").glob(f"{name}-*/checkpoint_manager_snapshot.json")),
                 "the first checkpoint")
        victim = wait_for(train_workers, "the training workers")[0]
        victim.send_signal(signal.SIGKILL)
        killed.update(pid=victim.pid, at=time.time())

    killer = in_background(kill_one_worker)
    start = time.time()
    run = gendag(*MOONS, *REGISTERED, "--set", f"name={name}", "--out", str(workspace / "faults" / "worker-kill"))
    killer.join(timeout=10)
    assert killed, "no worker was killed"
    print(f"worker {killed['pid']} killed {killed['at'] - start:.1f} s in; run took {time.time() - start:.1f} s")

    state = json.loads((model_folder(name) / "state.json").read_text())
    assert len(state["resumed_from"]) == 1 and 0 < state["resumed_from"][0] < 1000, state["resumed_from"]
    for weights in ("model.safetensors", "raw.safetensors"):
        mine, theirs = (load_file(str(model_folder(n) / weights)) for n in (name, "fm-8gaussians-to-moons"))
        assert mine.keys() == theirs.keys() and all((mine[k] == theirs[k]).all() for k in mine)
    assert run["metrics"] == reference["metrics"]


def kept(pattern: str, output: str) -> tuple[int, ...]:
    match = re.search(pattern, output)
    assert match, f"no line matching {pattern!r} in:\n{output}"
    return tuple(int(g) for g in match.groups())


def whole_shards(folder: Path) -> list[Path]:
    """Shard files of unfinished settings (not the .partial.npz of one being written)."""
    return [p for p in folder.glob("*.shards/*.npz") if p.stem.isdigit()]


def test_a_killed_graph_resamples_only_the_unfinished_shards(fine: dict, workspace: Path) -> None:
    """SIGKILL the graph's process group once its first shards are on disk: the same command
    again samples only the missing shards and gives the uninterrupted run's numbers."""
    args = [*MOONS, *FINE, "--out", str(workspace / "faults" / "killed-sampling")]
    folder = fine_samples(fine)
    shutil.rmtree(folder)
    child = start_gendag(workspace, *args)
    wait_for(lambda: whole_shards(folder), "the first shard", child)
    kill_group(child)
    on_disk, finished = len(whole_shards(folder)), list(folder.glob("*.npz"))
    assert not finished, "a whole setting was sampled before the kill"

    start = time.time()
    output = gendag_output(*args)
    kept_shards, sampled = kept(r"sample fm-8gaussians-to-moons: (\d+) shards kept from an interrupted run, (\d+) to sample", output)
    print(f"{on_disk} of 520 shards on disk at the kill; rerun kept {kept_shards}, sampled {sampled} "
          f"({time.time() - start:.1f} s)")
    assert kept_shards == on_disk and sampled == 520 - on_disk
    assert json.loads((Path(args[-1]) / "summary.json").read_text())["metrics"] == fine["metrics"]


def test_a_killed_graph_rescores_only_the_unfinished_scores(fine: dict, workspace: Path) -> None:
    """SIGKILL the graph's process group once its first scores are on disk: the same command
    again samples nothing, scores only what is missing, and gives the same numbers."""
    args = [*MOONS, *FINE, "--out", str(workspace / "faults" / "killed-evaluation")]
    gendag(*args)  # every sample set on disk
    samples = {p: p.stat().st_mtime_ns for p in store().glob("samples/*/*.npz")}
    scores = store() / "scores"
    shutil.rmtree(scores)
    child = start_gendag(workspace, *args)
    wait_for(lambda: list(scores.rglob("*.json")), "the first score", child)
    kill_group(child)
    on_disk = len(list(scores.rglob("*.json")))

    start = time.time()
    output = gendag_output(*args)
    kept_scores, total = kept(r"evaluate fm-8gaussians-to-moons: (\d+) of (\d+) scores kept from an earlier run", output)
    print(f"{on_disk} of {total} scores on disk at the kill; rerun kept {kept_scores} ({time.time() - start:.1f} s)")
    assert kept_scores == on_disk and total == 17
    assert "shards kept" not in output and {p: p.stat().st_mtime_ns for p in samples} == samples
    assert json.loads((Path(args[-1]) / "summary.json").read_text())["metrics"] == fine["metrics"]


def versions(name: str) -> list:
    from mlflow import MlflowClient

    return MlflowClient().search_model_versions(f"name='{name}'")


def test_the_mlflow_store_gone_during_registration(reference: dict, workspace: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The MLflow store's folder disappears while the report is being written (as a network
    share would): one line naming the store and the state of the graph's run (open since the
    start), nothing registered, no output folder; the same command registers once the store is
    back, every alias on a version whose run FINISHED."""
    from mlflow import MlflowClient

    here, away = tmp_path / "mlflow", tmp_path / "mlflow-gone"
    here.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{here / 'mlflow.db'}")
    MlflowClient().search_experiments()  # the store exists and answers
    out = workspace / "faults" / "store-gone"
    args = [*MOONS, *REGISTERED, "--out", str(out)]

    def take_the_store_away() -> None:
        wait_for(out.with_name(f".{out.name}.partial").exists, "the report")
        here.rename(away)

    thief = in_background(take_the_store_away)
    line = gendag_error(*args)
    thief.join(timeout=10)
    print(line)
    assert f"the MLflow store sqlite:///{here / 'mlflow.db'} failed: (sqlite3.OperationalError)" in line
    assert re.search(r"; run \w+ (is marked FAILED|could not be marked FAILED \(it stays RUNNING\))$", line), line
    assert not out.exists() and not out.with_name(f".{out.name}.partial").exists()

    away.rename(here)
    assert versions("gendag-faults") == []
    registered = gendag(*args)["registered_model"]
    assert registered["version"] == 1 and registered["aliases"] == ["challenger", "champion"]
    client = MlflowClient()
    for alias, version in client.get_registered_model("gendag-faults").aliases.items():
        assert client.get_run(client.get_model_version("gendag-faults", version).run_id).info.status == "FINISHED"


@pytest.fixture
def small_disk(workspace: Path):
    """A 1 MB tmpfs mounted over the sample store (hiding what is there) and filled up to its
    last 16 KB by a ballast file; yields the ballast, which a test deletes to make room."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    samples = store() / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(samples)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        ballast = samples / "ballast"
        with open(ballast, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        os.truncate(ballast, max(0, ballast.stat().st_size - 16 * 1024))
        yield ballast
    finally:
        subprocess.run(["umount", "-l", str(samples)], check=True)


def test_a_full_disk_during_sampling(reference: dict, workspace: Path, small_disk: Path) -> None:
    out = workspace / "faults" / "full-disk"
    args = [*MOONS, *REGISTERED, "--out", str(out)]
    before = len(versions("gendag-faults"))

    line = gendag_error(*args)
    print(line)
    assert "no room on disk writing" in line and "No space left on device" in line
    assert "free some space and run the same command again" in line
    samples = small_disk.parent
    assert not list(samples.rglob("*partial*")), "a partial file was left behind"
    shards = whole_shards(next(p for p in samples.iterdir() if p.is_dir()))
    assert shards, "no shard was finished before the disk was full"
    for shard in shards:
        with np.load(shard) as f:
            assert f["x"].shape == (100, 2)
    assert not out.exists() and len(versions("gendag-faults")) == before

    small_disk.unlink()
    start = time.time()
    output = gendag_output(*args)
    kept_shards, sampled = kept(r"sample fm-8gaussians-to-moons: (\d+) shards kept from an interrupted run, (\d+) to sample", output)
    print(f"{len(shards)} shards on disk when it was full; rerun kept {kept_shards}, sampled {sampled} "
          f"({time.time() - start:.1f} s)")
    assert kept_shards == len(shards)
    assert json.loads((out / "summary.json").read_text())["metrics"] == reference["metrics"]
