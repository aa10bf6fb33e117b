"""Data: IDX files (gz and raw) read directly, digits splits, the sharded resumable sampler."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _config import DataConfig
from _data import (
    DatasetError,
    EpochSeeded,
    ShardedSampler,
    build_splits,
    load_mnist_idx,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, code: int, fmt: str, *, compress: bool) -> None:
    """An independent IDX writer: magic (0, 0, type, ndim), big-endian dims, big-endian data."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    body = struct.pack(f">{array.size}{fmt}", *array.ravel().tolist())
    data = header + body
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize(
    ("code", "fmt", "dtype"),
    [
        (0x08, "B", np.uint8),
        (0x09, "b", np.int8),
        (0x0B, "h", np.int16),
        (0x0C, "i", np.int32),
        (0x0D, "f", np.float32),
        (0x0E, "d", np.float64),
    ],
)
def test_read_idx_every_type(
    tmp_path: Path, compress: bool, code: int, fmt: str, dtype: type
) -> None:
    rng = np.random.default_rng(0)
    array = (rng.integers(0, 100, size=(3, 4, 5)) - (0 if dtype == np.uint8 else 50)).astype(dtype)
    path = tmp_path / "x.idx"
    write_idx(path, array, code, fmt, compress=compress)
    out = read_idx(path)
    assert out.shape == (3, 4, 5) and out.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out, array)


def test_read_idx_detects_gzip_by_content_not_name(tmp_path: Path) -> None:
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    raw_named_gz, gz_named_raw = tmp_path / "a.gz", tmp_path / "b"
    write_idx(raw_named_gz, array, 0x08, "B", compress=False)
    write_idx(gz_named_raw, array, 0x08, "B", compress=True)
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)


def test_read_idx_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(
        DatasetError, match=r"not an IDX file; expected a header 00 00 .* got '01 02 08 01'"
    ):
        read_idx(bad)
    short = tmp_path / "short"
    write_idx(short, np.arange(10, dtype=np.uint8), 0x08, "B", compress=False)
    short.write_bytes(short.read_bytes()[:-3])
    with pytest.raises(DatasetError, match=r"size mismatch; the header announces shape \(10,\)"):
        read_idx(short)
    with pytest.raises(DatasetError, match="not found"):
        read_idx(tmp_path / "missing")
    corrupt = tmp_path / "corrupt"
    corrupt.write_bytes(b"\x1f\x8b" + b"junk")
    with pytest.raises(DatasetError, match="corrupt gzip"):
        read_idx(corrupt)


def _write_mnist(
    folder: Path, compress: bool, n_train: int = 12, n_test: int = 6
) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = (
        rng.integers(0, 256, size=(n_train, 28, 28)).astype(np.uint8),
        rng.integers(0, 10, size=n_train).astype(np.uint8),
        rng.integers(0, 256, size=(n_test, 28, 28)).astype(np.uint8),
        rng.integers(0, 10, size=n_test).astype(np.uint8),
    )
    names = (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    )
    for name, array in zip(names, arrays):
        write_idx(
            folder / (name + (".gz" if compress else "")), array, 0x08, "B", compress=compress
        )
    return arrays


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("subdir", ["", "MNIST/raw"])
def test_mnist_from_idx_files(tmp_path: Path, compress: bool, subdir: str) -> None:
    x_train, y_train, x_test, y_test = _write_mnist(
        tmp_path / subdir if subdir else tmp_path, compress
    )
    a, b, c, d = load_mnist_idx(tmp_path)
    assert a.shape == (12, 1, 28, 28) and a.dtype == torch.uint8 and b.dtype == torch.int64
    np.testing.assert_array_equal(a[:, 0].numpy(), x_train)
    np.testing.assert_array_equal(d.numpy(), y_test.astype(np.int64))
    # Through the dataset builder, no download: values scaled to [0, 1], val held out.
    splits = build_splits(
        DataConfig(dataset="mnist", data_dir=str(tmp_path), download=False, val_size=4)
    )
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 6)
    image, label = splits.test[2]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    torch.testing.assert_close(image[0], torch.from_numpy(x_test[2]).float() / 255)
    assert label == int(y_test[2])


