"""The prompted CLIP towers reproduce the PyTorch CAP/MaPLe forward pass (maple_forward case)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cap_jax import prompts
from cap_jax.clip import CLIP, load_reference_state_dict

REFERENCE = Path(__file__).parent / "data" / "reference"
ATOL = 1e-5


@pytest.fixture(scope="module")
def case():
    arrays = dict(np.load(REFERENCE / "maple_forward.npz"))
    meta = json.loads((REFERENCE / "maple_forward.json").read_text())
    sizes = meta["config"]
    config, clip_params, prompt_params, prompt_inputs = load_reference_state_dict(
        arrays,
        vision_heads=sizes["vision_width"] // 64,
        text_heads=sizes["transformer_heads"],
    )
    return arrays, sizes, config, clip_params, prompt_params, prompt_inputs


def jitted_forward(config, dtype=jnp.float32):
    """Return jitted ``(text_features, image_features)`` functions of the prompted towers."""
    module = CLIP(config, dtype=dtype)
    text = jax.jit(lambda c, p, i: prompts.prompted_text_features(module, c, p, i))
    image = jax.jit(lambda c, p, x: prompts.prompted_image_features(module, c, p, x))
    return text, image


def test_reference_config_matches_json(case):
    _, sizes, config, _, prompt_params, _ = case
    assert config.embed_dim == sizes["embed_dim"]
    assert config.image_resolution == sizes["image_resolution"]
    assert config.vision_layers == sizes["vision_layers"]
    assert config.vision_width == sizes["vision_width"]
    assert config.vision_patch_size == sizes["vision_patch_size"]
    assert config.text_width == sizes["transformer_width"]
    assert config.text_layers == sizes["transformer_layers"]
    assert config.context_length == sizes["context_length"]
    assert prompt_params["ctx"].shape == (sizes["n_ctx"], sizes["transformer_width"])
    assert prompt_params["deep_text"].shape[0] == sizes["prompt_depth"] - 1


def test_reference_text_features(case):
    arrays, _, config, clip_params, prompt_params, prompt_inputs = case
    text_features, _ = jitted_forward(config)
    features = text_features(clip_params, prompt_params, prompt_inputs)
    assert features.dtype == jnp.float32
    np.testing.assert_allclose(features, arrays["text_features"], rtol=0, atol=ATOL)


def test_reference_image_features(case):
    arrays, _, config, clip_params, prompt_params, _ = case
    _, image_features = jitted_forward(config)
    images = jnp.asarray(arrays["images"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
    features = image_features(clip_params, prompt_params, images)
    assert features.dtype == jnp.float32
    np.testing.assert_allclose(features, arrays["image_features"], rtol=0, atol=ATOL)


def test_reference_prompts_all_matter(case):
    """Zeroing any prompt part moves the features, so the test above checks every slot."""
    arrays, _, config, clip_params, prompt_params, prompt_inputs = case
    text_forward, image_forward = jitted_forward(config)
    images = jnp.asarray(arrays["images"].transpose(0, 2, 3, 1))
    for path in (("ctx",), ("deep_text",), ("proj", "kernel"), ("deep_proj", "kernel")):
        changed = jax.tree_util.tree_map(lambda a: a, prompt_params)
        target = changed
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = jnp.zeros_like(target[path[-1]])
        image_features = image_forward(clip_params, changed, images)
        assert np.abs(np.asarray(image_features) - arrays["image_features"]).max() > 1e-3, path
        if path[0] in ("ctx", "deep_text"):
            text_features = text_forward(clip_params, changed, prompt_inputs)
            assert np.abs(np.asarray(text_features) - arrays["text_features"]).max() > 1e-3, path


def test_reference_bfloat16_close(case):
    arrays, _, config, clip_params, prompt_params, prompt_inputs = case
    text_forward, image_forward = jitted_forward(config, jnp.bfloat16)
    images = jnp.asarray(arrays["images"].transpose(0, 2, 3, 1))
    image_features = image_forward(clip_params, prompt_params, images)
    text_features = text_forward(clip_params, prompt_params, prompt_inputs)
    assert image_features.dtype == jnp.float32
    assert text_features.dtype == jnp.float32
    np.testing.assert_allclose(image_features, arrays["image_features"], rtol=0, atol=0.1)
    np.testing.assert_allclose(text_features, arrays["text_features"], rtol=0, atol=0.1)
