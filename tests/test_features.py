"""Our feature extractor, and FID/KID through torch-fidelity with it."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torch_fidelity.feature_extractor_inceptionv3 as inception_module

from models.data import DatasetSpec, Splits, load_dataset
from models.features import (
    EXTRACTOR_NAME,
    ArrayImages,
    ClassifierFeatureExtractor,
    SmallClassifier,
    classifier_meta,
    KID_SUBSETS,
    fid_kid,
    kid_subsets,
    load_classifier,
    register_extractor,
    save_classifier,
    to_uint8,
    train_classifier,
    train_feature_extractor,
)


@pytest.fixture(scope="module")
def digits() -> Splits:
    return load_dataset(DatasetSpec("digits", seed=0))


@pytest.fixture(scope="module")
def trained(digits: Splits, tmp_path_factory: pytest.TempPathFactory) -> tuple[SmallClassifier, dict, Path]:
    model, info = train_feature_extractor(digits, seed=0, epochs=10)
    path = tmp_path_factory.mktemp("weights") / "digits.safetensors"
    save_classifier(model, path, {"dataset": "digits", **info})
    return model, info, path


def test_digits_classifier_is_accurate(trained: tuple[SmallClassifier, dict, Path]) -> None:
    _, info, _ = trained
    assert info["task"] == "labels" and info["num_classes"] == 10
    assert info["test_accuracy"] > 0.9


def test_training_is_deterministic(digits: Splits) -> None:
    runs = [train_classifier(digits.train[:200], digits.train_labels[:200], 10, epochs=1, seed=7) for _ in range(2)]
    for (name, a), b in zip(runs[0].state_dict().items(), runs[1].state_dict().values()):
        assert torch.equal(a, b), name
    other = train_classifier(digits.train[:200], digits.train_labels[:200], 10, epochs=1, seed=8)
    assert not torch.equal(other.head.weight, runs[0].head.weight)


def test_rotation_task_without_labels(digits: Splits) -> None:
    unlabeled = Splits(digits.train[:400], digits.test[:200], "images")
    model, info = train_feature_extractor(unlabeled, seed=0, epochs=4)
    assert info["task"] == "rotation" and info["num_classes"] == 4
    assert info["test_accuracy"] > 0.6  # chance is 0.25
    assert model.features(torch.from_numpy(digits.test[:3])).shape == (3, 64)


def test_save_load_round_trip(trained: tuple[SmallClassifier, dict, Path], digits: Splits) -> None:
    model, info, path = trained
    loaded = load_classifier(path)
    x = torch.from_numpy(digits.test[:50])
    with torch.no_grad():
        assert torch.equal(model.features(x), loaded.features(x))
        assert torch.equal(model(x), loaded(x))
    assert classifier_meta(path)["test_accuracy"] == info["test_accuracy"]
    with open(path, "rb") as f:
        assert not f.read(64).startswith(b"\x80")  # not a pickle


def test_features_are_centred_and_share_one_scale(trained: tuple[SmallClassifier, dict, Path], digits: Splits) -> None:
    """Centred on the training images, unit mean variance, and every unit divided by the same
    scale: the raw activations' geometry is kept (a rarely firing unit is not blown up)."""
    model = trained[0]
    with torch.no_grad():
        x = torch.from_numpy(digits.train)
        features, raw = model.features(x), model.body(x)
    assert features.mean(dim=0).abs().max() < 1e-3
    assert features.var(dim=0).mean().item() == pytest.approx(1.0, rel=1e-3)
    assert torch.allclose(features * model.feature_scale[0], raw - raw.mean(dim=0), atol=1e-3)
    assert (model.feature_scale == model.feature_scale[0]).all()


def test_uint8_conversion_and_dataset() -> None:
    images = np.array([-1.5, -1.0, 0.0, 1.0, 2.0], dtype=np.float32).reshape(5, 1, 1, 1)
    assert to_uint8(images).ravel().tolist() == [0, 0, 128, 255, 255]
    dataset = ArrayImages(to_uint8(images))
    assert len(dataset) == 5 and dataset[3].dtype == torch.uint8 and dataset[3].shape == (1, 1, 1)
    with pytest.raises(ValueError, match="uint8"):
        ArrayImages(images)


def test_extractor_matches_the_model(trained: tuple[SmallClassifier, dict, Path], digits: Splits) -> None:
    model, _, path = trained
    register_extractor()
    register_extractor()  # idempotent
    extractor = ClassifierFeatureExtractor(EXTRACTOR_NAME, ["logits", "features"], str(path))
    assert ClassifierFeatureExtractor.get_default_feature_layer_for_metric("fid") == "features"
    u8 = torch.from_numpy(to_uint8(digits.test[:20]))
    logits, features = extractor(u8)
    with torch.no_grad():
        expected = model.features(u8.float() / 127.5 - 1.0)
        expected_logits = model(u8.float() / 127.5 - 1.0)  # the classifier's own logits
    assert torch.equal(features, expected) and torch.equal(logits, expected_logits)
    with pytest.raises(ValueError, match="uint8"):
        extractor(u8.float())


