"""Datasets: shapes, scales, seeds, file formats and their error messages."""

from __future__ import annotations

import hashlib
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import datasets

from models.data import (
    DATASETS,
    TOY_2D,
    DatasetError,
    DatasetSpec,
    data_shape,
    load_dataset,
    load_splits,
    sample_standard_normal,
    save_splits,
)


@pytest.mark.parametrize("name", TOY_2D)
def test_toy_shapes_scale_and_seeds(name: str) -> None:
    splits = load_dataset(DatasetSpec(name, n_train=3000, n_test=1000, seed=1))
    assert splits.kind == "points" and splits.train_labels is None
    assert splits.train.shape == (3000, 2) and splits.test.shape == (1000, 2)
    assert splits.train.dtype == np.float32
    assert np.all(np.abs(splits.train.mean(axis=0)) < 0.15)
    assert np.all((splits.train.std(axis=0) > 0.7) & (splits.train.std(axis=0) < 1.3))
    again = load_dataset(DatasetSpec(name, n_train=3000, n_test=1000, seed=1))
    assert again.train.tobytes() == splits.train.tobytes() and again.test.tobytes() == splits.test.tobytes()
    other = load_dataset(DatasetSpec(name, n_train=3000, n_test=1000, seed=2))
    assert other.train.tobytes() != splits.train.tobytes()
    assert not np.array_equal(splits.train[:1000], splits.test)
    smaller = load_dataset(DatasetSpec(name, n_train=500, n_test=1000, seed=1))
    assert smaller.test.tobytes() == splits.test.tobytes()  # held-out set independent of n_train


def test_toy_defaults_match_the_evaluator() -> None:
    splits = load_dataset(DatasetSpec("eight_gaussians"))
    assert splits.train.shape == (20_000, 2) and splits.test.shape == (10_000, 2)
    radius = np.linalg.norm(splits.test, axis=1)
    assert abs(np.median(radius) - np.sqrt(2)) < 0.05


def test_checkerboard_fills_only_dark_squares() -> None:
    points = load_dataset(DatasetSpec("checkerboard", n_train=5000, n_test=10)).train
    cells = np.floor(points).astype(int)
    assert np.all((cells[:, 0] - cells[:, 1]) % 2 == 0)
    assert np.all(np.abs(points) <= 2.0)


def test_digits_images_in_unit_range_with_labels() -> None:
    splits = load_dataset(DatasetSpec("digits", seed=3))
    assert splits.kind == "images"
    assert splits.test.shape == (500, 1, 8, 8) and splits.train.shape == (1297, 1, 8, 8)
    assert splits.train.dtype == np.float32
    assert splits.train.min() == -1.0 and splits.train.max() == 1.0
    assert splits.train_labels.dtype == np.int64 and set(splits.test_labels) == set(range(10))
    assert data_shape(splits) == (1, 8, 8)
    capped = load_dataset(DatasetSpec("digits", n_train=100, n_test=50, seed=3))
    assert capped.train.shape[0] == 100 and capped.test.shape[0] == 50
    assert np.array_equal(capped.test, splits.test[:50])


