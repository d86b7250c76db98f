"""Score sample sets: exact W2 + MMD for point clouds, FID/KID for images.

Image metrics go through torch-fidelity with a feature extractor of the project's
own (a small network trained on the training split, versioned with DVC like the
data), or Inception when a local weights file is configured. Every FID is
reported next to `fid_floor`: the same protocol applied to real training images,
i.e. what real data scores with this sample count.

Guarantees: a NaN or an infinity is an error, never a score (samples and data are checked
before scoring, every metric after); each finished score is kept on disk as soon as it is
computed (`ScoreStore`), so a rerun after a crash scores only what is missing.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.features import fid_kid, save_classifier, train_feature_extractor
from models.toys import true_log_density
from models.likelihoods import bits_per_dim, estimate_nll, mean_and_se
from models.metrics import point_scores, reference_set, scoring_blocks, summarize_blocks, wasserstein2
from models.samplers import parse_label
from tasks.config import RunConfig
from tasks.data import publish, read_dataset, pulled_hash, tracked_hash
from tasks.infra import NonFiniteError, Ref, claimed, file_digest, home, require_finite, short_hash, store
from tasks.progress import note


FEATURES_VERSION = 2  # bump when the feature network or its scaling changes: stored extractors are keyed by it
SCORES_VERSION = 3  # bump when what a score means changes: stored scores are keyed by it


def feature_path(cfg: RunConfig, data_hash: str) -> Path:
    """The feature network of a dataset version: data/features/<name>-<hash>.safetensors."""
    name = f"{cfg.data.name}-{short_hash(data_hash, cfg.evaluate.feature_epochs, cfg.seed, FEATURES_VERSION)}.safetensors"
    return home() / "data" / "features" / name


@task(name="feature-extractor", cache_policy=NO_CACHE)
def feature_extractor(cfg: RunConfig, data: Ref) -> Ref | None:
    """The FID feature network for this dataset: trained once per data hash, tracked by DVC."""
    splits = read_dataset(data)
    if splits.kind != "images":
        return None
    if cfg.evaluate.inception_weights:
        path = home() / cfg.evaluate.inception_weights
        return Ref("inception-weights", str(path), file_digest(path))
    target = feature_path(cfg, data.hash)
    with claimed(str(target)):
        digest = tracked_hash(target) or pulled_hash(target)
        if digest is None:
            model, info = train_feature_extractor(splits, seed=cfg.seed, epochs=cfg.evaluate.feature_epochs)
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            save_classifier(model, partial, meta={**info, "data_hash": data.hash})
            digest = publish(partial, target)
    return Ref("feature-extractor", str(target), digest, data.hash)


def image_scores(x: np.ndarray, reference: np.ndarray, features: Ref, cfg: RunConfig, data: Ref) -> dict:
    cache = f"gendag-{short_hash(data.hash, len(reference))}"
    scores = fid_kid(
        x, reference, weights_path=features.path, reference_cache_name=cache,
        cache_root=store() / "fidelity-cache", kid_subset_size=cfg.evaluate.kid_subset_size,
    )
    return {"fid": scores["fid"], "kid": scores["kid"]}  # KID's own spread over subsets is not reported


def _load_samples(ref: Ref) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Samples, NFE per shard, sequential rounds per shard (== NFE in files from before rounds were
    stored), and each sample's path energy (ODE samplers; None otherwise and in older files)."""
    with np.load(ref.path, allow_pickle=False) as f:
        rounds = f["rounds"] if "rounds" in f.files else f["nfe"]
        return f["x"], f["nfe"], rounds, f["energy"] if "energy" in f.files else None


def ends_ot_cost(cfg: RunConfig, reference: np.ndarray, source: Ref | None, scores: "ScoreStore") -> float | None:
    """W2^2 between the source and the held-out data (as many source points as reference points:
    N(0, I) draws seeded by the run's seed, or the source's test split), by exact OT; stored with
    the scores. By Benamou-Brenier it is the least path energy any flow between them can have:
    `pe_floor`. None where it cannot be formed (a dataset source whose version is not given)."""
    if cfg.source_config.name != "gaussian" and source is None:
        return None
    key = short_hash("ends-ot-cost", source.hash if source else ("gaussian", cfg.seed), len(reference))
    stored = scores.get(key)
    if stored is None:
        if source is None:
            start = np.random.default_rng([cfg.seed, 3]).standard_normal(reference.shape)
        else:
            start = read_dataset(source).test[: len(reference)]
        stored = {"w2": wasserstein2(start, reference)}
        scores.put(key, stored)
    return stored["w2"] ** 2


