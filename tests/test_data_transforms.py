"""Tests for CLIP preprocessing and the strong augmentation."""

import math

import numpy as np
import PIL.Image
import pytest

from cap_jax.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    clip_preprocess,
    random_resized_crop_params,
    resized_size,
    strong_augment,
)


def random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def unnormalize(images):
    return np.round((images * CLIP_STD + CLIP_MEAN) * 255.0)


def test_clip_preprocess_shape_and_dtype():
    out = clip_preprocess(random_images((3, 28, 28)), size=32)
    assert out.shape == (3, 32, 32, 3)
    assert out.dtype == np.float32


def test_constant_image_maps_to_normalised_constant():
    value = np.array([200, 100, 30], dtype=np.uint8)
    images = np.broadcast_to(value, (2, 17, 23, 3)).copy()
    out = clip_preprocess(images, size=16)
    expected = (value / 255.0 - CLIP_MEAN) / CLIP_STD
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-5)


def test_grey_equals_rgb_path():
    grey = random_images((2, 28, 28), seed=1)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    np.testing.assert_array_equal(clip_preprocess(grey, size=40), clip_preprocess(rgb, size=40))
    single_channel = grey[..., None]
    np.testing.assert_array_equal(
        clip_preprocess(single_channel, size=40), clip_preprocess(rgb, size=40)
    )


def test_clip_preprocess_matches_pil_resize_and_crop():
    image = random_images((30, 50, 3), seed=2)
    out = clip_preprocess([image], size=20)[0]
    # Shorter side 30 -> 20, longer side int(20 * 50 / 30) = 33; centre crop offset round(6.5).
    assert resized_size(30, 50, 20) == (20, 33)
    resized = PIL.Image.fromarray(image).resize((33, 20), PIL.Image.Resampling.BICUBIC)
    expected = np.asarray(resized)[:, 6:26]
    np.testing.assert_array_equal(unnormalize(out), expected)


def test_list_of_sizes_accepted():
    images = [random_images((20, 30, 3)), random_images((40, 25), seed=3)]
    out = clip_preprocess(images, size=24)
    assert out.shape == (2, 24, 24, 3)


def test_invalid_inputs_rejected():
    with pytest.raises(ValueError, match="uint8"):
        clip_preprocess(np.zeros((1, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        clip_preprocess(np.zeros((1, 8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        clip_preprocess(np.zeros((8, 8), dtype=np.uint8))


def test_strong_augment_same_rng_same_output():
    images = random_images((4, 28, 28))
    first = strong_augment(np.random.default_rng(7), images, size=32)
    second = strong_augment(np.random.default_rng(7), images, size=32)
    other = strong_augment(np.random.default_rng(8), images, size=32)
    assert first.shape == (4, 32, 32, 3)
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)


def test_strong_augment_flip_equivalence():
    image = random_images((1, 28, 28, 3), seed=4)
    always = strong_augment(np.random.default_rng(5), image, size=32, flip_probability=1.0)
    never = strong_augment(np.random.default_rng(5), image, size=32, flip_probability=0.0)
    np.testing.assert_array_equal(always, never[:, :, ::-1])


def test_strong_augment_matches_crop_then_resize():
    image = random_images((28, 28, 3), seed=6)
    out = strong_augment(np.random.default_rng(9), [image], size=16, flip_probability=0.0)
    top, left, height, width = random_resized_crop_params(np.random.default_rng(9), 28, 28)
    crop = PIL.Image.fromarray(image).crop((left, top, left + width, top + height))
    expected = np.asarray(crop.resize((16, 16), PIL.Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(unnormalize(out[0]), expected)


def test_flip_rate_is_about_half():
    images = np.zeros((400, 8, 8), dtype=np.uint8)
    images[:, :, :4] = 255
    out = strong_augment(
        np.random.default_rng(0), images, size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0)
    )
    left_bright = out[:, :, 0, 0] > out[:, :, -1, 0]
    flipped = 1.0 - left_bright.all(axis=1).mean()
    assert 0.4 < flipped < 0.6


def test_crop_params_within_bounds_and_ranges():
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(2000):
        top, left, height, width = random_resized_crop_params(rng, 28, 40)
        assert top >= 0
        assert top + height <= 28
        assert left >= 0
        assert left + width <= 40
        areas.append(height * width / (28 * 40))
    areas = np.array(areas)
    assert areas.min() < 0.15
    assert areas.max() > 0.9


def test_crop_params_fallback_is_centred():
    # A scale range no crop can fit forces the fallback after ten attempts.
    rng = np.random.default_rng(0)
    wide = random_resized_crop_params(rng, 10, 100, scale=(2.0, 3.0))
    # Aspect 10 is clipped to 4/3: height 10, width round(13.33) = 13, centred.
    assert wide == (0, (100 - 13) // 2, 10, 13)
    tall = random_resized_crop_params(rng, 100, 10, scale=(2.0, 3.0))
    assert tall == ((100 - 13) // 2, 0, 13, 10)
    square = random_resized_crop_params(rng, 20, 20, scale=(2.0, 3.0))
    assert square == (0, 0, 20, 20)


def test_crop_params_draw_order():
    # Two uniform draws (area, log aspect) per attempt, then the position; the box must follow.
    rng = np.random.default_rng(11)
    top, left, height, width = random_resized_crop_params(rng, 28, 28)
    replay = np.random.default_rng(11)
    while True:
        area = 784 * replay.uniform(0.08, 1.0)
        aspect = math.exp(replay.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(area * aspect))
        h = round(math.sqrt(area / aspect))
        if 0 < w <= 28 and 0 < h <= 28:
            break
    assert (height, width) == (h, w)
    assert top == replay.integers(0, 28 - h + 1)
    assert left == replay.integers(0, 28 - w + 1)