def test_mnist_missing_and_malformed(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError,
        match=r"MNIST IDX files not found in .* expected train-images-idx3-ubyte\[.gz\]",
    ):
        build_splits(
            DataConfig(dataset="mnist", data_dir=str(tmp_path), download=False, val_size=1)
        )
    _write_mnist(tmp_path, compress=False)
    write_idx(
        tmp_path / "t10k-labels-idx1-ubyte", np.arange(5, dtype=np.uint8), 0x08, "B", compress=False
    )
    with pytest.raises(
        DatasetError, match=r"MNIST test files disagree: images \(6, 28, 28\).*labels \(5,\)"
    ):
        load_mnist_idx(tmp_path)
    write_idx(
        tmp_path / "t10k-labels-idx1-ubyte",
        np.full(6, 12, dtype=np.uint8),
        0x08,
        "B",
        compress=False,
    )
    with pytest.raises(DatasetError, match=r"labels must be in 0..9, got 12..12"):
        load_mnist_idx(tmp_path)


def test_image_folder_missing(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetError,
        match=r"tinyimagenet not found under .*tiny-imagenet-200/\{train/<wnid>/images",
    ):
        build_splits(
            DataConfig(dataset="tinyimagenet", data_dir=str(tmp_path), download=False, val_size=1)
        )


def test_digits_splits_are_disjoint_and_seeded() -> None:
    cfg = DataConfig(dataset="digits", test_size=300, val_size=200, split_seed=3)
    a, b = build_splits(cfg), build_splits(cfg)
    assert (len(a.train), len(a.val), len(a.test)) == (1797 - 500, 200, 300)
    assert (a.num_classes, a.in_channels, a.image_size) == (10, 1, 8)
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.train.labels, b.train.labels)
    # The three splits partition the dataset: together they are exactly its rows.
    from sklearn.datasets import load_digits

    def rows(images: torch.Tensor, labels: torch.Tensor) -> list[bytes]:
        pixels = (images.flatten(1) * 16).round().to(torch.uint8).numpy()
        return sorted(p.tobytes() + bytes([int(y)]) for p, y in zip(pixels, labels))

    full = load_digits()
    everything = rows(
        torch.cat([a.train.images, a.val.images, a.test.images]),
        torch.cat([a.train.labels, a.val.labels, a.test.labels]),
    )
    assert everything == rows(
        torch.as_tensor(full.images).unsqueeze(1) / 16, torch.as_tensor(full.target)
    )
    assert float(a.train.images.min()) == 0.0 and float(a.train.images.max()) == 1.0
    capped = build_splits(
        DataConfig(
            dataset="digits", test_size=300, val_size=200, split_seed=3, train_cap=50, eval_cap=40
        )
    )
    assert (len(capped.train), len(capped.test)) == (50, 40)
    assert torch.equal(capped.train.images, a.train.images[:50])
    with pytest.raises(DatasetError, match="leaves no training samples"):
        build_splits(DataConfig(dataset="digits", test_size=1000, val_size=797))


