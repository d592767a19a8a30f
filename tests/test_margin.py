import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cap_jax.margin import class_prototypes, confusion_aware_margin

margin_fn = jax.jit(confusion_aware_margin, static_argnames=("scale", "factor"))
prototypes_fn = jax.jit(class_prototypes)


def _unit_rows(rng, shape):
    x = rng.normal(size=shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prototypes_mean_of_members_renormalised():
    image_features = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]], np.float32)
    text_features = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    leaderboard = np.array([[0, 1, -1], [-1, -1, -1]])
    prototypes = np.asarray(prototypes_fn(image_features, leaderboard, text_features))
    np.testing.assert_allclose(prototypes[0], [2**-0.5, 2**-0.5], atol=1e-6)
    # Empty board: the text feature.
    np.testing.assert_allclose(prototypes[1], [0.6, 0.8], atol=1e-6)


def test_prototypes_ignore_padding_position():
    rng = np.random.default_rng(0)
    image_features = _unit_rows(rng, (10, 8))
    text_features = _unit_rows(rng, (2, 8))
    packed = np.array([[3, 5, -1, -1], [7, -1, -1, -1]])
    spread = np.array([[-1, 3, -1, 5], [-1, -1, 7, -1]])
    np.testing.assert_allclose(
        prototypes_fn(image_features, packed, text_features),
        prototypes_fn(image_features, spread, text_features),
        atol=1e-6,
    )


def test_prototypes_reject_bad_shapes():
    with pytest.raises(ValueError, match="one row per class"):
        class_prototypes(np.zeros((4, 3)), np.zeros((2, 2), int), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="feature size"):
        class_prototypes(np.zeros((4, 5)), np.zeros((3, 2), int), np.zeros((3, 3)))


def test_margin_formula_small_case():
    text = np.eye(3, dtype=np.float32)
    counts = np.array([4.0, 2.0, 1.0])
    result = np.asarray(margin_fn(text, text, counts, scale=10.0))
    # S = I: rows range over [0, 1] already, so S' = S.
    r = counts / 4.0
    delta = (1.0 - 0.25) * 10.0
    np.testing.assert_allclose(result, np.diag((1 - r) / (1 + r) * delta), atol=1e-6)


def test_margin_paper_factor():
    text = np.eye(3, dtype=np.float32)
    counts = np.array([4.0, 2.0, 1.0])
    result = np.asarray(margin_fn(text, text, counts, scale=10.0, factor="paper"))
    r = counts / 4.0
    np.testing.assert_allclose(result, np.diag((1 - r) * 7.5), atol=1e-6)


def test_margin_permuting_classes_permutes_rows_and_columns():
    rng = np.random.default_rng(1)
    text = _unit_rows(rng, (6, 16))
    prototypes = _unit_rows(rng, (6, 16))
    counts = rng.integers(1, 50, size=6)
    seen = np.array([True, False, False, True, False, False])
    perm = rng.permutation(6)
    full = np.asarray(margin_fn(text, prototypes, counts, scale=12.0, seen=seen))
    permuted = np.asarray(
        margin_fn(text[perm], prototypes[perm], counts[perm], scale=12.0, seen=seen[perm])
    )
    np.testing.assert_allclose(permuted, full[np.ix_(perm, perm)], atol=1e-5)


def test_margin_seen_rows_are_zero():
    rng = np.random.default_rng(2)
    text = _unit_rows(rng, (5, 8))
    seen = np.array([False, True, False, False, True])
    result = np.asarray(margin_fn(text, text, np.arange(1, 6), scale=12.0, seen=seen))
    np.testing.assert_array_equal(result[seen], 0.0)
    assert np.abs(result[~seen]).max() > 0


def test_margin_all_zero_counts_is_zero():
    rng = np.random.default_rng(3)
    text = _unit_rows(rng, (4, 8))
    for seen in (None, np.array([True, False, False, False])):
        result = np.asarray(margin_fn(text, text, np.zeros(4), scale=12.0, seen=seen))
        assert np.all(np.isfinite(result))
        np.testing.assert_array_equal(result, 0.0)


def test_margin_constant_row_has_no_nan():
    # Identical text features and prototypes make every entry of S equal to 1.
    text = np.tile(np.array([[0.6, 0.8]], np.float32), (3, 1))
    result = np.asarray(margin_fn(text, text, np.array([3, 2, 1]), scale=12.0))
    assert np.all(np.isfinite(result))
    r = np.array([1.0, 2 / 3, 1 / 3])
    expected = ((1 - r) / (1 + r) * (1 - 1 / 3) * 12.0)[:, None] * np.ones((3, 3))
    np.testing.assert_allclose(result, expected, atol=1e-5)


def test_margin_rows_stretched_to_max_one():
    rng = np.random.default_rng(4)
    text = _unit_rows(rng, (5, 8))
    # Non-unit prototypes: normalised inside, so the result is the same.
    prototypes = _unit_rows(rng, (5, 8))
    counts = np.array([10, 1, 1, 1, 1])
    a = np.asarray(margin_fn(text, prototypes, counts, scale=1.0))
    b = np.asarray(margin_fn(text * 3.0, prototypes * 0.5, counts, scale=1.0))
    np.testing.assert_allclose(a, b, atol=1e-5)
    r = counts / 10
    similarity = a[1:] / ((1 - r[1:]) / (1 + r[1:]) * 0.9)[:, None]
    np.testing.assert_allclose(similarity.max(axis=1), 1.0, atol=1e-5)


def test_margin_is_float32_under_bfloat16_input():
    rng = np.random.default_rng(5)
    text = jnp.asarray(_unit_rows(rng, (3, 8)), dtype=jnp.bfloat16)
    result = margin_fn(text, text, jnp.array([1, 2, 3]), scale=12.0)
    assert result.dtype == jnp.float32


def test_margin_rejects_bad_shapes():
    text = np.eye(3, dtype=np.float32)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        confusion_aware_margin(text, text, np.ones(4), scale=1.0)
    with pytest.raises(ValueError, match=r"\[C, D\]"):
        confusion_aware_margin(text, text[:2], np.ones(3), scale=1.0)
    with pytest.raises(ValueError, match="factor"):
        confusion_aware_margin(text, text, np.ones(3), scale=1.0, factor="other")
