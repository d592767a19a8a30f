"""The compiled CAP train step: device-count invariance, compile-once, gradient routing."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cap_jax import adapters, train

NUM_CLASSES = 5
DIM = 8


@dataclasses.dataclass(frozen=True)
class LinearTowers:
    """Stand-in towers: text = base + ctx offset, image = images @ projection + ctx mean."""

    def text_features(self, frozen, prompts):
        return frozen["text_base"] + prompts["ctx"].mean(0)

    def image_features(self, frozen, prompts, images):
        return images @ frozen["projection"] + prompts["ctx"].mean(0)  # [B, F] @ [F, D]


def make_inputs(seed=0, batch=8, labeled=True):
    rng = np.random.default_rng(seed)
    frozen = {
        "text_base": jnp.asarray(rng.normal(size=(NUM_CLASSES, DIM)), jnp.float32),
        "projection": jnp.asarray(rng.normal(size=(6, DIM)), jnp.float32),
        "logit_scale": jnp.asarray(10.0, jnp.float32),
    }
    params = {
        "prompts": {"ctx": jnp.asarray(rng.normal(size=(2, DIM)) * 0.1, jnp.float32)},
        "adapters": adapters.init_adapters(jax.random.key(seed), DIM, hidden=4),
    }
    weak = rng.normal(size=(batch, 6)).astype(np.float32)
    batch_data = {
        "main_images": rng.normal(size=(batch, 6)).astype(np.float32),
        "main_labels": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
        "weak_images": weak,
        "strong_images": weak + 0.1 * rng.normal(size=weak.shape).astype(np.float32),
    }
    if labeled:
        batch_data["labeled_images"] = rng.normal(size=(batch, 6)).astype(np.float32)
        batch_data["labeled_labels"] = rng.integers(0, NUM_CLASSES, batch).astype(np.int32)
    margin = np.abs(rng.normal(size=(NUM_CLASSES, NUM_CLASSES))).astype(np.float32)
    return frozen, params, batch_data, margin


def run_steps(devices, num_steps=3, threshold=0.2):
    frozen, params, batch, margin = make_inputs()
    tx = train.make_optimizer(learning_rate=0.1, momentum=0.9, weight_decay=0.1,
                              warmup_steps=1, total_steps=10)
    steps = train.compile_steps(towers=LinearTowers(), tx=tx, threshold=threshold,
                                adapter_ratio=0.5, shared_adapter=False, devices=devices)
    state_r = train.replicate(train.create_train_state(params, tx), devices)
    frozen_r = train.replicate(frozen, devices)
    margin_r = np.broadcast_to(margin, (len(devices),) + margin.shape)
    losses = []
    for _ in range(num_steps):
        state_r, metrics = steps.train(state_r, frozen_r, train.shard(batch, len(devices)),
                                       margin_r)
        losses.append(float(metrics["loss"][0]))
    return train.unreplicate(state_r), losses, metrics


def test_step_same_on_one_and_four_devices():
    assert jax.local_device_count() >= 4, "conftest should provide 4 fake CPU devices"
    state1, losses1, metrics1 = run_steps(jax.local_devices()[:1])
    state4, losses4, metrics4 = run_steps(jax.local_devices()[:4])
    np.testing.assert_allclose(losses4, losses1, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(metrics4["counts"][0]),
                                  np.asarray(metrics1["counts"][0]))
    for a, b in zip(jax.tree.leaves(state4.params), jax.tree.leaves(state1.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert metrics1["counts"][0].sum() > 0, "the test should keep some pseudolabels"


def test_step_loss_is_sum_of_stream_losses():
    _, _, metrics = run_steps(jax.local_devices()[:2], num_steps=1)
    total = sum(float(metrics[k][0]) for k in ("main_loss", "labeled_loss", "unlabeled_loss"))
    assert float(metrics["loss"][0]) == pytest.approx(total, rel=1e-6)
    assert bool(metrics["logits_finite"][0])


def test_step_compiles_once():
    traces = []

    @dataclasses.dataclass(frozen=True)
    class CountingTowers(LinearTowers):
        def text_features(self, frozen, prompts):
            traces.append(1)
            return super().text_features(frozen, prompts)

    frozen, params, batch, margin = make_inputs()
    tx = train.make_optimizer(learning_rate=0.1, momentum=0.9, weight_decay=0.1,
                              warmup_steps=1, total_steps=10)
    devices = jax.local_devices()[:2]
    steps = train.compile_steps(towers=CountingTowers(), tx=tx, threshold=0.2,
                                adapter_ratio=0.01, shared_adapter=False, devices=devices)
    state_r = train.replicate(train.create_train_state(params, tx), devices)
    frozen_r = train.replicate(frozen, devices)
    for step in range(4):
        # A new margin each "epoch", new batch contents each iteration: same shapes.
        margin_r = np.broadcast_to(margin * step, (2,) + margin.shape)
        shifted = {k: (v + step if v.dtype == np.float32 else v) for k, v in batch.items()}
        state_r, _ = steps.train(state_r, frozen_r, train.shard(shifted, 2), margin_r)
    assert len(traces) == 1, f"the step was traced {len(traces)} times"
    assert int(train.unreplicate(state_r).step) == 4


def test_weak_view_gets_no_gradient():
    """Changing the weak view alone must not change the gradient except through pseudolabels."""
    frozen, params, batch, margin = make_inputs(labeled=False)
    tx = train.make_optimizer(learning_rate=0.1, momentum=0.0, weight_decay=0.0,
                              warmup_steps=0, total_steps=10)
    state = train.create_train_state(params, tx)
    # With threshold 0.99 nothing is kept, so the weak view cannot matter at all.
    step = jax.jit(lambda s, b: train.train_step(
        s, frozen, b, margin, towers=LinearTowers(), tx=tx, threshold=0.99, axis_name=None))
    new_a, metrics_a = step(state, batch)
    moved = dict(batch, weak_images=batch["weak_images"] * 3.0)
    new_b, _ = step(state, moved)
    assert float(metrics_a["kept_fraction"]) == 0.0
    assert float(metrics_a["unlabeled_loss"]) == 0.0
    for a, b in zip(jax.tree.leaves(new_a.params), jax.tree.leaves(new_b.params)):
        np.testing.assert_array_equal(a, b)


def test_shard_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="does not divide over 4 devices"):
        train.shard({"x": np.zeros((6, 2))}, 4)
