"""Numerical guards: degenerate margins, a non-finite loss, a zero kept fraction, EOT pooling.

The run test goes through the `cap-jax` command in this process on a folder of generated images
with random tiny CLIP weights. A learning rate of 1e30 blows the parameters up with the last
update of epoch 0, so the first step of epoch 1 has a NaN loss. Threshold 1 keeps no unlabeled
pseudolabel, so every epoch has a kept fraction of zero and all-zero confident counts.
"""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from image_folders import COLOURS, write_image_folder

from cap_jax import checkpoint as checkpoint_lib
from cap_jax import cli
from cap_jax import loop as loop_lib
from cap_jax import margin as margin_lib
from cap_jax.clip import CLIP, CLIPConfig, init_params

# ----------------------------------------------------------------------------------------------
# Margin at the start of an epoch, with host-side feature functions in place of the towers.


def fake_steps(text_features, image_features):
    """Stand-ins for the pmapped feature passes of `loop.epoch_margin` on one device."""

    def text(frozen, params, use_adapter):
        return text_features[None]

    def image(frozen, params, images, adapter):
        # The images are pool ids of shape [1, B, 1], so look up their features.
        return image_features[images[..., 0].astype(int)]

    return types.SimpleNamespace(text_features=text, image_features=image, num_devices=1)


def margin_settings():
    return loop_lib.LoopSettings(
        epochs=2, iterations_per_epoch=1, batch_size=1, seed=0, n_main_samples=2,
        max_main_ratio=0.8, update_every=1, margin_scale=12.0, feature_batch_size=1)


class IdSource:
    """Images that are their own pool ids, so fake_steps can look up features."""

    def clean(self, ids):
        return np.asarray(ids, np.float32)[:, None]


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_margin_zero_without_confident_pseudolabels():
    rng = np.random.default_rng(0)
    text = unit_rows(rng.normal(size=(3, 8)).astype(np.float32))
    images = unit_rows(rng.normal(size=(5, 8)).astype(np.float32))
    board = np.array([[0, 1], [2, -1], [3, 4]])
    margin = loop_lib.epoch_margin(fake_steps(text, images), None, None, IdSource(), board,
                                   np.zeros(3, np.int64), margin_settings(), None)
    np.testing.assert_array_equal(margin, np.zeros((3, 3), np.float32))


def test_margin_finite_with_empty_leaderboard_rows():
    rng = np.random.default_rng(1)
    text = unit_rows(rng.normal(size=(3, 8)).astype(np.float32))
    images = unit_rows(rng.normal(size=(5, 8)).astype(np.float32))
    counts = np.array([4, 0, 1])
    for board in (np.array([[0, 1], [-1, -1], [3, -1]]), np.full((3, 2), -1)):
        margin = loop_lib.epoch_margin(fake_steps(text, images), None, None, IdSource(), board,
                                       counts, margin_settings(), None)
        assert np.isfinite(margin).all()
        assert np.abs(margin).max() > 0


def test_prototype_of_empty_class_is_text_feature():
    rng = np.random.default_rng(2)
    text = rng.normal(size=(3, 8)).astype(np.float32)
    images = rng.normal(size=(4, 8)).astype(np.float32)
    board = jnp.array([[0, 1], [-1, -1], [2, 3]])
    prototypes = np.asarray(jax.jit(margin_lib.class_prototypes)(images, board, text))
    assert np.isfinite(prototypes).all()
    np.testing.assert_allclose(prototypes[1], unit_rows(text[1]), rtol=0, atol=1e-6)


