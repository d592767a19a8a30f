"""cap_jax.clip.load and the state-dict loaders: sources, tokenisation and error messages."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import transformers

import cap_jax.clip
from cap_jax.clip import load_openai_state_dict, load_reference_state_dict

REFERENCE = Path(__file__).parent / "data" / "reference"
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 269, 49407]


@pytest.fixture(scope="module")
def tiny():
    return cap_jax.clip.load("random:tiny")


@pytest.fixture(scope="module")
def openai_arrays():
    """An OpenAI-named state dict: the reference towers renamed, plus a token embedding."""
    arrays = {}
    for name, value in np.load(REFERENCE / "maple_forward.npz").items():
        if name.startswith("image_encoder."):
            arrays["visual." + name.removeprefix("image_encoder.")] = value
        elif name.startswith("text_encoder."):
            arrays[name.removeprefix("text_encoder.")] = value
        elif name == "logit_scale":
            arrays[name] = value
    rng = np.random.default_rng(0)
    arrays["token_embedding.weight"] = rng.normal(0, 0.02, (49408, 64)).astype(np.float32)
    return arrays


def test_random_tiny_offline(tiny):
    assert tiny.is_random
    assert tiny.name == "random:tiny"
    assert isinstance(tiny.tokenizer, transformers.PreTrainedTokenizerBase)
    token_ids = tiny.tokenize(["a photo of a cat."])
    assert token_ids.dtype == np.int32
    assert token_ids.shape == (1, 77)
    assert token_ids[0, :8].tolist() == CAT_IDS
    assert np.all(token_ids[0, 8:] == tiny.config.pad_token_id)
    assert (tiny.config.sot_token_id, tiny.config.eot_token_id) == (49406, 49407)


def test_random_tiny_encodes(tiny):
    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    image_features = tiny.encode_images(images)
    text_features = tiny.encode_texts(["a photo of a cat.", "a photo of a dog."])
    assert image_features.shape == (2, 32)
    assert text_features.shape == (2, 32)
    assert image_features.dtype == text_features.dtype == jnp.float32
    assert np.abs(np.asarray(text_features[0] - text_features[1])).max() > 1e-4
    np.testing.assert_allclose(tiny.logit_scale, 1 / 0.07, rtol=1e-6)


def test_random_seed_changes_weights(tiny):
    other = cap_jax.clip.load("random:tiny", seed=1)
    same = cap_jax.clip.load("random:tiny", seed=0)
    kernel = ("visual", "blocks_0", "attn", "qkv", "kernel")

    def get(params):
        for key in kernel:
            params = params[key]
        return np.asarray(params)

    np.testing.assert_array_equal(get(same.params), get(tiny.params))
    assert np.abs(get(other.params) - get(tiny.params)).max() > 0


def test_bfloat16_model_close_to_float32(tiny):
    half = cap_jax.clip.load("random:tiny", dtype=jnp.bfloat16)
    images = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    texts = ["a photo of a cat.", "a blurry photo of a large dog."]
    for reduced, exact in (
        (half.encode_images(images), tiny.encode_images(images)),
        (half.encode_texts(texts), tiny.encode_texts(texts)),
    ):
        assert reduced.dtype == jnp.float32
        reduced, exact = np.asarray(reduced), np.asarray(exact)
        cosine = np.sum(reduced * exact, -1) / (
            np.linalg.norm(reduced, axis=-1) * np.linalg.norm(exact, axis=-1)
        )
        assert np.all(cosine > 0.999), cosine
        assert np.abs(reduced - exact).max() > 0  # the bfloat16 path really ran


def test_overlong_text_raises_with_count(tiny):
    text = "word " * 80
    with pytest.raises(ValueError, match="has 82 tokens") as info:
        tiny.tokenize(["a photo of a cat.", text])
    assert text.strip() in str(info.value)


def test_text_of_exactly_77_tokens_fits(tiny):
    token_ids = tiny.tokenize(["word " * 75])
    assert token_ids[0, 0] == 49406
    assert token_ids[0, 76] == 49407


def test_vit_b32_random_shapes():
    config = cap_jax.clip.loading.RANDOM_CONFIGS["ViT-B/32"]
    shapes = cap_jax.clip.param_shapes(config)
    assert shapes["visual"]["blocks_11"]["attn"]["qkv"]["kernel"].shape == (768, 2304)
    assert shapes["text"]["blocks_11"]["mlp"]["fc1"]["kernel"].shape == (512, 2048)
    assert shapes["visual"]["proj"].shape == (768, 512)
    assert shapes["text"]["proj"].shape == (512, 512)


def test_unknown_random_architecture():
    with pytest.raises(ValueError, match="random:ViT-B/32"):
        cap_jax.clip.load("random:ViT-H/99")


def test_missing_directory(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        cap_jax.clip.load(missing)
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        cap_jax.clip.load(str(missing))


def test_directory_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        cap_jax.clip.load(tmp_path)


def test_directory_without_weights(tmp_path):
    transformers.CLIPConfig().save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cap_jax.clip.load(tmp_path)


def test_hub_failure_names_id(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="openai/clip-vit-base-patch32") as info:
        cap_jax.clip.load("openai/clip-vit-base-patch32")
    assert "local directory" in str(info.value)
    assert "network unreachable" in str(info.value)


def test_openai_state_dict_matches_reference(openai_arrays):
    arrays = dict(np.load(REFERENCE / "maple_forward.npz"))
    ref_config, ref_params, _, _ = load_reference_state_dict(arrays, text_heads=2)
    config, params = load_openai_state_dict(openai_arrays, text_heads=2)
    assert config == ref_config
    np.testing.assert_array_equal(
        params["text"]["token_embedding"]["embedding"], openai_arrays["token_embedding.weight"]
    )
    params["text"]["token_embedding"] = ref_params["text"]["token_embedding"]
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref_params)):
        np.testing.assert_array_equal(a, b)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(ref_params)


def test_openai_state_dict_heads_default(openai_arrays):
    config, _ = load_openai_state_dict(openai_arrays)
    assert config.vision_heads == 128 // 64
    assert config.text_heads == 64 // 64


def test_openai_state_dict_missing_array(openai_arrays):
    arrays = dict(openai_arrays)
    del arrays["visual.transformer.resblocks.1.mlp.c_proj.bias"]
    with pytest.raises(ValueError, match="visual.transformer.resblocks.1.mlp.c_proj.bias"):
        load_openai_state_dict(arrays)


def test_openai_state_dict_wrong_shape(openai_arrays):
    arrays = dict(openai_arrays)
    arrays["ln_final.bias"] = np.zeros(65, np.float32)
    with pytest.raises(ValueError, match="ln_final"):
        load_openai_state_dict(arrays)


def test_load_openai_safetensors_file(tmp_path, openai_arrays):
    path = tmp_path / "clip.safetensors"
    half = {k: np.asarray(v, np.float16) for k, v in openai_arrays.items()}
    safetensors.numpy.save_file(half, str(path))
    model = cap_jax.clip.load(path)
    assert not model.is_random
    assert model.config.vision_width == 128
    np.testing.assert_array_equal(
        model.params["visual"]["proj"], half["visual.proj"].astype(np.float32)
    )
    assert model.encode_texts(["a photo of a cat."]).shape == (1, 32)


def test_load_rejects_reference_and_torch_files(tmp_path):
    path = tmp_path / "reference.npz"
    np.savez(path, **dict(np.load(REFERENCE / "maple_forward.npz")))
    with pytest.raises(ValueError, match="load_reference_state_dict"):
        cap_jax.clip.load(path)
    torch_file = tmp_path / "model.pt"
    torch_file.write_bytes(b"not read")
    with pytest.raises(ValueError, match="PyTorch"):
        cap_jax.clip.load(torch_file)


def test_reference_state_dict_without_prompts_inputs():
    arrays = dict(np.load(REFERENCE / "maple_forward.npz"))
    del arrays["tokenized_prompts"]
    _, clip_params, prompt_params, prompt_inputs = load_reference_state_dict(arrays)
    assert prompt_inputs is None
    assert prompt_params["deep_proj"]["kernel"].shape == (2, 64, 128)
    assert not np.any(np.asarray(clip_params["text"]["token_embedding"]["embedding"]))
