"""Datasets as float32 arrays with fixed seeds and splits.

Every loader returns :class:`Splits`: 2-D toy points of shape (N, 2), or images of
shape (N, C, H, W) scaled to [-1, 1]. The same spec always gives byte-identical arrays,
so downstream steps can hash them.

Synthetic 2-D toys are drawn by `models.toys`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from models.toys import TOY_2D, TOYS

TABULAR_BUILTIN = ("breast_cancer",)
IMAGE_BUILTIN = ("digits",)
TORCHVISION = ("mnist", "cifar10")
FILE_KINDS = ("npy", "image_folder")
DATASETS = TOY_2D + TABULAR_BUILTIN + IMAGE_BUILTIN + TORCHVISION + FILE_KINDS

DEFAULT_TOY_TRAIN = 20_000
DEFAULT_TOY_TEST = 10_000
DEFAULT_DIGITS_TEST = 500
DEFAULT_TABULAR_TEST_FRACTION = 0.2
DIGITS_LEVELS = 17  # scikit-learn's digits hold the integers 0..16
UINT8_LEVELS = 256
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class DatasetError(ValueError):
    """A dataset cannot be loaded as configured; the message is one line naming the cause."""


@dataclass(frozen=True, repr=False)
class DatasetSpec:
    """What to load; a plain dataclass so ``models`` stays free of the config layer.

    ``test_path`` (npy only): a second file holding the held-out split, so ``path`` is all
    training data (capped by ``n_train``, the test file by ``n_test``) and nothing is split."""

    name: str
    n_train: int | None = None
    n_test: int | None = None
    path: str | None = None
    image_size: int | None = None
    channels: int | None = None
    download: bool = False
    seed: int = 0
    test_path: str | None = None

    _LATER_FIELDS = ("test_path",)

    def fields(self) -> dict:
        """Every field, but those added later left out at their defaults: what names a dataset
        version (the repr, ``tasks.data.spec_hash``) and what its meta.json records, so existing
        versions keep their names and their bytes."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__
                if not (k in self._LATER_FIELDS and getattr(self, k) is None)}

    def __repr__(self) -> str:
        return "DatasetSpec(" + ", ".join(f"{k}={v!r}" for k, v in self.fields().items()) + ")"


@dataclass
class Splits:
    """Train and test arrays of one dataset, plus integer labels where the dataset has them."""

    train: np.ndarray
    test: np.ndarray
    kind: str
    train_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    spec: DatasetSpec | None = None
    # Quantization: the data take `levels` evenly spaced values in [-1, 1] (17 for the digits'
    # grey levels 0..16, 256 for 8-bit images); None for continuous data. Likelihoods use it.
    levels: int | None = None


# --------------------------------------------------------------------------- toys


def _load_toy(spec: DatasetSpec) -> Splits:
    """Train and test come from two seeds derived from spec.seed, so the held-out set stays
    the same whatever n_train is."""
    n_train = DEFAULT_TOY_TRAIN if spec.n_train is None else spec.n_train
    n_test = DEFAULT_TOY_TEST if spec.n_test is None else spec.n_test
    train_seed, test_seed = (int(s) for s in np.random.SeedSequence(spec.seed).generate_state(2))
    draw = TOYS[spec.name]
    return Splits(draw(n_train, train_seed).astype(np.float32), draw(n_test, test_seed).astype(np.float32), "points")


# --------------------------------------------------------------------------- helpers


def _cap(n_wanted: int | None, n_available: int) -> int:
    return n_available if n_wanted is None else min(n_wanted, n_available)


