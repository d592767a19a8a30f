"""Tests for the prefetcher, batched passes and the dataset representation."""

import threading
import time

import numpy as np
import PIL.Image
import pytest

from cap_jax.data.dataset import (
    ClassificationData,
    ImageDataset,
    ImageFiles,
    ImageReadError,
    subset_indices,
)
from cap_jax.data.loader import iterate_batches, prefetch
from cap_jax.data.transforms import clip_preprocess


def test_prefetch_keeps_order():
    assert list(prefetch(range(50), size=3)) == list(range(50))


def test_prefetch_runs_ahead():
    produced = []

    def slow_source():
        for i in range(4):
            produced.append(i)
            yield i

    iterator = prefetch(slow_source(), size=2)
    assert next(iterator) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    # The worker prepared the next items while the consumer held the first one.
    assert len(produced) >= 3
    assert list(iterator) == [1, 2, 3]


def test_prefetch_propagates_exception_after_items():
    class SourceError(RuntimeError):
        pass

    def failing():
        yield 1
        yield 2
        raise SourceError("broken batch 3")

    iterator = prefetch(failing())
    assert next(iterator) == 1
    assert next(iterator) == 2
    with pytest.raises(SourceError, match="broken batch 3"):
        next(iterator)


def test_prefetch_stops_worker_on_early_exit():
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    iterator = prefetch(endless(), size=2)
    assert next(iterator) == 0
    iterator.close()
    time.sleep(0.5)
    count = len(produced)
    time.sleep(0.3)
    assert len(produced) == count
    assert count < 10
    assert not any(t.name == "cap_jax-prefetch" and t.is_alive() for t in threading.enumerate())


def test_prefetch_rejects_zero_size():
    with pytest.raises(ValueError, match="at least 1"):
        list(prefetch([1], size=0))


def make_dataset(n=7, classes=3):
    images = np.stack([np.full((6, 6), i, dtype=np.uint8) for i in range(n)])
    labels = np.arange(n) % classes
    return ImageDataset([f"class {c}" for c in range(classes)], images, labels)


def test_iterate_batches_pads_last_batch():
    dataset = make_dataset(7)
    batches = list(iterate_batches(dataset, 3, lambda x: x.astype(np.float32)))
    assert len(batches) == 3
    ids, images, valid = batches[-1]
    np.testing.assert_array_equal(ids, [6, -1, -1])
    np.testing.assert_array_equal(valid, [True, False, False])
    assert images.shape == (3, 6, 6, 3)
    assert images[0, 0, 0, 0] == 6
    assert not images[1:].any()
    all_ids = np.concatenate([b[0] for b in batches])
    np.testing.assert_array_equal(all_ids[all_ids >= 0], np.arange(7))
    for ids, images, valid in batches:
        np.testing.assert_array_equal(images[valid][:, 0, 0, 0], ids[valid])


def test_iterate_batches_given_indices():
    dataset = make_dataset(7)
    batches = list(iterate_batches(dataset, 4, clip_preprocess, indices=[5, 1]))
    assert len(batches) == 1
    ids, images, valid = batches[0]
    np.testing.assert_array_equal(ids, [5, 1, -1, -1])
    assert images.shape == (4, 224, 224, 3)
    assert valid.sum() == 2


def test_iterate_batches_checks_preprocess_count():
    with pytest.raises(ValueError, match="returned 1 images for a batch of 3"):
        list(iterate_batches(make_dataset(3), 3, lambda x: x[:1]))


def test_dataset_load_images_grey_to_rgb():
    dataset = make_dataset(4)
    batch = dataset.load_images([2, 0])
    assert batch.shape == (2, 6, 6, 3)
    assert batch.dtype == np.uint8
    assert (batch[0] == 2).all()
    with pytest.raises(IndexError, match="0..3"):
        dataset.load_images([4])


def test_dataset_validates_inputs():
    images = np.zeros((3, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ImageDataset(["a", "b"], images, [0, 1])
    with pytest.raises(ValueError, match="0..1"):
        ImageDataset(["a", "b"], images, [0, 1, 2])
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(["a"], images.astype(np.float32), [0, 0, 0])
    with pytest.raises(ValueError, match="other class names"):
        ClassificationData(
            "toy",
            ["a", "b"],
            ImageDataset(["a", "b"], images, [0, 1, 1]),
            ImageDataset(["a", "c"], images, [0, 1, 1]),
        )


def test_image_files_decode_lazily(tmp_path):
    paths = []
    for i, mode in enumerate(["RGB", "L", "RGBA"]):
        path = tmp_path / f"{i}.png"
        PIL.Image.new(mode, (5 + i, 4), color=(10 * i + 1) if mode == "L" else None).save(path)
        paths.append(path)
    dataset = ImageDataset(["a", "b"], paths, [0, 1, 0])
    assert isinstance(dataset.images, ImageFiles)
    batch = dataset.load_images([1, 2])
    assert isinstance(batch, list)
    assert batch[0].shape == (4, 6, 3)
    assert batch[1].shape == (4, 7, 3)
    assert (batch[0] == 11).all()
    subset = dataset.subset([2])
    assert subset.describe_image(0) == str(paths[2])


def test_truncated_file_raises_with_path(tmp_path):
    path = tmp_path / "broken.png"
    good = tmp_path / "good.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(good)
    path.write_bytes(good.read_bytes()[:200])
    dataset = ImageDataset(["a"], [good, path], [0, 0])
    with pytest.raises(ImageReadError, match="broken.png") as info:
        dataset.load_images([1])
    assert info.value.source == str(path)


def test_subset_indices_stratified():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    keep = subset_indices(labels, 10, seed=0)
    assert len(keep) == 10
    assert (np.diff(keep) > 0).all()
    np.testing.assert_array_equal(np.bincount(labels[keep]), [5, 3, 2])
    # Largest remainder: 7 images split 3.5 / 2.1 / 1.4 -> 4 / 2 / 1.
    np.testing.assert_array_equal(np.bincount(labels[subset_indices(labels, 7)]), [4, 2, 1])
    np.testing.assert_array_equal(subset_indices(labels, 4, stratified=False), [0, 1, 2, 3])
    with pytest.raises(ValueError, match="1..100"):
        subset_indices(labels, 101)
