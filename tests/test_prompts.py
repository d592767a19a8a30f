"""MaPLe prompt parameters and the prompted encoders on a random tiny CLIP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cap_jax.clip
from cap_jax import prompts

CLASSES = ["cat", "sea holly", "annual crop land"]


@pytest.fixture(scope="module")
def model():
    return cap_jax.clip.load("random:tiny")


@pytest.fixture(scope="module")
def image_forward(model):
    return jax.jit(lambda c, p, x: prompts.prompted_image_features(model.module, c, p, x))


@pytest.fixture(scope="module")
def images():
    return jnp.asarray(np.random.default_rng(0).normal(size=(2, 224, 224, 3)), jnp.float32)


def embedding_rows(model, ids):
    return np.asarray(model.params["text"]["token_embedding"]["embedding"])[ids]


def test_init_shapes_and_dtypes(model):
    params = prompts.init_prompt_params(jax.random.key(0), model, n_ctx=2, depth=2)
    shapes = jax.tree_util.tree_map(lambda a: a.shape, params)
    assert shapes == {
        "ctx": (2, 64),
        "proj": {"kernel": (64, 64), "bias": (64,)},
        "deep_text": (1, 2, 64),
        "deep_proj": {"kernel": (1, 64, 64), "bias": (1, 64)},
    }
    assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}


def test_init_ctx_from_a_photo(model):
    params = prompts.init_prompt_params(jax.random.key(0), model, n_ctx=2, depth=1)
    # "a" is token 320 and "photo" is 1125 in the CLIP vocabulary.
    np.testing.assert_array_equal(params["ctx"], embedding_rows(model, [320, 1125]))
    one = prompts.init_prompt_params(jax.random.key(0), model, n_ctx=1, depth=1)
    np.testing.assert_array_equal(one["ctx"], embedding_rows(model, [320]))


def test_init_random_parts(model):
    params = prompts.init_prompt_params(jax.random.key(1), model, n_ctx=16, depth=2, ctx_init=None)
    assert abs(float(np.std(params["ctx"])) - 0.02) < 0.003
    assert abs(float(np.std(params["deep_text"])) - 0.02) < 0.003
    bound = 1 / np.sqrt(64)  # torch.nn.Linear's default init with 64 inputs
    for leaf in (params["proj"]["kernel"], params["proj"]["bias"]):
        assert np.abs(leaf).max() <= bound
        assert np.abs(leaf).max() > 0.9 * bound


def test_init_deep_projections_identical():
    config = cap_jax.clip.loading.RANDOM_CONFIGS["tiny"]
    deeper = cap_jax.clip.CLIPConfig(**{**config.__dict__, "vision_layers": 4, "text_layers": 4})
    model = cap_jax.clip.CLIPModel(
        config=deeper,
        module=cap_jax.clip.CLIP(deeper),
        params=cap_jax.clip.init_params(deeper),
        tokenizer=cap_jax.clip.openai_tokenizer(),
        is_random=True,
        name="random:deeper",
    )
    params = prompts.init_prompt_params(jax.random.key(2), model, depth=4)
    kernels, biases = params["deep_proj"]["kernel"], params["deep_proj"]["bias"]
    assert kernels.shape == (3, 64, 64)
    for i in (1, 2):
        np.testing.assert_array_equal(kernels[i], kernels[0])
        np.testing.assert_array_equal(biases[i], biases[0])
    assert np.abs(np.asarray(kernels[0] - params["proj"]["kernel"])).max() > 0
    assert np.abs(np.asarray(params["deep_text"][0] - params["deep_text"][1])).max() > 0


def test_init_checks(model):
    with pytest.raises(ValueError, match="depth must be in"):
        prompts.init_prompt_params(jax.random.key(0), model, depth=3)
    with pytest.raises(ValueError, match="depth must be in"):
        prompts.init_prompt_params(jax.random.key(0), model, depth=0)
    with pytest.raises(ValueError, match="fewer than n_ctx=3"):
        prompts.init_prompt_params(jax.random.key(0), model, n_ctx=3, depth=1)


def test_class_prompt_inputs(model):
    inputs = prompts.class_prompt_inputs(model, CLASSES, n_ctx=2, trim=False)
    token_ids = model.tokenize([f"a photo of a {name}." for name in CLASSES])
    np.testing.assert_array_equal(inputs.token_ids, token_ids)
    assert inputs.prefix.shape == (3, 1, 64)
    assert inputs.suffix.shape == (3, 77 - 1 - 2, 64)
    np.testing.assert_array_equal(inputs.prefix[:, 0], embedding_rows(model, token_ids[:, 0]))
    np.testing.assert_array_equal(inputs.suffix, embedding_rows(model, token_ids[:, 3:]))
    # "a photo of a cat." is SOS + 6 tokens, so EOT sits at 7.
    assert int(inputs.eot_positions[0]) == 7
    for row, eot in zip(token_ids, np.asarray(inputs.eot_positions)):
        assert row[eot] == 49407
        assert 49407 not in row[:eot]


def test_class_prompt_inputs_checks(model):
    with pytest.raises(ValueError, match="context would replace"):
        prompts.class_prompt_inputs(model, ["cat"], n_ctx=2, template="{}")
    with pytest.raises(ValueError, match="tokens"):
        prompts.class_prompt_inputs(model, ["word " * 80])


def test_text_features_equal_plain_encoder_at_init(model):
    """With ctx = the "a photo" embeddings and no deep prompts, the prompted text tower is CLIP."""
    params = prompts.init_prompt_params(jax.random.key(0), model, n_ctx=2, depth=1)
    inputs = prompts.class_prompt_inputs(model, CLASSES, n_ctx=2)
    prompted = jax.jit(lambda c, p, i: prompts.prompted_text_features(model.module, c, p, i))(
        model.params, params, inputs
    )
    plain = model.encode_texts([f"a photo of a {name}." for name in CLASSES])
    assert prompted.shape == (3, 32)
    assert prompted.dtype == jnp.float32
    np.testing.assert_allclose(prompted, plain, rtol=0, atol=1e-5)


def test_image_features_use_projected_prompts(model, images, image_forward):
    """The image tower receives proj(ctx) and deep_proj(deep_text), nothing else."""
    params = prompts.init_prompt_params(jax.random.key(0), model, n_ctx=2, depth=2)
    prompted = image_forward(model.params, params, images)
    shallow, deep = prompts.project_prompts(params)
    expected = jax.jit(
        lambda p, x, s, d: model.module.apply(
            {"params": p}, x, s, d, method=cap_jax.clip.CLIP.encode_image
        )
    )(model.params, images, shallow, deep)
    np.testing.assert_allclose(prompted, expected, rtol=0, atol=1e-6)
    assert np.abs(np.asarray(prompted - model.encode_images(images))).max() > 1e-3


def test_project_prompts(model):
    params = prompts.init_prompt_params(jax.random.key(3), model, n_ctx=2, depth=2)
    shallow, deep = prompts.project_prompts(params)
    ctx, proj = np.asarray(params["ctx"]), params["proj"]
    np.testing.assert_allclose(shallow, ctx @ proj["kernel"] + proj["bias"], atol=1e-6)
    deep_text, deep_proj = np.asarray(params["deep_text"]), params["deep_proj"]
    np.testing.assert_allclose(
        deep[0], deep_text[0] @ deep_proj["kernel"][0] + deep_proj["bias"][0], atol=1e-6
    )


def test_gradients_reach_every_prompt(model, images):
    params = prompts.init_prompt_params(jax.random.key(4), model, n_ctx=2, depth=2)
    inputs = prompts.class_prompt_inputs(model, CLASSES, n_ctx=2)

    def loss(prompt_params):
        image_features = prompts.prompted_image_features(
            model.module, model.params, prompt_params, images
        )
        text_features = prompts.prompted_text_features(
            model.module, model.params, prompt_params, inputs
        )
        logits = image_features @ text_features.T  # [B, D] @ [D, C] -> [B, C]
        return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

    grads = jax.jit(jax.grad(loss))(params)
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(grad)), jax.tree_util.keystr(path)
        assert np.abs(grad).max() > 0, jax.tree_util.keystr(path)


def test_wrapped_clip_params_accepted(model, images, image_forward):
    params = prompts.init_prompt_params(jax.random.key(5), model, n_ctx=2, depth=2)
    inner = image_forward(model.params, params, images)
    wrapped = image_forward({"params": model.params}, params, images)
    np.testing.assert_array_equal(inner, wrapped)


def test_trimmed_prompts_same_features(model):
    full = prompts.class_prompt_inputs(model, CLASSES, n_ctx=2, trim=False)
    trimmed = prompts.class_prompt_inputs(model, CLASSES, n_ctx=2)
    length = int(np.max(np.asarray(full.eot_positions))) + 1
    assert trimmed.token_ids.shape == (3, length)
    assert trimmed.suffix.shape == (3, length - 3, 64)
    params = prompts.init_prompt_params(jax.random.key(0), model, depth=2)
    features = jax.jit(prompts.prompted_text_features, static_argnums=0)
    np.testing.assert_allclose(
        features(model.module, model.params, params, trimmed),
        features(model.module, model.params, params, full),
        atol=1e-5,
    )
