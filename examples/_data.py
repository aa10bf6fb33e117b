"""Datasets, splits and the resumable sharded sampler of the reference training loop.

Every split yields ``(image, label)`` with the image a float tensor (C, H, W) in [0, 1]
(normalization, when a setting uses it, is the first layer of the model, so attacks work
in pixel space) and the label an int.

Sources:
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, offline).
- ``mnist``: MNIST-format IDX files (``train-images-idx3-ubyte[.gz]`` ...) read directly
  from ``data_dir`` (or ``data_dir/MNIST/raw``); downloaded through torchvision when absent
  and ``download`` is on.
- ``cifar10`` / ``cifar100``: torchvision (download on first use).
- ``tinyimagenet``: ``data_dir/tiny-imagenet-200`` as distributed (``train/<wnid>/images``,
  ``val/images`` + ``val/val_annotations.txt``), or ``train/`` and ``val/`` class folders.
- ``imagenet``: ``data_dir/train/<wnid>/*`` and ``data_dir/val/<wnid>/*`` (ImageFolder).

The validation split used to fit the budgeted-evaluation thresholds is held out of the
training set with ``split_seed``; the test split is the official one (for digits, carved
out with the same seed).
"""

from __future__ import annotations

import gzip
import math
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _config import DataConfig
from torch import Tensor
from torch.utils.data import Dataset, Sampler, Subset

# Per-channel statistics of the training sets (used only when data.normalize is on).
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "tinyimagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "mnist": ((0.1307,), (0.3081,)),
    "digits": ((0.3,), (0.4,)),
}
_NUM_CLASSES = {
    "digits": 10,
    "mnist": 10,
    "cifar10": 10,
    "cifar100": 100,
    "tinyimagenet": 200,
    "imagenet": 1000,
}


class DatasetError(FileNotFoundError):
    """A dataset is missing or malformed; the message says what was expected where."""


# --------------------------------------------------------------------------- IDX files

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw, into a numpy array.

    Format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then each dimension as a
    big-endian uint32, then the data in C order. Compression is detected from the
    content (gzip magic bytes), not the file name.

    Raises:
        DatasetError: if the file is missing, truncated or not an IDX file.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"IDX file {str(path)!r} not found.")
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as err:
            raise DatasetError(f"{path}: corrupt gzip data ({err}).") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(
            f"{path}: not an IDX file; expected a header 00 00 <type in "
            f"{sorted(hex(k) for k in _IDX_DTYPES)}> <ndim>, got {data[:4].hex(' ')!r}."
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated header ({len(data)} bytes for {ndim} dimensions).")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise DatasetError(
            f"{path}: size mismatch; the header announces shape {shape} of {dtype} "
            f"({expected} bytes with the header), the file holds {len(data)} bytes."
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )


_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def find_mnist_files(data_dir: str | Path) -> dict[str, Path] | None:
    """Locate the four MNIST IDX files (raw or ``.gz``) in ``data_dir`` or ``data_dir/MNIST/raw``."""
    for folder in (Path(data_dir), Path(data_dir) / "MNIST" / "raw", Path(data_dir) / "mnist"):
        found: dict[str, Path] = {}
        for key, stem in _MNIST_FILES.items():
            for candidate in (folder / stem, folder / f"{stem}.gz"):
                if candidate.is_file():
                    found[key] = candidate
                    break
        if len(found) == len(_MNIST_FILES):
            return found
    return None


def load_mnist_idx(data_dir: str | Path) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Read MNIST from IDX files: (train images uint8 (N, 1, H, W), labels int64, test ...)."""
    files = find_mnist_files(data_dir)
    if files is None:
        names = ", ".join(f"{s}[.gz]" for s in _MNIST_FILES.values())
        raise DatasetError(
            f"MNIST IDX files not found in {str(data_dir)!r} (nor in its MNIST/raw or mnist "
            f"subfolder); expected {names}. Put them there, or set data.download = true."
        )
    arrays = {key: read_idx(path) for key, path in files.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"MNIST {split} files disagree: images {images.shape} (expected (N, H, W)), "
                f"labels {labels.shape} (expected (N,)); files {files[f'{split}_images']}, "
                f"{files[f'{split}_labels']}."
            )
        if labels.size and (labels.min() < 0 or labels.max() > 9):
            raise DatasetError(
                f"MNIST {split} labels must be in 0..9, got {labels.min()}..{labels.max()} "
                f"in {files[f'{split}_labels']}."
            )
    return (
        torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1),
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


# ------------------------------------------------------------------------ datasets


class TensorImages(Dataset[tuple[Tensor, int]]):
    """In-memory images (N, C, H, W), uint8 in 0..255 or float in [0, 1], with int labels."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.images[index]
        if image.dtype == torch.uint8:
            image = image.float().div_(255)
        return image, int(self.labels[index])


