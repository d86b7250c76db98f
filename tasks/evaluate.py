"""Score sample sets: exact W2 + MMD for point clouds, FID/KID for images.

Image metrics go through torch-fidelity with a feature extractor of the project's
own (a small network trained on the training split, versioned with DVC like the
data), or Inception when a local weights file is configured. Every FID is
reported next to `fid_floor`: the same protocol applied to real training images,
i.e. what real data scores with this sample count.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE

from models.features import fid_kid, save_classifier, train_feature_extractor
from models.likelihoods import bits_per_dim, estimate_nll
from models.metrics import point_scores, reference_set, scoring_blocks, summarize_blocks
from models.samplers import parse_label
from tasks.config import RunConfig
from tasks.data import publish, read_dataset, tracked_hash
from tasks.infra import Ref, file_digest, home, short_hash, store


FEATURES_VERSION = 2  # bump when the feature network or its scaling changes: stored extractors are keyed by it


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
    digest = tracked_hash(target)
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


def _load_samples(ref: Ref) -> tuple[np.ndarray, np.ndarray]:
    with np.load(ref.path, allow_pickle=False) as f:
        return f["x"], f["nfe"]


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate(cfg: RunConfig, samples: dict[str, Ref], data: Ref, features: Ref | None,
             model: Ref | None = None) -> dict[str, float]:
    """Metrics named `<metric>@<setting label>`, e.g. `fid@euler,nfe=4`,
    `w2@dopri5,atol=0.001,rtol=0.001`, plus `<metric>_floor`: the same protocol applied to as
    many real training examples as there are samples; `nfe@<label>` for adaptive samplers;
    and the test NLL of every `evaluate.likelihood` estimator (`nll@<name>` in nats per
    example, `bpd@<name>` in bits per dimension for images), with its standard error.

    With `sample.sets` = K > 1 every value is the mean over K sample sets of `n_samples` (and
    over K random subsets of the training data for the floor); `<metric>_sd@...` is their spread.
    The untrained baseline is one set (`models.sampling.sample_count`).
    """
    splits = read_dataset(data)
    likelihoods = _start_likelihoods(cfg, model, splits) if model is not None else {}
    reference = reference_set(splits.test, splits.kind, cfg.evaluate.n_reference)
    sets = cfg.sample.sets
    loaded = {label: _load_samples(ref) for label, ref in samples.items()}  # label -> (x, nfe per shard)
    blocks = scoring_blocks(
        splits.train, {label: x for label, (x, _) in loaded.items()}, cfg.sample.n_samples, sets, cfg.seed,
    )
    if splits.kind == "points":
        scores = _parallel_point_scores(blocks, reference)
    else:
        scores = {key: image_scores(x, reference, features, cfg, data) for key, x in blocks.items()}
    metrics = summarize_blocks(scores)
    for label, (_, nfe) in loaded.items():
        asked = parse_label(label)[1].get("nfe")
        if asked is None or float(asked) != nfe.mean():  # adaptive, or a grid that ends with a jump
            metrics[f"nfe@{label}"] = float(nfe.mean())
    return metrics | _finish_likelihoods(likelihoods, splits)


def _start_likelihoods(cfg: RunConfig, model: Ref, splits) -> dict:
    """One Ray task per estimator, started before the sample scores so they overlap."""
    if not cfg.evaluate.likelihood:
        return {}
    import ray

    from tasks.runtime import ensure_ray

    ensure_ray()
    remote = ray.remote(num_cpus=1)(estimate_nll)
    x = ray.put(splits.test[: cfg.evaluate.likelihood_examples])
    return {name: remote.remote(model.uri, name, x, splits.levels, cfg.seed) for name in cfg.evaluate.likelihood}


def _finish_likelihoods(futures: dict, splits) -> dict[str, float]:
    import ray

    metrics = {}
    dims = int(np.prod(splits.test.shape[1:]))
    for name, future in futures.items():
        nll = ray.get(future)
        if splits.kind == "images":
            metrics[f"bpd@{name}"], metrics[f"bpd_se@{name}"] = (bits_per_dim(v, dims) for v in (nll["mean"], nll["se"]))
        else:
            metrics[f"nll@{name}"], metrics[f"nll_se@{name}"] = nll["mean"], nll["se"]
    return metrics


def _parallel_point_scores(blocks: dict, reference: np.ndarray) -> dict:
    """One Ray task per scored block: exact OT is single-threaded and takes seconds each.
    `point_scores` lives in `models.metrics`, so the workers import no Prefect."""
    import ray

    from tasks.runtime import ensure_ray

    ensure_ray()
    remote = ray.remote(num_cpus=1)(point_scores)
    ref = ray.put(reference)
    futures = {key: remote.remote(x, ref) for key, x in blocks.items()}
    return {key: ray.get(f) for key, f in futures.items()}