def _split(
    data: np.ndarray, spec: DatasetSpec, kind: str, labels: np.ndarray | None = None, default_test: int | None = None
) -> Splits:
    """Shuffle once with the spec's seed, take the test split first, cap the rest as train."""
    n = len(data)
    if n < 2:
        raise DatasetError(f"dataset {spec.name}: holds {n} item(s); need at least 2 to split into train and test")
    if default_test is None:
        default_test = max(1, round(0.1 * n))
    n_test = default_test if spec.n_test is None else spec.n_test
    if not 0 < n_test < n:
        raise DatasetError(f"data.n_test: {n_test} must be between 1 and {n - 1}: dataset {spec.name} has {n} items "
                           "and training needs at least one")
    order = np.random.default_rng(spec.seed).permutation(n)
    test_idx, train_idx = order[:n_test], order[n_test:]
    train_idx = train_idx[: _cap(spec.n_train, len(train_idx))]
    if labels is None:
        return Splits(data[train_idx], data[test_idx], kind)
    labels = labels.astype(np.int64)
    return Splits(data[train_idx], data[test_idx], kind, labels[train_idx], labels[test_idx])


def _uint8_to_unit(images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) / 127.5 - 1.0).astype(np.float32)


# --------------------------------------------------------------------------- builtin / files


def _load_digits(spec: DatasetSpec) -> Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images[:, None] / 16.0 * 2.0 - 1.0).astype(np.float32)
    splits = _split(images, spec, "images", digits.target, default_test=DEFAULT_DIGITS_TEST)
    return replace(splits, levels=DIGITS_LEVELS)


def _load_breast_cancer(spec: DatasetSpec) -> Splits:
    """scikit-learn's Wisconsin breast-cancer table: 569 rows of 30 continuous measurements (the
    largest continuous table that ships with scikit-learn, so no download), a real density task
    above 2-D. Standardized with the training split's mean and deviation (the test split is
    scaled by them too, so it is never looked at); the class labels are kept."""
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    rows = table.data.astype(np.float64)
    default_test = round(DEFAULT_TABULAR_TEST_FRACTION * len(rows))
    splits = _split(rows, spec, "points", table.target, default_test=default_test)
    mean, std = splits.train.mean(0), splits.train.std(0)
    return replace(splits, train=((splits.train - mean) / std).astype(np.float32),
                   test=((splits.test - mean) / std).astype(np.float32))


def _require_path(spec: DatasetSpec) -> Path:
    if not spec.path:
        raise DatasetError(f"data.path is required for dataset {spec.name!r}")
    return Path(spec.path)


NPY_MAGIC = b"\x93NUMPY"