@pytest.mark.parametrize(("size", "world"), [(10, 1), (10, 3), (7, 2), (2, 4)])
def test_sharded_sampler_partitions_and_pads(size: int, world: int) -> None:
    data = range(size)
    train = [ShardedSampler(data, rank=r, world_size=world, seed=5) for r in range(world)]
    for s in train:
        s.set_epoch(2)
    shares = [list(s) for s in train]
    assert len({len(x) for x in shares}) == 1 and all(
        len(x) == len(s) for x, s in zip(shares, train)
    )
    flat = [i for x in shares for i in x]
    assert set(flat) == set(range(size)) and len(flat) == -(-size // world) * world
    expected = torch.randperm(size, generator=torch.Generator().manual_seed(5 * 1_000_003 + 2))
    expected = expected.tolist()
    assert shares[0][0] == expected[0]
    # Evaluation: no padding, every index exactly once.
    evals = [
        list(ShardedSampler(data, rank=r, world_size=world, shuffle=False, pad=False))
        for r in range(world)
    ]
    assert sorted(i for x in evals for i in x) == list(range(size))


def test_sharded_sampler_order_depends_on_epoch_only_and_skip_resumes() -> None:
    s = ShardedSampler(range(20), seed=1)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first
    s.set_epoch(0, skip=8)
    assert list(s) == first[8:] and len(s) == 12


def test_consecutive_seeds_do_not_share_data_orders() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        s = ShardedSampler(range(50), seed=seed)
        s.set_epoch(epoch)
        return list(s)

    orders = [order(seed, epoch) for seed in range(3) for epoch in range(20)]
    assert len({tuple(o) for o in orders}) == len(orders)


class _RandomlyAugmented(torch.utils.data.Dataset):
    """Each sample is its index plus a draw of torch's global RNG, as a random crop is."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.rand(()) + index, index


def test_epoch_seeded_augmentation_depends_on_seed_epoch_and_index_only() -> None:
    data = EpochSeeded(_RandomlyAugmented(), seed=3)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    first = data[(4, 1)][0]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is untouched
    torch.manual_seed(123)  # whatever ran before does not matter
    assert torch.equal(data[(4, 1)][0], first) and int(first) == 4
    others = [data[(4, 2)][0], EpochSeeded(_RandomlyAugmented(), seed=4)[(4, 1)][0]]
    assert all(not torch.equal(x, first) for x in others)
    s = ShardedSampler(data, seed=0, with_epoch=True)
    s.set_epoch(5, skip=3)
    keys = list(s)
    assert len(keys) == len(s) == 7 and {e for _, e in keys} == {5}
    s.with_epoch = False
    assert [i for i, _ in keys] == list(s)


def test_digits_reader_matches_scikit_learn() -> None:
    from _data import load_digits_arrays
    from sklearn.datasets import load_digits

    images, labels = load_digits_arrays()
    reference = load_digits()
    np.testing.assert_array_equal(images, reference.images)
    np.testing.assert_array_equal(labels, reference.target)


def test_tiny_imagenet_layout_as_distributed(tmp_path: Path) -> None:
    from PIL import Image

    root = tmp_path / "tiny-imagenet-200"
    wnids = [f"n{i:08d}" for i in range(200)]
    for k, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        Image.new("RGB", (64, 64), (k, 0, 0)).save(folder / f"{wnid}_0.JPEG", format="PNG")
    (root / "val" / "images").mkdir(parents=True)
    annotations = []
    for j, k in enumerate([5, 199, 0]):
        Image.new("RGB", (64, 64), (k, 0, 0)).save(
            root / "val" / "images" / f"val_{j}.JPEG", format="PNG"
        )
        annotations.append(f"val_{j}.JPEG\t{wnids[k]}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    splits = build_splits(
        DataConfig(dataset="tinyimagenet", data_dir=str(tmp_path), download=False, val_size=10)
    )
    assert (len(splits.train), len(splits.val), len(splits.test), splits.num_classes) == (
        190,
        10,
        3,
        200,
    )
    for j, k in enumerate([5, 199, 0]):
        image, label = splits.test[j]
        assert label == k and image.shape == (3, 64, 64)
        assert image[0, 0, 0].item() == pytest.approx(k / 255)  # the file annotated with class k
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn99999999\t0\t0\t1\t1\n")
    with pytest.raises(DatasetError, match="class 'n99999999' is not a training class"):
        build_splits(
            DataConfig(dataset="tinyimagenet", data_dir=str(tmp_path), download=False, val_size=10)
        )