class _AnnotatedFolder(Dataset[tuple[Tensor, int]]):
    """Tiny-ImageNet's flat ``val/images`` with ``val_annotations.txt`` (file<TAB>wnid...)."""

    def __init__(self, root: Path, class_to_idx: dict[str, int], transform: Any) -> None:
        from torchvision.datasets.folder import default_loader

        self.loader, self.transform = default_loader, transform
        self.samples: list[tuple[Path, int]] = []
        for line in (root / "val_annotations.txt").read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 2:
                continue
            if parts[1] not in class_to_idx:
                raise DatasetError(
                    f"{root / 'val_annotations.txt'}: class {parts[1]!r} is not a training class."
                )
            self.samples.append((root / "images" / parts[0], class_to_idx[parts[1]]))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        return self.transform(self.loader(str(path))), label


@dataclass
class Splits:
    """The three splits and the facts the model needs about them."""

    train: Dataset[tuple[Tensor, int]]
    val: Dataset[tuple[Tensor, int]]
    test: Dataset[tuple[Tensor, int]]
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None


def _permutation(n: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _hold_out(
    n: int, val_size: int, seed: int, train_cap: int, dataset: str
) -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into (train, val) indices with a seeded permutation."""
    if val_size >= n:
        raise DatasetError(
            f"data.val_size = {val_size} leaves no training samples: the {dataset} training "
            f"set has {n}. Lower data.val_size."
        )
    perm = _permutation(n, seed).tolist()
    val, train = perm[:val_size], perm[val_size:]
    if train_cap:
        train = train[:train_cap]
    return train, val


def _cap(dataset: Dataset[Any], cap: int, seed: int) -> Dataset[Any]:
    n = len(dataset)  # type: ignore[arg-type]
    if not cap or cap >= n:
        return dataset
    return Subset(dataset, _permutation(n, seed + 1).tolist()[:cap])


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797, 8, 8) values in 0..16 and (1797,) labels.

    Reads the CSV file scikit-learn ships (``sklearn/datasets/data/digits.csv.gz``)
    without importing scikit-learn itself, which takes seconds; falls back to
    ``sklearn.datasets.load_digits`` if the file is not where it is expected.
    """
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DatasetError(
            "the digits dataset ships with scikit-learn, which is not installed: "
            "pip install scikit-learn (or 'neokd-losses[examples]')."
        )
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # pragma: no cover - other sklearn layouts

    bunch = load_digits()  # pragma: no cover
    return bunch.images, bunch.target  # pragma: no cover


def _digits(cfg: DataConfig) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
    raw_images, raw_labels = load_digits_arrays()
    images = torch.as_tensor(raw_images, dtype=torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.as_tensor(raw_labels, dtype=torch.int64)
    n = labels.shape[0]
    if cfg.test_size + cfg.val_size >= n:
        raise DatasetError(
            f"data.test_size + data.val_size = {cfg.test_size + cfg.val_size} leaves no "
            f"training samples: the digits set has {n} images."
        )
    perm = _permutation(n, cfg.split_seed)
    test_idx, rest = perm[: cfg.test_size], perm[cfg.test_size :]
    val_idx, train_idx = rest[: cfg.val_size], rest[cfg.val_size :]
    if cfg.train_cap:
        train_idx = train_idx[: cfg.train_cap]
    return (
        TensorImages(images[train_idx], labels[train_idx]),
        TensorImages(images[val_idx], labels[val_idx]),
        TensorImages(images[test_idx], labels[test_idx]),
    )


def _mnist(cfg: DataConfig) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
    if find_mnist_files(cfg.data_dir) is None and cfg.download:
        from torchvision.datasets import MNIST

        for is_train in (True, False):  # places the IDX files under data_dir/MNIST/raw
            MNIST(cfg.data_dir, train=is_train, download=True)
    x_train, y_train, x_test, y_test = load_mnist_idx(cfg.data_dir)
    train_idx, val_idx = _hold_out(
        len(y_train), cfg.val_size, cfg.split_seed, cfg.train_cap, "mnist"
    )
    train = TensorImages(x_train[train_idx], y_train[train_idx])
    val = TensorImages(x_train[val_idx], y_train[val_idx])
    return train, val, TensorImages(x_test, y_test)


def _transforms(dataset: str, augment: bool) -> tuple[Any, Any]:
    from torchvision import transforms as T

    if dataset in ("cifar10", "cifar100"):
        train = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []
        return T.Compose([*train, T.ToTensor()]), T.ToTensor()
    if dataset == "tinyimagenet":
        train = [T.RandomCrop(64, padding=8), T.RandomHorizontalFlip()] if augment else []
        return T.Compose([*train, T.ToTensor()]), T.ToTensor()
    train_tf = (
        [T.RandomResizedCrop(224), T.RandomHorizontalFlip()]
        if augment
        else [T.Resize(256), T.CenterCrop(224)]
    )
    eval_tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor()])
    return T.Compose([*train_tf, T.ToTensor()]), eval_tf