def _shuffled_pixels(images: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    flat = images.reshape(len(images), -1)
    return np.stack([row[rng.permutation(flat.shape[1])] for row in flat]).reshape(images.shape)


def _blurred(images: np.ndarray) -> np.ndarray:
    return F.avg_pool2d(torch.from_numpy(images), 3, stride=1, padding=1, count_include_pad=False).numpy()


def test_fid_kid_orders_real_and_broken_images(trained: tuple[SmallClassifier, dict, Path], digits: Splits) -> None:
    path = trained[2]
    test = digits.test

    def score(samples: np.ndarray) -> dict[str, float]:
        return fid_kid(samples, test, path, reference_cache_name=None, cache_root=None)

    itself, train = score(test), score(digits.train)
    noise = score(np.random.default_rng(0).uniform(-1, 1, test.shape).astype(np.float32))
    broken = [score(_shuffled_pixels(test, 1)), score(_blurred(test))]
    assert set(itself) == {"fid", "kid", "kid_std"}
    assert abs(itself["fid"]) < 1e-3
    assert train["fid"] < 1.0
    for bad in [noise, *broken]:
        assert bad["fid"] > 10 * train["fid"] and bad["fid"] > 5.0
        assert bad["kid"] > 0.1 > abs(train["kid"])
    assert all(np.isfinite(list(s.values())).all() for s in (itself, train, noise))


def test_reference_features_are_cached(
    trained: tuple[SmallClassifier, dict, Path], digits: Splits, tmp_path: Path
) -> None:
    path = trained[2]
    samples = digits.train[:300]
    first = fid_kid(samples, digits.test, path, "digits-test-abc", tmp_path, kid_subset_size=200)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert cached and all(name.startswith("digits-test-abc-") for name in cached)
    assert any("stat-fid" in name for name in cached)
    # the same name must reuse the cached reference even if different images are passed
    reused = fid_kid(samples, digits.test[:250], path, "digits-test-abc", tmp_path, kid_subset_size=200)
    assert reused == first
    fresh = fid_kid(samples, digits.test[:250], path, "digits-test-250", tmp_path, kid_subset_size=200)
    assert fresh["fid"] != first["fid"]
    with pytest.raises(ValueError, match="kid_subset_size"):
        fid_kid(samples, digits.test, path, None, None, kid_subset_size=301)


def test_kid_over_whole_sets_takes_one_subset_and_matches_the_hundred() -> None:
    """Subsets as large as both sets are both sets reordered: 100 of them give the one value."""
    from torch_fidelity.metric_kid import kid_features_to_metric

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 16, generator=generator), 1.1 * torch.randn(300, 16, generator=generator) + 0.1
    kid = {n: kid_features_to_metric(a, b, kid_subsets=n, kid_subset_size=300, verbose=False)
           ["kernel_inception_distance_mean"] for n in (1, KID_SUBSETS)}
    assert kid[1] > 0 and kid[KID_SUBSETS] == pytest.approx(kid[1], rel=1e-5)
    assert kid_subsets(300, 300, 300) == 1
    assert kid_subsets(300, 300, 500) == kid_subsets(200, 300, 300) == KID_SUBSETS


def _random_inception_weights(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A randomly initialised Inception state dict, standing in for the real weights file."""
    with monkeypatch.context() as patch:
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            network = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(network.state_dict(), path)


def test_inception_path_with_grey_images(digits: Splits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = tmp_path / "inception.pth"
    _random_inception_weights(weights, monkeypatch)
    # its smallest valid input keeps the CPU test quick; real runs resize to 299
    monkeypatch.setattr(inception_module.FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    result = fid_kid(digits.test[:4], digits.train[:4], weights, "ref", tmp_path / "cache", kid_subset_size=2)
    assert set(result) == {"fid", "kid", "kid_std"} and all(np.isfinite(v) for v in result.values())
    assert any("inception-v3-compat" in p.name for p in (tmp_path / "cache").iterdir())


def test_inception_weights_must_be_plain_tensors(digits: Splits, tmp_path: Path) -> None:
    unsafe = tmp_path / "unsafe.pth"
    unsafe.write_bytes(pickle.dumps({"weight": Path("/")}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        fid_kid(digits.test[:4], digits.train[:4], unsafe, None, None, kid_subset_size=2)
    with pytest.raises(ValueError, match="weights_path"):
        fid_kid(digits.test[:4], digits.train[:4], None, None, None)