def _what_it_is(head: bytes) -> str:
    """What a file that is not a .npy array looks like, from its first bytes."""
    if not head:
        return "an empty file"
    for magic, what in ((b"PK\x03\x04", "a zip archive (an .npz? save one array with numpy.save)"),
                        (b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                        (b"\x80", "a Python pickle")):
        if head.startswith(magic):
            return what
    try:
        return f"text starting {head.decode('utf-8').splitlines()[0][:24]!r}"
    except (UnicodeDecodeError, IndexError):
        return "binary data without the .npy header"


def _npy_header(path: Path, field: str = "data.path") -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a .npy file, read from its header alone; refuses anything that is not
    a complete numeric array (another format, Python objects, text, a truncated file), in an error
    naming the config `field` it came from."""
    with open(path, "rb") as f:
        head = f.read(len(NPY_MAGIC))
        if head != NPY_MAGIC:
            raise DatasetError(f"{field}: {path} is not a .npy file: it is {_what_it_is(head + f.read(58))}"
                               " — expected an array saved with numpy.save")
        f.seek(0)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
        except ValueError as err:
            raise DatasetError(f"{field}: {path} has a damaged .npy header ({err})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise DatasetError(f"{field}: {path} holds Python objects (dtype object) — expected numbers")
    if dtype.kind not in "iuf":
        raise DatasetError(f"{field}: {path} has dtype {dtype} — expected numbers (integers or floats)")
    expected, size = offset + int(np.prod(shape)) * dtype.itemsize, path.stat().st_size
    if size < expected:
        raise DatasetError(f"{field}: {path} is truncated: {size} bytes, but a {dtype} array of shape {shape} "
                           f"takes {expected}")
    return tuple(shape), dtype


def _as_float32(array: np.ndarray, path: Path, field: str = "data.path") -> np.ndarray:
    """`array` as float32, or a DatasetError naming the first non-finite value: a NaN or Inf in
    the file, or a number float32 cannot hold."""
    with np.errstate(over="ignore"):
        converted = array.astype(np.float32)
    bad = ~np.isfinite(converted)
    if not bad.any():
        return converted
    item = int(np.argwhere(bad)[0][0])
    if np.isfinite(array).all():
        biggest = float(np.abs(array).max())
        raise DatasetError(f"{field}: {path} holds values float32 cannot hold (up to {biggest:.3g}, first in "
                           f"item {item}) — expected finite numbers of a sensible scale")
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    raise DatasetError(f"{field}: {path} holds {nan} NaN and {inf} infinite values (first in item {item}) "
                       "— expected finite numbers")


def _read_npy(path: Path, field: str) -> np.ndarray:
    """A checked .npy array (never unpickled): a file, a numeric header, items of (d,), (H, W) or
    (C, H, W), at least 2 of them; any problem is one DatasetError naming `field`."""
    if not path.is_file():
        raise DatasetError(f"{field}: {path} does not exist — expected a .npy file")
    shape, _ = _npy_header(path, field)
    expected = "expected (N, d) points or (N, H, W)/(N, C, H, W) images"
    if len(shape) not in (2, 3, 4):
        raise DatasetError(f"{field}: {path} has shape {shape} — {expected}")
    if shape[0] < 2:
        raise DatasetError(f"{field}: {path} has shape {shape}: {shape[0]} item(s) — need at least 2 "
                           "to split into train and test")
    if 0 in shape[1:]:
        raise DatasetError(f"{field}: {path} has shape {shape}: items of size 0 — {expected}")
    return np.load(path, allow_pickle=False)


def _npy_test_file(spec: DatasetSpec, train: np.ndarray) -> Splits:
    """Points from two files: `path` is the training split, `test_path` the held-out one."""
    path, test_path = Path(spec.path), Path(spec.test_path)
    test = _read_npy(test_path, "data.test_path")
    if train.ndim != 2 or test.shape[1:] != train.shape[1:]:
        raise DatasetError(f"data.test_path: {test_path} holds items of shape {test.shape[1:]}, but {path} holds "
                           f"{train.shape[1:]} — expected (N, d) points of the same d in both files")
    train = _as_float32(train, path)[: _cap(spec.n_train, len(train))]
    test = _as_float32(test, test_path, "data.test_path")[: _cap(spec.n_test, len(test))]
    return Splits(train, test, "points")


def _load_npy(spec: DatasetSpec) -> Splits:
    path = _require_path(spec)
    array = _read_npy(path, "data.path")
    if spec.test_path:
        return _npy_test_file(spec, array)
    if array.ndim == 2:
        return _split(_as_float32(array, path), spec, "points")
    if array.ndim == 3:
        array = array[:, None]
    if array.shape[1] not in (1, 3):
        raise DatasetError(
            f"data.path: {path} has shape {array.shape} — images need 1 or 3 channels first: (N, C, H, W)"
        )
    levels = None
    if array.dtype == np.uint8:
        images, levels = _uint8_to_unit(array), UINT8_LEVELS
    elif np.issubdtype(array.dtype, np.floating):
        images = _as_float32(array, path)  # quantization unknown: treated as continuous
        low, high = float(images.min()), float(images.max())
        if low < -1.0 - 1e-6 or high > 1.0 + 1e-6:
            raise DatasetError(
                f"data.path: {path} float images span [{low:.3g}, {high:.3g}] — expected [-1, 1] or uint8"
            )
    else:
        raise DatasetError(
            f"data.path: {path} has dtype {array.dtype} — images must be uint8 0..255 or floats in [-1, 1]"
        )
    return replace(_split(images, spec, "images"), levels=levels)


def _open_image(file: Path, decode: bool = True):
    """An open PIL image (decoded now when `decode`, so a truncated file fails here), or a
    DatasetError naming the file that cannot be read."""
    from PIL import Image, UnidentifiedImageError

    img = None
    try:
        img = Image.open(file)
        if decode:
            img.load()
        return img
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if img is not None:
            img.close()
        if isinstance(err, UnidentifiedImageError):
            reason = "not an image format Pillow recognizes, or a damaged header"
        else:
            reason = " ".join(str(err).split()) or type(err).__name__
        raise DatasetError(f"data.path: {file} cannot be decoded as an image ({reason})") from None


def _image_mode(file: Path) -> str:
    with _open_image(file, decode=False) as img:
        return img.mode


def _read_image(file: Path, mode: str, size: int | None) -> np.ndarray:
    from PIL import Image

    with _open_image(file) as img:
        img = img.convert(mode)
        if size is not None:
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        pixels = np.asarray(img, dtype=np.uint8)
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _load_image_folder(spec: DatasetSpec) -> Splits:
    folder = _require_path(spec)
    if not folder.is_dir():
        raise DatasetError(f"data.path: {folder} is not a folder — expected a folder of .png/.jpg/.jpeg images")
    files = _image_files(folder)
    if not files:
        raise DatasetError(f"data.path: {folder} holds no .png/.jpg/.jpeg images")
    if spec.channels not in (None, 1, 3):
        raise DatasetError(f"data.channels: {spec.channels} — expected 1 or 3")
    if spec.channels is None:
        mode = "L" if all(_image_mode(f) in ("1", "L", "LA") for f in files) else "RGB"
    else:
        mode = "L" if spec.channels == 1 else "RGB"
    images = [_read_image(f, mode, spec.image_size) for f in files]
    for file, image in zip(files, images):
        if image.shape != images[0].shape:
            raise DatasetError(
                f"data.path: {file} is {image.shape[2]}x{image.shape[1]} but {files[0].name} is "
                f"{images[0].shape[2]}x{images[0].shape[1]} — set image_size to resize all images"
            )
    if len(images) < 2:
        raise DatasetError(f"data.path: {folder} holds a single image — need at least 2 to split")
    return replace(_split(_uint8_to_unit(np.stack(images)), spec, "images"), levels=UINT8_LEVELS)


# --------------------------------------------------------------------------- torchvision


TORCHVISION_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def _torchvision_missing(spec: DatasetSpec, problem: str, hint: str | None = None) -> DatasetError:
    root = _require_path(spec)
    if spec.name == "mnist":
        where = f"{root}/MNIST/raw (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-*)"
    else:
        where = f"{root}/cifar-10-batches-py (data_batch_1..5, test_batch, batches.meta with the official md5 sums)"
    hint = hint or "`download: true` fetches them but needs internet"
    return DatasetError(f"data.path: {spec.name} {problem} in {where} — {hint}")


def torchvision_files(spec: DatasetSpec) -> list[Path]:
    """The files torchvision reads for an MNIST / CIFAR-10 spec (the loaders check their md5 sums)."""
    from torchvision import datasets

    root = _require_path(spec)
    if spec.name == "mnist":
        return [root / "MNIST" / "raw" / Path(name).stem for name, _ in datasets.MNIST.resources]
    cifar = datasets.CIFAR10
    names = [name for name, _ in cifar.train_list + cifar.test_list] + [cifar.meta["filename"]]
    return [root / cifar.base_folder / name for name in names]


def check_torchvision_files(spec: DatasetSpec) -> tuple[int, ...]:
    """The item shape of a torchvision dataset, after checking its files are there (or will be
    downloaded), without reading them."""
    missing = [f for f in torchvision_files(spec) if not f.is_file()]
    if missing and not spec.download:
        raise _torchvision_missing(spec, f"file {missing[0].name} not found")
    return TORCHVISION_SHAPES[spec.name]


def _torchvision_arrays(spec: DatasetSpec, train: bool) -> tuple[np.ndarray, np.ndarray]:
    """Official split as uint8 (N, C, H, W) and int64 labels, through torchvision's own readers.

    CIFAR-10's batches are Python pickles that torchvision unpickles; that is safe only because
    torchvision first checks every file against the official md5 sums, so nothing but the
    published CIFAR-10 files is ever unpickled.
    """
    from torchvision import datasets

    factory = datasets.MNIST if spec.name == "mnist" else datasets.CIFAR10
    try:
        dataset = factory(root=str(_require_path(spec)), train=train, download=spec.download)
    except (RuntimeError, OSError) as err:
        failed = f"the download failed: {' '.join(str(err).split())}" if spec.download else None
        raise _torchvision_missing(spec, "files not found or corrupted", failed) from err
    data = np.asarray(dataset.data, dtype=np.uint8)
    images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
    return images, np.asarray(dataset.targets, dtype=np.int64)


def _load_torchvision(spec: DatasetSpec) -> Splits:
    rng = np.random.default_rng(spec.seed)
    parts = []
    for train, n_wanted in ((True, spec.n_train), (False, spec.n_test)):
        images, labels = _torchvision_arrays(spec, train)
        keep = np.sort(rng.permutation(len(images))[: _cap(n_wanted, len(images))])
        parts.append((_uint8_to_unit(images[keep]), labels[keep]))
    (train_x, train_y), (test_x, test_y) = parts
    return Splits(train_x, test_x, "images", train_y, test_y, levels=UINT8_LEVELS)


# --------------------------------------------------------------------------- public API


_LOADERS: dict[str, Callable[[DatasetSpec], Splits]] = {
    **{name: _load_toy for name in TOY_2D},
    "breast_cancer": _load_breast_cancer,
    "digits": _load_digits,
    "mnist": _load_torchvision,
    "cifar10": _load_torchvision,
    "npy": _load_npy,
    "image_folder": _load_image_folder,
}


def source_files(spec: DatasetSpec) -> list[Path]:
    """The files a dataset is read from (empty for the generated and bundled ones): what its
    version must be keyed by, since a file changed in place is a new version."""
    if spec.name == "npy":
        return [_require_path(spec)] + ([Path(spec.test_path)] if spec.test_path else [])
    if spec.name == "image_folder":
        folder = _require_path(spec)
        return _image_files(folder) if folder.is_dir() else []
    if spec.name in TORCHVISION_SHAPES:
        return torchvision_files(spec)
    return []


def load_dataset(spec: DatasetSpec) -> Splits:
    """Load the dataset a spec names; deterministic for a given spec."""
    if spec.name not in _LOADERS:
        raise DatasetError(f"dataset.name: {spec.name!r} is unknown — expected one of {', '.join(DATASETS)}")
    return replace(_LOADERS[spec.name](spec), spec=spec)


def sample_standard_normal(shape: tuple[int, ...], n: int, seed: int) -> np.ndarray:
    """N(0, I) source samples of the given per-item shape, for flows that start from noise."""
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def data_shape(splits: Splits) -> tuple[int, ...]:
    """Shape of one item: (d,) for points, (C, H, W) for images."""
    return tuple(int(s) for s in splits.train.shape[1:])


_ARRAY_FIELDS = ("train", "test", "train_labels", "test_labels")


def save_splits(splits: Splits, folder: Path) -> None:
    """Write the arrays and a meta.json; byte-identical for identical inputs (no timestamps)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = {}
    for field in _ARRAY_FIELDS:
        array = getattr(splits, field)
        if array is not None:
            np.save(folder / f"{field}.npy", np.ascontiguousarray(array), allow_pickle=False)
            shapes[field] = list(array.shape)
    spec = splits.spec
    meta = {
        "kind": splits.kind,
        "levels": splits.levels,
        "name": None if spec is None else spec.name,
        "shapes": shapes,
        "spec": None if spec is None else spec.fields(),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_splits(folder: Path) -> Splits:
    """Read what :func:`save_splits` wrote; never unpickles."""
    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {
        field: np.load(folder / f"{field}.npy", allow_pickle=False) if field in meta["shapes"] else None
        for field in _ARRAY_FIELDS
    }
    spec = None if meta["spec"] is None else DatasetSpec(**meta["spec"])
    return Splits(kind=meta["kind"], spec=spec, levels=meta.get("levels"), **arrays)