def test_margin_constant_similarity_rows():
    # Identical class features make every similarity row constant (all ones).
    text = np.tile(unit_rows(np.arange(1.0, 9.0, dtype=np.float32)), (3, 1))
    margin = np.asarray(jax.jit(margin_lib.confusion_aware_margin, static_argnames="scale")(
        text, text, jnp.array([5, 1, 0]), scale=12.0))
    assert np.isfinite(margin).all()
    # Rows of a constant similarity stay ones, so each row is its class factor times delta.
    ratio = np.array([1.0, 0.2, 0.0])
    expected = ((1 - ratio) / (1 + ratio) * 12.0)[:, None] * np.ones((3, 3))
    np.testing.assert_allclose(margin, expected, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# A run that hits a NaN loss and never keeps a pseudolabel.


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("nan_run")
    write_image_folder(base / "images")
    config = dict(
        name="nan", dataset="squares", data_root=str(base / "images"), model="random:tiny",
        prompt_depth=2, epochs=3, iterations_per_epoch=2, batch_size=4, eval_every=3,
        eval_batch_size=8, zero_shot_batch_size=8, n_main_samples=2, update_every=1,
        threshold=1.0, learning_rate=1e30, cache_dir=str(base / "cache"))
    config_path = base / "config.json"
    config_path.write_text(json.dumps(config))
    workdir = base / "run"
    code = cli.main(["run", "--config", str(config_path), "--workdir", str(workdir),
                     "--no-progress"])
    return types.SimpleNamespace(code=code, workdir=workdir)


def read_metrics(workdir):
    with open(workdir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_nan_loss_exit_code(nan_run):
    assert nan_run.code == 3
    assert not (nan_run.workdir / "results.json").exists()


def test_nan_loss_message_names_epoch_and_checkpoint(nan_run):
    log = (nan_run.workdir / "run.log").read_text()
    assert "not finite at epoch 1, iteration 0" in log
    checkpoint = os.path.join(str(nan_run.workdir), "checkpoints", "1")
    assert f"the last good checkpoint is {checkpoint}, written after epoch 0" in log


def test_nan_loss_keeps_last_good_checkpoint(nan_run):
    checkpoints = nan_run.workdir / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["1"]
    restored = checkpoint_lib.read_checkpoint(str(checkpoints))
    assert restored["epoch"] == 1
    assert int(restored["loop"]["epoch"]) == 1
    params = jax.tree.leaves(restored["state"]["params"])
    assert params
    assert all(np.isfinite(leaf).all() for leaf in params)
    # The learning rate of 1e30 did act on epoch 0's last step.
    assert max(np.abs(leaf).max() for leaf in params) > 1e20


def test_nan_loss_metrics_stop_before_bad_epoch(nan_run):
    records = read_metrics(nan_run.workdir)
    assert [r["epoch"] for r in records] == [0]
    assert np.isfinite(records[0]["loss"])


def test_zero_kept_fraction_logged_and_warned(nan_run):
    record = read_metrics(nan_run.workdir)[0]
    assert record["kept_fraction"] == 0.0
    assert record["unlabeled_loss"] == 0.0
    assert record["confident_counts"] == [0] * len(COLOURS)
    log = (nan_run.workdir / "run.log").read_text()
    assert "WARNING cap_jax.loop: epoch 0: no unlabeled sample was above the confidence" in log
    assert '"kept_fraction": 0.0' in log


# ----------------------------------------------------------------------------------------------
# Text features pool at the EOT token found by its id.

# A vocabulary where the EOT id is not the largest id, unlike CLIP's (49407 of 49408).
POOL_CONFIG = CLIPConfig(
    embed_dim=8, image_resolution=32, vision_layers=1, vision_width=16, vision_patch_size=16,
    vision_heads=2, text_width=16, text_heads=2, text_layers=2, context_length=8,
    vocab_size=64, sot_token_id=60, eot_token_id=50, pad_token_id=0)


def test_text_pools_at_eot_id_not_largest_id():
    module = CLIP(POOL_CONFIG)
    params = init_params(POOL_CONFIG, seed=0)
    # SOT, then id 63 (> EOT id 50) before EOT at position 4, then padding.
    tokens = jnp.array([[60, 5, 63, 7, 50, 0, 0, 0]], jnp.int32)
    assert int(jnp.argmax(tokens[0])) == 2

    features = jax.jit(lambda p, t: module.apply({"params": p}, t, method=CLIP.encode_text))(
        params, tokens)
    embeddings = module.apply({"params": params}, tokens, method=CLIP.embed_tokens)
    encode_at = jax.jit(lambda p, e, eot: module.apply(
        {"params": p}, e, eot, method=CLIP.encode_text_embeddings))

    def pooled_at(position):
        return encode_at(params, embeddings, jnp.array([position]))

    np.testing.assert_allclose(features, pooled_at(4), rtol=0, atol=1e-6)
    assert np.abs(np.asarray(features) - np.asarray(pooled_at(2))).max() > 1e-3