def test_save_and_load_splits_byte_identical(tmp_path: Path) -> None:
    spec = DatasetSpec("digits", n_test=100, seed=5)
    for folder in ("a", "b"):
        save_splits(load_dataset(spec), tmp_path / folder)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["meta.json", "test.npy", "test_labels.npy", "train.npy", "train_labels.npy"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    loaded = load_splits(tmp_path / "a")
    original = load_dataset(spec)
    assert loaded.kind == "images" and loaded.spec == spec
    assert np.array_equal(loaded.train, original.train) and np.array_equal(loaded.test_labels, original.test_labels)


def test_points_save_without_labels(tmp_path: Path) -> None:
    save_splits(load_dataset(DatasetSpec("moons", n_train=10, n_test=5)), tmp_path)
    loaded = load_splits(tmp_path)
    assert loaded.train_labels is None and loaded.train.shape == (10, 2) and data_shape(loaded) == (2,)


def test_npy_points_and_images(tmp_path: Path) -> None:
    points = np.arange(60, dtype=np.float64).reshape(20, 3)
    np.save(tmp_path / "p.npy", points)
    splits = load_dataset(DatasetSpec("npy", path=str(tmp_path / "p.npy"), seed=0))
    assert splits.kind == "points" and splits.test.shape == (2, 3) and splits.train.shape == (18, 3)
    assert sorted(np.concatenate([splits.train, splits.test])[:, 0].tolist()) == points[:, 0].tolist()

    images = np.full((10, 6, 6), 255, dtype=np.uint8)
    images[:, 0, 0] = 0
    np.save(tmp_path / "i.npy", images)
    splits = load_dataset(DatasetSpec("npy", path=str(tmp_path / "i.npy")))
    assert splits.kind == "images" and splits.train.shape == (9, 1, 6, 6) and splits.test.shape == (1, 1, 6, 6)
    assert splits.train[:, 0, 0, 0].tolist() == [-1.0] * 9 and splits.train[0, 0, 1, 1] == 1.0


def test_npy_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "a.npy"
    np.save(bad, np.zeros(10))
    with pytest.raises(DatasetError) as err:
        load_dataset(DatasetSpec("npy", path=str(bad)))
    assert str(err.value) == (
        f"data.path: {bad} has shape (10,) — expected (N, d) points or (N, H, W)/(N, C, H, W) images"
    )
    np.save(bad, np.full((4, 1, 5, 5), 3.0))
    with pytest.raises(DatasetError, match=r"expected \[-1, 1\] or uint8"):
        load_dataset(DatasetSpec("npy", path=str(bad)))
    np.save(bad, np.zeros((4, 5, 5, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="channels first"):
        load_dataset(DatasetSpec("npy", path=str(bad)))
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(DatasetSpec("npy", path=str(tmp_path / "missing.npy")))


def _write_png(path: Path, value: int, size: tuple[int, int] = (6, 6), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    colour = value if mode == "L" else (value, 0, 255 - value)
    Image.new(mode, size, colour).save(path)


def test_image_folder_loads_recursively(tmp_path: Path) -> None:
    for i in range(5):
        _write_png(tmp_path / "imgs" / f"{i}.png", 50 * i)
    _write_png(tmp_path / "imgs" / "sub" / "x.PNG", 255)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    grey = load_dataset(DatasetSpec("image_folder", path=str(tmp_path / "imgs"), n_test=2))
    assert grey.train.shape == (4, 1, 6, 6) and grey.test.shape == (2, 1, 6, 6)
    assert grey.train.min() >= -1.0 and grey.train.max() <= 1.0
    pixels = np.rint((np.concatenate([grey.train, grey.test])[:, 0, 0, 0] + 1) * 127.5)
    assert sorted(pixels.tolist()) == [0, 50, 100, 150, 200, 255]
    rgb = load_dataset(DatasetSpec("image_folder", path=str(tmp_path / "imgs"), channels=3, image_size=4))
    assert rgb.train.shape[1:] == (3, 4, 4)

    _write_png(tmp_path / "colour" / "a.png", 10, mode="RGB")
    _write_png(tmp_path / "colour" / "b.png", 20)
    assert load_dataset(DatasetSpec("image_folder", path=str(tmp_path / "colour"))).train.shape[1] == 3


def test_image_folder_errors(tmp_path: Path) -> None:
    _write_png(tmp_path / "imgs" / "a.png", 0)
    _write_png(tmp_path / "imgs" / "b.png", 0, size=(7, 6))
    with pytest.raises(DatasetError, match=r"b\.png is 7x6 but a\.png is 6x6"):
        load_dataset(DatasetSpec("image_folder", path=str(tmp_path / "imgs")))
    resized = load_dataset(DatasetSpec("image_folder", path=str(tmp_path / "imgs"), image_size=5))
    assert resized.train.shape == (1, 1, 5, 5)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no .png/.jpg/.jpeg images"):
        load_dataset(DatasetSpec("image_folder", path=str(tmp_path / "empty")))


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX as MNIST ships it: 0, 0, type 0x08 (uint8), rank, big-endian sizes, raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_fake_mnist_through_torchvision(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 30), ("t10k", 12)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)  # marks each image with its index
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    splits = load_dataset(DatasetSpec("mnist", path=str(tmp_path), n_train=20, seed=4))
    assert splits.train.shape == (20, 1, 28, 28) and splits.test.shape == (12, 1, 28, 28)
    marks = np.rint((splits.train[:, 0, 0, 0] + 1) * 127.5).astype(int)
    assert len(set(marks)) == 20 and np.array_equal(splits.train_labels, marks % 10)
    assert np.array_equal(splits.test_labels, np.arange(12) % 10)
    assert splits.train[:, :, 1:].max() == -1.0


def _write_cifar(root: Path, n_per_batch: int) -> dict[str, str]:
    """The pickled batches of cifar-10-batches-py; returns each file's md5."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.zeros((n_per_batch, 3, 32, 32), dtype=np.uint8)
        data[:, 0] = 10 * b + np.arange(n_per_batch)[:, None, None]  # red channel marks batch and index
        data[:, 2] = 200
        batch = {"data": data.reshape(n_per_batch, -1), "labels": [b] * n_per_batch}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_fake_cifar_through_torchvision(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    md5 = _write_cifar(tmp_path, n_per_batch=4)
    spec = DatasetSpec("cifar10", path=str(tmp_path), n_test=3, seed=0)
    with pytest.raises(DatasetError, match="corrupted"):  # torchvision's md5 guard is live
        load_dataset(spec)
    # register the fake files' checksums, as the official ones are registered for real data
    train_list = [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)]
    monkeypatch.setattr(datasets.CIFAR10, "train_list", train_list)
    monkeypatch.setattr(datasets.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(datasets.CIFAR10, "meta", {**datasets.CIFAR10.meta, "md5": md5["batches.meta"]})
    splits = load_dataset(spec)
    assert splits.train.shape == (20, 3, 32, 32) and splits.test.shape == (3, 3, 32, 32)
    red = np.rint((splits.train[:, 0, 5, 5] + 1) * 127.5).astype(int)
    assert np.array_equal(red // 10, splits.train_labels)
    assert np.all(splits.train[:, 1] == -1.0) and np.allclose(splits.train[:, 2], 200 / 127.5 - 1)
    assert np.all(splits.test_labels == 5)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_torchvision_files(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetError) as err:
        load_dataset(DatasetSpec(name, path=str(tmp_path)))
    message = str(err.value)
    assert str(tmp_path) in message and "`download: true`" in message and "internet" in message
    assert "\n" not in message
    with pytest.raises(DatasetError, match="data.path is required"):
        load_dataset(DatasetSpec(name))


def test_unknown_dataset_and_source() -> None:
    with pytest.raises(DatasetError, match="unknown"):
        load_dataset(DatasetSpec("imagenet"))
    assert "digits" in DATASETS and len(set(DATASETS)) == len(DATASETS)
    noise = sample_standard_normal((1, 4, 4), n=500, seed=1)
    assert noise.shape == (500, 1, 4, 4) and noise.dtype == np.float32
    assert np.array_equal(noise, sample_standard_normal((1, 4, 4), n=500, seed=1))
    assert abs(float(noise.std()) - 1.0) < 0.05