def energy_scores(x: np.ndarray, energy: np.ndarray, floor: float, n: int) -> dict[int, dict[str, float]]:
    """Per sample block k (the blocks of `scoring_blocks`), the mean path energy `pe` of its samples and
    Tong et al. 2024's normalized path energy `npe = |pe - W2^2| / W2^2`, W2^2 = `floor` (0 for a
    flow whose every path is the straight line at constant speed of the OT map)."""
    out = {}
    for k in range(len(x) // n):
        pe = float(np.mean(energy[k * n:(k + 1) * n]))
        out[k] = {"pe": pe, "npe": abs(pe - floor) / floor}
    return out


def cost_metrics(label: str, nfe: np.ndarray, rounds: np.ndarray) -> dict[str, float]:
    """What a setting's samples cost where its label does not say it (means over shards):
    `nfe@<label>` when the measured NFE differs from the label's (adaptive samplers, a grid that
    ends with a jump, Picard), `rounds@<label>` when the sequential network calls differ from the
    NFE (a Picard window evaluates several points of a sample in one call)."""
    metrics = {}
    asked = parse_label(label)[1].get("nfe")
    if asked is None or float(asked) != nfe.mean():
        metrics[f"nfe@{label}"] = float(nfe.mean())
    if rounds.mean() != nfe.mean():
        metrics[f"rounds@{label}"] = float(rounds.mean())
    return metrics


def _require_finite_array(x: np.ndarray, what: str) -> None:
    bad = int(x.size - np.isfinite(x).sum())
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {x.size} values are not finite; they cannot be scored")


class ScoreStore:
    """Finished scores of one evaluation protocol (data version, reference, feature network):
    one small JSON file per scored block, sample set or likelihood, written atomically under
    `<store>/scores/<protocol>/`, named by what was scored (a sample file's content hash and
    block, a floor subset, a model and estimator). A rerun scores only what is missing."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def get(self, key: str) -> dict | None:
        path = self.folder / f"{key}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, scores: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        # its own name per thread: two cells side by side may score the same block (a floor)
        partial = self.folder / f"{key}.json.{os.getpid()}-{threading.get_ident()}.partial"
        try:
            partial.write_text(json.dumps(scores))
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        partial.rename(self.folder / f"{key}.json")


def score_store(cfg: RunConfig, data: Ref, features: Ref | None, reference: np.ndarray) -> ScoreStore:
    protocol = short_hash(SCORES_VERSION, data.hash, len(reference), features.hash if features else "",
                          cfg.evaluate.kid_subset_size)
    return ScoreStore(store() / "scores" / protocol)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: RunConfig, samples: dict[str, Ref], data: Ref, features: Ref | None,
             model: Ref | None = None, source: Ref | None = None) -> dict[str, float]:
    """Metrics named `<metric>@<setting label>`, e.g. `fid@euler,nfe=4`,
    `w2@dopri5,atol=0.001,rtol=0.001`, plus `<metric>_floor`: the same protocol applied to as
    many real training examples as there are samples; `nfe@<label>` where the measured NFE differs
    from the label's (adaptive samplers, Picard); `rounds@<label>` (sequential network calls) where
    it differs from the NFE (Picard windows evaluate several points of a sample in one call);
    and the test NLL of every `evaluate.likelihood` estimator (`nll@<name>` in nats per
    example, `bpd@<name>` in bits per dimension for images), with its standard error. For point
    clouds sampled by a fixed-step ODE sampler, `pe@<label>` (the mean path energy of the generated
    trajectories), `npe@<label>` (Tong et al. 2024's normalized path energy) and `pe_floor`
    (W2^2 between the `source` and the held-out data, the least energy a flow can have).

    With `sample.sets` = K > 1 every value is the mean over K sample sets of `n_samples` (and
    over K random subsets of the training data for the floor); `<metric>_sd@...` is their spread.
    The untrained baseline is one set (`models.sampling.sample_count`).

    A NaN or infinite sample (or data value) raises `NonFiniteError` before anything is scored,
    and so does a metric that comes out non-finite.
    """
    splits = read_dataset(data)
    reference = reference_set(splits.test, splits.kind, cfg.evaluate.n_reference)
    scores = score_store(cfg, data, features, reference)
    likelihoods = _start_likelihoods(cfg, model, splits, scores) if model is not None else {}
    sets = cfg.sample.sets
    loaded = {label: _load_samples(ref) for label, ref in samples.items()}  # label -> (x, nfe, rounds per shard)
    for label, (x, *_) in loaded.items():
        _require_finite_array(x, f"evaluate {cfg.name}: samples {label} ({samples[label].path})")
    _require_finite_array(reference, f"evaluate {cfg.name}: the held-out data ({data.path})")
    _require_finite_array(splits.train, f"evaluate {cfg.name}: the training data ({data.path})")
    blocks = scoring_blocks(
        splits.train, {label: x for label, (x, *_) in loaded.items()}, cfg.sample.n_samples, sets, cfg.seed,
    )
    keys = {block: _block_key(block, samples, cfg) for block in blocks}
    missing = {block: x for block, x in blocks.items() if scores.get(keys[block]) is None}
    if len(missing) < len(blocks):
        note(f"evaluate {cfg.name}: {len(blocks) - len(missing)} of {len(blocks)} scores kept from an earlier run")

    def keep(block, values: dict) -> None:
        scores.put(keys[block], values)

    if splits.kind == "points":
        _parallel_point_scores(missing, reference, keep)
    else:
        for block, x in missing.items():
            keep(block, image_scores(x, reference, features, cfg, data))
    energy = {}
    energies = {label: (x, e) for label, (x, _, _, e) in loaded.items() if e is not None}
    floor = ends_ot_cost(cfg, reference, source, scores) if splits.kind == "points" and energies else None
    if floor:
        energy = {(label, k): v for label, (x, e) in energies.items()
                  for k, v in energy_scores(x, e, floor, cfg.sample.n_samples).items()}
    metrics = summarize_blocks({block: {**scores.get(key), **energy.get(block, {})} for block, key in keys.items()})
    if floor:
        metrics["pe_floor"] = floor
    for label, (_, nfe, rounds, _) in loaded.items():
        metrics |= cost_metrics(label, nfe, rounds)
    metrics |= _finish_likelihoods(cfg, likelihoods, splits, scores)
    require_finite(metrics, f"evaluate {cfg.name}")
    return metrics


def _block_key(block: tuple[str, int], samples: dict[str, Ref], cfg: RunConfig) -> str:
    """What a block's score is stored under: the floor's subset is fixed by (seed, size, k),
    a sample block by its file's content and k."""
    label, k = block
    what = ("floor", cfg.seed) if label == "floor" else ("samples", samples[label].hash)
    return short_hash(*what, cfg.sample.n_samples, k)


def _likelihood_key(cfg: RunConfig, model: Ref, name: str) -> str:
    return short_hash("likelihood", model.hash, name, cfg.evaluate.likelihood_examples, cfg.seed)


def _start_likelihoods(cfg: RunConfig, model: Ref, splits, scores: ScoreStore) -> dict:
    """One Ray task per estimator not scored yet, started before the sample scores so they
    overlap; {stored key: a finished result or a Ray future}."""
    keys = {_likelihood_key(cfg, model, name): name for name in cfg.evaluate.likelihood}
    # scored again when missing, or stored before the per-example values were kept
    todo = {key: name for key, name in keys.items() if "nats" not in (scores.get(key) or {})}
    started = {}
    if todo:
        import ray

        from tasks.runtime import ensure_ray

        ensure_ray()
        remote = ray.remote(num_cpus=1)(estimate_nll)
        x = ray.put(splits.test[: cfg.evaluate.likelihood_examples])
        started = {key: remote.remote(model.uri, name, x, splits.levels, cfg.seed) for key, name in todo.items()}
    return {name: (key, started.get(key)) for key, name in keys.items()}


def _finish_likelihoods(cfg: RunConfig, likelihoods: dict, splits, scores: ScoreStore) -> dict[str, float]:
    import ray

    metrics, per_example = {}, {}
    dims = int(np.prod(splits.test.shape[1:]))
    for name, (key, future) in likelihoods.items():
        if future is not None:
            scores.put(key, ray.get(future))
        nll = scores.get(key)
        per_example[name] = nll["nats"]
        if splits.kind == "images":
            metrics[f"bpd@{name}"], metrics[f"bpd_se@{name}"] = (bits_per_dim(v, dims) for v in (nll["mean"], nll["se"]))
        else:
            metrics[f"nll@{name}"], metrics[f"nll_se@{name}"] = nll["mean"], nll["se"]
    if likelihoods and splits.kind == "points":
        metrics |= true_nll_metrics(cfg.data.name, splits.test[: cfg.evaluate.likelihood_examples], per_example)
    return metrics


def true_nll_metrics(dataset: str, points: np.ndarray, nats: dict[str, list[float]]) -> dict[str, float]:
    """Where the law the toy data are drawn from has a closed-form density (8 gaussians,
    checkerboard): `nll_floor`, the NLL of the test `points` under it (what a perfect model
    would score), and for every estimator `name` with per-example NLLs `nats[name]` of the same
    points, `nll_gap@<name>`: the mean of the paired differences model NLL - true NLL, with
    its standard error `nll_gap_se@<name>` over the points. The pairing removes the spread the
    two share (which points are in the tails), so the gap's error is far smaller than either
    NLL's; {} for data without a closed form."""
    log_p = true_log_density(dataset, points)
    if log_p is None:
        return {}
    floor = mean_and_se(-log_p)
    metrics = {"nll_floor": floor["mean"], "nll_se_floor": floor["se"]}
    for name, values in nats.items():
        gap = mean_and_se(np.asarray(values, dtype=np.float64) + log_p)
        metrics[f"nll_gap@{name}"], metrics[f"nll_gap_se@{name}"] = gap["mean"], gap["se"]
    return metrics


def _parallel_point_scores(blocks: dict, reference: np.ndarray, keep) -> None:
    """One Ray task per scored block: exact OT is single-threaded and takes seconds each; each
    result is handed to `keep` as soon as it is finished. `point_scores` lives in
    `models.metrics`, so the workers import no Prefect."""
    if not blocks:
        return
    import ray

    from tasks.runtime import ensure_ray

    ensure_ray()
    remote = ray.remote(num_cpus=1)(point_scores)
    ref = ray.put(reference)
    pending = {remote.remote(x, ref): block for block, x in blocks.items()}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        keep(pending.pop(done[0]), ray.get(done[0]))