def _cifar(cfg: DataConfig) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
    from torchvision import datasets

    cls = datasets.CIFAR10 if cfg.dataset == "cifar10" else datasets.CIFAR100
    train_tf, eval_tf = _transforms(cfg.dataset, cfg.augment)
    try:
        train_full = cls(cfg.data_dir, train=True, transform=train_tf, download=cfg.download)
        train_plain = cls(cfg.data_dir, train=True, transform=eval_tf, download=False)
        test = cls(cfg.data_dir, train=False, transform=eval_tf, download=cfg.download)
    except RuntimeError as err:
        raise DatasetError(
            f"{cfg.dataset} not found under {cfg.data_dir!r} ({err}); set data.download = true "
            "to fetch it through torchvision, or point --data-dir at the folder holding "
            f"{'cifar-10-batches-py' if cfg.dataset == 'cifar10' else 'cifar-100-python'}."
        ) from err
    train_idx, val_idx = _hold_out(
        len(train_full), cfg.val_size, cfg.split_seed, cfg.train_cap, cfg.dataset
    )
    return Subset(train_full, train_idx), Subset(train_plain, val_idx), test


def _image_folders(cfg: DataConfig) -> tuple[Dataset[Any], Dataset[Any], Dataset[Any]]:
    from torchvision.datasets import ImageFolder

    root = Path(cfg.data_dir)
    for candidate in (root / "tiny-imagenet-200", root / "imagenet", root):
        if (candidate / "train").is_dir():
            root = candidate
            break
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        layout = (
            "tiny-imagenet-200/{train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt}"
            if cfg.dataset == "tinyimagenet"
            else "{train,val}/<wnid>/*.JPEG"
        )
        raise DatasetError(
            f"{cfg.dataset} not found under {cfg.data_dir!r}: expected {layout} there "
            "(torchvision cannot download it). Pass --data-dir."
        )
    train_tf, eval_tf = _transforms(cfg.dataset, cfg.augment)
    train_full = ImageFolder(str(root / "train"), transform=train_tf)
    train_plain = ImageFolder(str(root / "train"), transform=eval_tf)
    expected = _NUM_CLASSES[cfg.dataset]
    if len(train_full.classes) != expected:
        raise DatasetError(
            f"{root / 'train'} holds {len(train_full.classes)} class folders, {cfg.dataset} "
            f"has {expected}."
        )
    val_dir = root / "val"
    test: Dataset[Any]
    if (val_dir / "val_annotations.txt").is_file():
        test = _AnnotatedFolder(val_dir, train_full.class_to_idx, eval_tf)
    else:
        test = ImageFolder(str(val_dir), transform=eval_tf)
        if test.class_to_idx != train_full.class_to_idx:
            raise DatasetError(f"{val_dir} and {root / 'train'} have different class folders.")
    train_idx, val_idx = _hold_out(
        len(train_full), cfg.val_size, cfg.split_seed, cfg.train_cap, cfg.dataset
    )
    return Subset(train_full, train_idx), Subset(train_plain, val_idx), test


