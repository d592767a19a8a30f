import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cap_jax.losses import margin_cross_entropy, self_training_loss

margin_ce = jax.jit(margin_cross_entropy)
self_training = jax.jit(self_training_loss)


def _inputs(seed=0, batch=8, classes=5):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=3.0, size=(batch, classes)).astype(np.float32)
    labels = rng.integers(0, classes, size=batch)
    margin = rng.uniform(-0.5, 2.0, size=(classes, classes)).astype(np.float32)
    return logits, labels, margin


def test_zero_margin_equals_optax_cross_entropy():
    logits, labels, _ = _inputs()
    zero = np.zeros((5, 5), np.float32)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    np.testing.assert_allclose(margin_ce(logits, labels, zero), expected, atol=1e-6)


def test_margin_ce_matches_hand_formula():
    logits, labels, margin = _inputs(1)
    shifted = logits + margin[labels] * (1 - np.eye(5)[labels])
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    expected = -log_probs[np.arange(8), labels].mean()
    np.testing.assert_allclose(margin_ce(logits, labels, margin), expected, atol=1e-5)


def test_margin_diagonal_has_no_effect():
    logits, labels, margin = _inputs(2)
    changed = margin + np.diag(np.full(5, 100.0, np.float32))
    np.testing.assert_allclose(
        margin_ce(logits, labels, margin), margin_ce(logits, labels, changed), atol=1e-6
    )


def test_margin_ce_permuting_classes():
    logits, labels, margin = _inputs(3)
    perm = np.random.default_rng(3).permutation(5)
    inverse = np.argsort(perm)
    permuted = margin_ce(logits[:, perm], inverse[labels], margin[np.ix_(perm, perm)])
    np.testing.assert_allclose(permuted, margin_ce(logits, labels, margin), atol=1e-5)


def test_margin_ce_where_equals_slicing():
    logits, labels, margin = _inputs(4)
    valid = np.array([True, True, False, True, False, True, True, False])
    padded = logits.copy()
    padded[~valid] = np.nan
    masked = margin_ce(padded, labels, margin, where=valid)
    sliced = margin_ce(logits[valid], labels[valid], margin)
    np.testing.assert_allclose(masked, sliced, atol=1e-6)
    grad = jax.grad(margin_cross_entropy)(jnp.asarray(padded), labels, margin, where=valid)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[~valid], 0.0)


def test_margin_ce_float32_under_bfloat16():
    logits, labels, margin = _inputs(5)
    loss = margin_ce(jnp.asarray(logits, jnp.bfloat16), labels, margin)
    assert loss.dtype == jnp.float32


def test_margin_ce_rejects_bad_shapes():
    logits, labels, margin = _inputs()
    with pytest.raises(ValueError, match=r"\(5, 5\)"):
        margin_cross_entropy(logits, labels, margin[:4, :4])
    with pytest.raises(ValueError, match="labels"):
        margin_cross_entropy(logits, labels[:3], margin)
    with pytest.raises(ValueError, match="where"):
        margin_cross_entropy(logits, labels, margin, where=np.ones(3, bool))


def test_self_training_kept_average():
    strong, _, margin = _inputs(6)
    weak = np.zeros((8, 5), np.float32)
    pseudolabels = np.array([0, 1, 2, 3, 4, 0, 1, 2])
    weak[np.arange(8), pseudolabels] = np.array([9, 9, 9, 0.5, 9, 0.6, 9, 9], np.float32)
    loss, aux = self_training(strong, weak, margin, threshold=0.85)
    kept = np.asarray(aux["kept"]).astype(bool)
    np.testing.assert_array_equal(kept, [1, 1, 1, 0, 1, 0, 1, 1])
    np.testing.assert_array_equal(aux["pseudolabels"], pseudolabels)
    expected = margin_ce(strong[kept], pseudolabels[kept], margin)
    np.testing.assert_allclose(loss, expected, atol=1e-5)
    np.testing.assert_array_equal(aux["counts"], np.bincount(pseudolabels[kept], minlength=5))
    assert aux["kept"].dtype == jnp.float32


def test_self_training_threshold_is_strict():
    weak = np.log(np.array([[0.5, 0.5]], np.float32))
    _, aux = self_training(np.zeros((1, 2), np.float32), weak, np.zeros((2, 2)), threshold=0.5)
    assert float(aux["kept"][0]) == 0.0


def test_self_training_nothing_kept_is_zero_with_zero_gradient():
    strong, _, margin = _inputs(7)
    weak = np.zeros((8, 5), np.float32)  # uniform: max probability 0.2
    loss, aux = self_training(strong, weak, margin, threshold=0.85)
    assert float(loss) == 0.0
    assert float(jnp.sum(aux["kept"])) == 0.0

    def loss_of(strong_logits):
        return self_training_loss(strong_logits, weak, margin, threshold=0.85)[0]

    grad = jax.jit(jax.grad(loss_of))(jnp.asarray(strong))
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad, 0.0)


def test_self_training_no_gradient_to_weak_view():
    strong, _, margin = _inputs(8)
    weak = _inputs(18)[0] * 4.0

    def loss_of(weak_logits):
        return self_training_loss(strong, weak_logits, margin, threshold=0.5)[0]

    grad = jax.grad(loss_of)(jnp.asarray(weak))
    np.testing.assert_array_equal(grad, 0.0)


def test_self_training_where_masks_padding():
    strong, _, margin = _inputs(9)
    weak = _inputs(19)[0] * 5.0
    valid = np.array([True] * 5 + [False] * 3)
    padded_strong = strong.copy()
    padded_strong[~valid] = np.nan
    masked, aux = self_training(padded_strong, weak, margin, threshold=0.5, where=valid)
    sliced, _ = self_training(strong[valid], weak[valid], margin, threshold=0.5)
    np.testing.assert_allclose(masked, sliced, atol=1e-6)
    assert not np.asarray(aux["kept"])[~valid].any()

    def loss_of(strong_logits):
        return self_training_loss(strong_logits, weak, margin, threshold=0.5, where=valid)[0]

    grad = jax.grad(loss_of)(jnp.asarray(padded_strong))
    assert np.all(np.isfinite(grad))


def test_self_training_rejects_shape_mismatch():
    strong, _, margin = _inputs()
    weak = _inputs(1)[0]
    with pytest.raises(ValueError, match="same shape"):
        self_training_loss(strong, weak[:4], margin, threshold=0.5)
