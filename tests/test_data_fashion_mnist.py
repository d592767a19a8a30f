"""Tests for the idx reader and the Fashion-MNIST loader."""

import gzip
import struct

import numpy as np
import pytest

from cap_jax.data import fashion_mnist
from cap_jax.data.fashion_mnist import IdxFormatError, load_fashion_mnist, read_idx, read_split


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_split(root, prefix, images, labels, *, gzipped):
    for kind, array, ndim in (("images", images, 3), ("labels", labels, 1)):
        data = idx_bytes(array)
        name = f"{prefix}-{kind}-idx{ndim}-ubyte"
        if gzipped:
            (root / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)


def make_split(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


@pytest.mark.parametrize("gzipped", [False, True])
def test_read_idx_roundtrip(tmp_path, gzipped):
    images, _ = make_split(5, 0)
    data = idx_bytes(images)
    path = tmp_path / "images.idx"
    path.write_bytes(gzip.compress(data) if gzipped else data)
    result = read_idx(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, images)


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([[1, -2, 70000]], dtype=np.int32)
    path = tmp_path / "values.idx"
    path.write_bytes(idx_bytes(values, type_code=0x0C))
    result = read_idx(path)
    assert result.dtype == np.dtype(np.int32)
    np.testing.assert_array_equal(result, values)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda data: b"\x01\x00" + data[2:], "magic number"),
        (lambda data: data[:2] + b"\x07" + data[3:], "element type"),
        (lambda data: data[:-1], "truncated"),
        (lambda data: data + b"\x00", "needs"),
        (lambda data: data[:3], "too short"),
        (lambda data: data[:10], "declares 3 dimensions"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, mutate, message):
    images, _ = make_split(2, 0)
    path = tmp_path / "bad.idx"
    path.write_bytes(mutate(idx_bytes(images)))
    with pytest.raises(IdxFormatError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_gzip(tmp_path):
    images, _ = make_split(2, 0)
    path = tmp_path / "bad.idx.gz"
    path.write_bytes(gzip.compress(idx_bytes(images))[:-12])
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(path)


def test_load_mixed_gzip_and_plain_files(tmp_path):
    train = make_split(30, 1)
    test = make_split(20, 2)
    write_split(tmp_path, "train", *train, gzipped=True)
    write_split(tmp_path, "t10k", *test, gzipped=False)
    data = load_fashion_mnist(tmp_path)
    assert data.class_names == fashion_mnist.CLASS_NAMES
    assert len(data.train) == 30
    assert len(data.test) == 20
    np.testing.assert_array_equal(data.train.images, train[0])
    np.testing.assert_array_equal(data.test.labels, test[1].astype(np.int32))


def test_missing_root_names_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        read_split(tmp_path / "absent")


def test_missing_file_is_named(tmp_path):
    write_split(tmp_path, "train", *make_split(10, 0), gzipped=False)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte"):
        read_split(tmp_path, "test")


def test_count_mismatch_rejected(tmp_path):
    images, labels = make_split(10, 0)
    write_split(tmp_path, "train", images, labels[:9], gzipped=False)
    with pytest.raises(IdxFormatError, match="10 images but .* 9 labels"):
        read_split(tmp_path, "train")


def test_label_out_of_range_rejected(tmp_path):
    images, labels = make_split(10, 0)
    labels[3] = 10
    write_split(tmp_path, "train", images, labels, gzipped=False)
    with pytest.raises(IdxFormatError, match="0..9"):
        read_split(tmp_path, "train")


def test_stratified_subsets_per_split(tmp_path):
    write_split(tmp_path, "train", *make_split(100, 1), gzipped=False)
    write_split(tmp_path, "t10k", *make_split(50, 2), gzipped=False)
    data = load_fashion_mnist(tmp_path, train_subset=40, test_subset=20, subset_seed=3)
    assert len(data.train) == 40
    assert len(data.test) == 20
    np.testing.assert_array_equal(np.bincount(data.train.labels, minlength=10), [4] * 10)
    np.testing.assert_array_equal(np.bincount(data.test.labels, minlength=10), [2] * 10)
    again = load_fashion_mnist(tmp_path, train_subset=40, test_subset=20, subset_seed=3)
    np.testing.assert_array_equal(again.train.images, data.train.images)
    other = load_fashion_mnist(tmp_path, train_subset=40, subset_seed=4)
    assert not np.array_equal(other.train.images, data.train.images)


def test_first_n_subset(tmp_path):
    train = make_split(100, 1)
    write_split(tmp_path, "train", *train, gzipped=False)
    write_split(tmp_path, "t10k", *make_split(50, 2), gzipped=False)
    data = load_fashion_mnist(tmp_path, train_subset=15, stratified=False)
    np.testing.assert_array_equal(data.train.images, train[0][:15])
    assert len(data.test) == 50


def test_installed_fashion_mnist():
    # CI installs the Debian package dataset-fashion-mnist; this reads the real files.
    data = load_fashion_mnist(train_subset=1000, test_subset=500)
    assert data.train.images.shape == (1000, 28, 28)
    assert data.test.images.shape == (500, 28, 28)
    np.testing.assert_array_equal(np.bincount(data.train.labels), [100] * 10)
    images, labels = read_split(fashion_mnist.DEFAULT_ROOT, "test")
    assert images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    # The first test image of Fashion-MNIST is an ankle boot.
    assert labels[0] == fashion_mnist.CLASS_NAMES.index("Ankle boot")