def build_splits(cfg: DataConfig) -> Splits:
    """Build the train / validation / test splits of a data config.

    ``train_cap`` keeps the first samples of the seeded training permutation, ``eval_cap``
    a seeded subset of the test split; the validation split is ``val_size`` samples.

    Raises:
        DatasetError: if files are missing or malformed, or the sizes do not fit.
    """
    builders = {
        "digits": _digits,
        "mnist": _mnist,
        "cifar10": _cifar,
        "cifar100": _cifar,
        "tinyimagenet": _image_folders,
        "imagenet": _image_folders,
    }
    train, val, test = builders[cfg.dataset](cfg)
    test = _cap(test, cfg.eval_cap, cfg.split_seed)
    sizes = {"digits": (1, 8), "mnist": (1, 28), "cifar10": (3, 32), "cifar100": (3, 32)}
    channels, size = sizes.get(cfg.dataset, (3, 64 if cfg.dataset == "tinyimagenet" else 224))
    mean, std = _STATS[cfg.dataset] if cfg.normalize else (None, None)
    return Splits(train, val, test, _NUM_CLASSES[cfg.dataset], channels, size, mean, std)


# ------------------------------------------------------------------ augmentation


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index``'s random transforms in ``epoch`` (a 63-bit integer)."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % 2**63


class EpochSeeded(Dataset[tuple[Tensor, int]]):
    """A training set whose random transforms are a function of (seed, epoch, index).

    Indexed with the ``(index, epoch)`` pairs of ``ShardedSampler(with_epoch=True)``: each
    sample is loaded with torch's RNG seeded by :func:`sample_seed` (and the caller's RNG
    state restored afterwards). A sample's crop and flip therefore do not depend on which
    DataLoader worker loads it, on the batches before it or on the world size, so a run
    resumed in the middle of an epoch, with worker processes, draws the same augmentation
    as an uninterrupted one. Datasets without random transforms are unaffected.
    """

    def __init__(self, dataset: Dataset[tuple[Tensor, int]], seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        index, epoch = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]


# ------------------------------------------------------------------------- sampler


class ShardedSampler(Sampler[int]):
    """A seeded, sharded, resumable sampler (what DistributedSampler does, plus a start).

    The epoch's order is a function of ``(seed, epoch)`` only, so a resumed run draws the
    same order. With ``pad`` the indices are padded (repeating the first ones) to a
    multiple of ``world_size`` so every rank runs the same number of batches (training);
    without it rank r gets every ``world_size``-th index from r (evaluation: no sample is
    counted twice). ``skip`` drops the first samples of this rank's share, for resuming in
    the middle of an epoch. With ``with_epoch`` it yields ``(index, epoch)`` pairs, the keys
    of an :class:`EpochSeeded` dataset.
    """

    def __init__(
        self,
        data: Sized,
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        pad: bool = True,
        with_epoch: bool = False,
    ) -> None:
        self.size, self.rank, self.world_size = len(data), rank, world_size
        self.shuffle, self.seed, self.pad = shuffle, seed, pad
        self.with_epoch = with_epoch
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def _indices(self) -> list[int]:
        if self.shuffle:
            # Not seed + epoch: seed s at epoch e + 1 would draw seed s + 1's order at
            # epoch e, so runs of consecutive seeds would share their data orders.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.pad and self.size % self.world_size:
            extra = self.world_size - self.size % self.world_size
            order += (order * math.ceil(extra / max(1, len(order))))[:extra]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Any]:
        indices = self._indices()[self.skip :]
        if self.with_epoch:
            return iter([(i, self.epoch) for i in indices])
        return iter(indices)

    def __len__(self) -> int:
        per_rank = (
            math.ceil(self.size / self.world_size)
            if self.pad
            else len(range(self.rank, self.size, self.world_size))
        )
        return max(0, per_rank - self.skip)
