"""The Flax CLIP module: parameter layout, shapes, prompt slots, masking and input checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cap_jax.clip import CLIP, CLIPConfig, init_params
from cap_jax.clip.loading import RANDOM_CONFIGS

TINY = RANDOM_CONFIGS["tiny"]
N_CTX = 2


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, seed=0)


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(0).normal(size=(3, 224, 224, 3)), jnp.float32)


@pytest.fixture(scope="module")
def encode_image():
    module = CLIP(TINY)
    return jax.jit(
        lambda p, x, shallow=None, deep=None: module.apply(
            {"params": p}, x, shallow, deep, method=CLIP.encode_image
        )
    )


@pytest.fixture(scope="module")
def encode_text_embeddings():
    module = CLIP(TINY)
    return jax.jit(
        lambda p, e, eot, deep=None: module.apply(
            {"params": p}, e, eot, deep, method=CLIP.encode_text_embeddings
        )
    )


def token_rows(*rows, pad=0):
    ids = np.full((len(rows), 77), pad, np.int32)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
    return jnp.asarray(ids)


def test_parameter_names_and_shapes(params):
    visual, text = params["visual"], params["text"]
    assert visual["blocks_0"]["attn"]["qkv"]["kernel"].shape == (64, 3 * 64)
    assert visual["blocks_1"]["mlp"]["fc2"]["kernel"].shape == (4 * 64, 64)
    assert visual["patch_embedding"]["kernel"].shape == (32, 32, 3, 64)
    assert "bias" not in visual["patch_embedding"]
    assert visual["positional_embedding"].shape == (1 + 7 * 7, 64)
    assert visual["proj"].shape == (64, 32)
    assert text["token_embedding"]["embedding"].shape == (49408, 64)
    assert text["blocks_1"]["attn"]["out"]["kernel"].shape == (64, 64)
    assert text["proj"].shape == (64, 32)
    assert params["logit_scale"].shape == ()
    np.testing.assert_allclose(np.exp(params["logit_scale"]), 1 / 0.07, rtol=1e-6)
    dtypes = {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)}
    assert dtypes == {jnp.dtype(jnp.float32)}


def test_vit_b32_shapes_without_compute():
    config = RANDOM_CONFIGS["ViT-B/32"]
    module = CLIP(config)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    token_ids = jax.ShapeDtypeStruct((5, 77), jnp.int32)
    variables = jax.eval_shape(module.init, jax.random.key(0), images, token_ids)
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables))
    assert num_params == 151_277_313  # OpenAI's ViT-B/32, logit scale included
    image_features, text_features = jax.eval_shape(module.apply, variables, images, token_ids)
    assert image_features.shape == (2, 512)
    assert text_features.shape == (5, 512)
    assert image_features.dtype == text_features.dtype == jnp.float32


def test_image_batch_rows_independent(params, images, encode_image):
    batched = encode_image(params, images)
    single = encode_image(params, images[1:2])
    assert batched.shape == (3, 32)
    np.testing.assert_allclose(batched[1:2], single, rtol=1e-5, atol=1e-5)


def test_text_ignores_tokens_after_eot(params):
    module = CLIP(TINY)
    encode = jax.jit(lambda p, t: module.apply({"params": p}, t, method=CLIP.encode_text))
    row = [49406, 320, 1125, 539, 320, 2368, 269, 49407]
    padded_zero = encode(params, token_rows(row, pad=0))
    padded_eot = encode(params, token_rows(row, pad=49407))
    np.testing.assert_allclose(padded_zero, padded_eot, rtol=0, atol=1e-6)
    changed_word = encode(params, token_rows(row[:5] + [1929] + row[6:]))
    assert np.abs(changed_word - padded_zero).max() > 1e-3


def test_encode_text_pools_at_first_eot(params, encode_text_embeddings):
    module = CLIP(TINY)
    token_ids = token_rows([49406, 320, 2368, 49407], [49406, 320, 2368, 49407, 1125, 49407])
    features = jax.jit(lambda p, t: module.apply({"params": p}, t, method=CLIP.encode_text))(
        params, token_ids
    )
    np.testing.assert_allclose(features[0], features[1], rtol=0, atol=1e-6)
    embeddings = module.apply({"params": params}, token_ids, method=CLIP.embed_tokens)
    at_last_eot = encode_text_embeddings(params, embeddings, jnp.array([3, 5]))
    np.testing.assert_allclose(at_last_eot[0], features[0], rtol=0, atol=1e-6)
    assert np.abs(at_last_eot[1] - features[1]).max() > 1e-3


def test_shallow_prompts_change_image_features(params, images, encode_image):
    plain = encode_image(params, images)
    shallow = jnp.asarray(np.random.default_rng(1).normal(size=(N_CTX, 64)), jnp.float32)
    prompted = encode_image(params, images, shallow)
    assert np.abs(prompted - plain).max() > 1e-3
    no_deep = encode_image(params, images, shallow, jnp.zeros((0, N_CTX, 64)))
    np.testing.assert_allclose(no_deep, prompted, rtol=0, atol=1e-6)


def test_deep_prompts_replace_image_prompt_tokens(params, images, encode_image):
    """Block 1 reads the deep prompts, not the shallow ones, in the prompt slots."""
    rng = np.random.default_rng(2)
    deep = jnp.asarray(rng.normal(size=(1, N_CTX, 64)), jnp.float32)
    shallow_a = jnp.asarray(rng.normal(size=(N_CTX, 64)), jnp.float32)
    shallow_b = jnp.asarray(rng.normal(size=(N_CTX, 64)), jnp.float32)
    with_a = encode_image(params, images, shallow_a, deep)
    with_b = encode_image(params, images, shallow_b, deep)
    without_deep = encode_image(params, images, shallow_a)
    # Different shallow prompts still change the output through block 0.
    assert np.abs(with_a - with_b).max() > 1e-4
    assert np.abs(with_a - without_deep).max() > 1e-3


def test_deep_text_prompts_replace_context_tokens(params, encode_text_embeddings):
    """A deep prompt equal to the layer-1 input keeps the output; another one changes it."""
    module = CLIP(TINY)
    token_ids = token_rows([49406, 320, 1125, 539, 320, 2368, 269, 49407])
    embeddings = module.apply({"params": params}, token_ids, method=CLIP.embed_tokens)
    eot = jnp.array([7])
    plain = encode_text_embeddings(params, embeddings, eot)
    deep = jnp.asarray(np.random.default_rng(3).normal(size=(1, N_CTX, 64)), jnp.float32)
    prompted = encode_text_embeddings(params, embeddings, eot, deep)
    assert np.abs(prompted - plain).max() > 1e-3
    # Changing the layer-0 context tokens still matters, through block 0 and attention.
    other = embeddings.at[:, 1 : 1 + N_CTX].set(0.0)
    prompted_other = encode_text_embeddings(params, other, eot, deep)
    assert np.abs(prompted_other - prompted).max() > 1e-4


@pytest.mark.parametrize(
    "shape, message",
    [((2, 112, 112, 3), "images must be"), ((2, 3, 224, 224), "images must be")],
)
def test_wrong_image_shape_raises(params, shape, message):
    module = CLIP(TINY)
    with pytest.raises(ValueError, match=message):
        module.apply({"params": params}, jnp.zeros(shape), method=CLIP.encode_image)


def test_prompt_shape_checks(params, images):
    module = CLIP(TINY)

    def apply(*args):
        return module.apply({"params": params}, images[:1], *args, method=CLIP.encode_image)

    with pytest.raises(ValueError, match="shallow_prompts must be"):
        apply(jnp.zeros((N_CTX, 63)))
    with pytest.raises(ValueError, match="overwrite the n_ctx shallow prompt tokens"):
        apply(None, jnp.zeros((1, N_CTX, 64)))
    with pytest.raises(ValueError, match="takes at most 1"):
        apply(jnp.zeros((N_CTX, 64)), jnp.zeros((2, N_CTX, 64)))
    embeddings = jnp.zeros((1, 77, 64))
    with pytest.raises(ValueError, match="eot_positions must be"):
        module.apply(
            {"params": params},
            embeddings,
            jnp.zeros((2,), jnp.int32),
            method=CLIP.encode_text_embeddings,
        )
    for bad_shape in [(1, 78, 64), (1, 77, 63)]:
        with pytest.raises(ValueError, match="embeddings must be"):
            module.apply(
                {"params": params},
                jnp.zeros(bad_shape),
                jnp.zeros((1,), jnp.int32),
                method=CLIP.encode_text_embeddings,
            )


def test_config_checks():
    with pytest.raises(ValueError, match="hidden_act"):
        dataclasses.replace(TINY, hidden_act="relu")
    with pytest.raises(ValueError, match="not divisible by vision_heads"):
        dataclasses.replace(TINY, vision_heads=3)
    with pytest.raises(ValueError, match="not divisible by vision_patch_size"):
        CLIPConfig(
            embed_dim=8,
            image_resolution=100,
            vision_layers=1,
            vision_width=64,
            vision_patch_size=32,
            vision_heads=1,
            text_width=64,
            text_heads=1,
            text_layers=1,
        )


def test_gradients_reach_prompts(params, images):
    def loss(shallow, deep, module):
        features = module.apply({"params": params}, images, shallow, deep, method=CLIP.encode_image)
        return jnp.sum(features**2)

    shallow = jnp.asarray(np.random.default_rng(4).normal(size=(N_CTX, 64)), jnp.float32)
    deep = jnp.asarray(np.random.default_rng(5).normal(size=(1, N_CTX, 64)), jnp.float32)
    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grad_shallow, grad_deep = grad(shallow, deep, CLIP(TINY))
    assert np.all(np.isfinite(grad_shallow))
    assert np.abs(grad_shallow).max() > 0
    assert np.all(np.isfinite(grad_deep))
    assert np.abs(grad_deep).max() > 0

    # Rematerialisation recomputes the same activations, so the gradients agree.
    remat_shallow, remat_deep = grad(shallow, deep, CLIP(TINY, remat=True))
    np.testing.assert_allclose(remat_shallow, grad_shallow, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(remat_deep, grad_deep, rtol=1e-5, atol=1e-3)
