"""Features of a Hugging Face CLIP directory loaded by cap_jax match transformers' CLIPModel."""

import logging

import numpy as np
import pytest
import torch
import transformers

import cap_jax.clip
from cap_jax.clip import openai_tokenizer

ATOL = 1e-4
TEXTS = [
    "a photo of a cat.",
    "a diagram",
    "The quick brown fox jumps over the lazy dog, twice!",
]


def tiny_hf_model(hidden_act: str = "quick_gelu") -> transformers.CLIPModel:
    """Build a random transformers CLIP with every parameter perturbed away from its init."""
    tower = {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "hidden_act": hidden_act,
    }
    config = transformers.CLIPConfig(
        text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 77},
        vision_config={**tower, "image_size": 224, "patch_size": 32},
        projection_dim=32,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():
        # LayerNorm scales start at 1 and biases at 0; perturbing them makes the mapping of
        # every parameter matter.
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def features(output) -> np.ndarray:
    """Take the projected features from transformers' return value.

    transformers 5 returns BaseModelOutputWithPooling with them in ``pooler_output``;
    transformers 4 returned the tensor itself.
    """
    tensor = getattr(output, "pooler_output", output)
    return tensor.detach().numpy()


@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_clip")
    model = tiny_hf_model()
    model.save_pretrained(directory)
    openai_tokenizer().save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def inputs():
    images = np.random.default_rng(0).normal(size=(2, 224, 224, 3)).astype(np.float32)
    return images


def test_hf_image_features_match(hf_directory, inputs):
    hf_model, directory = hf_directory
    model = cap_jax.clip.load(directory)
    pixel_values = torch.from_numpy(inputs.transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW
    with torch.no_grad():
        expected = features(hf_model.get_image_features(pixel_values=pixel_values))
    np.testing.assert_allclose(model.encode_images(inputs), expected, rtol=0, atol=ATOL)


def test_hf_text_features_match(hf_directory):
    hf_model, directory = hf_directory
    model = cap_jax.clip.load(directory)
    token_ids = model.tokenize(TEXTS)
    with torch.no_grad():
        expected = features(
            hf_model.get_text_features(input_ids=torch.from_numpy(token_ids).long())
        )
    np.testing.assert_allclose(model.encode_texts(TEXTS), expected, rtol=0, atol=ATOL)


def test_hf_tokenizer_and_scale_match(hf_directory):
    hf_model, directory = hf_directory
    model = cap_jax.clip.load(directory)
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
    expected = hf_tokenizer(TEXTS, padding="max_length", max_length=77)["input_ids"]
    np.testing.assert_array_equal(model.tokenize(TEXTS), np.asarray(expected))
    assert not model.is_random
    assert model.name == str(directory)
    np.testing.assert_allclose(model.logit_scale, hf_model.logit_scale.exp().item(), rtol=1e-6)


def test_hf_gelu_model_matches(tmp_path, inputs):
    hf_model = tiny_hf_model(hidden_act="gelu")
    hf_model.save_pretrained(tmp_path)
    openai_tokenizer().save_pretrained(tmp_path)
    model = cap_jax.clip.load(tmp_path)
    assert model.config.hidden_act == "gelu"
    pixel_values = torch.from_numpy(inputs[:1].transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = features(hf_model.get_image_features(pixel_values=pixel_values))
    np.testing.assert_allclose(model.encode_images(inputs[:1]), expected, rtol=0, atol=ATOL)


def test_hf_directory_without_tokenizer(tmp_path, hf_directory, caplog):
    hf_model, _ = hf_directory
    hf_model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="cap_jax.clip.loading"):
        model = cap_jax.clip.load(tmp_path)
    assert "no tokenizer files" in caplog.text
    assert model.tokenize(["a photo of a cat."])[0, :8].tolist() == [
        49406,
        320,
        1125,
        539,
        320,
        2368,
        269,
        49407,
    ]


def test_hf_directory_with_torch_weights_only(tmp_path, hf_directory):
    hf_model, _ = hf_directory
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        cap_jax.clip.load(tmp_path)


def test_bfloat16_safetensors_read(tmp_path):
    import safetensors.torch

    tensor = torch.randn(3, 5).to(torch.bfloat16)
    safetensors.torch.save_file({"w": tensor, "b": torch.arange(4)}, tmp_path / "x.safetensors")
    arrays = cap_jax.clip.read_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(arrays["w"].astype(np.float32), tensor.float().numpy())
    np.testing.assert_array_equal(arrays["b"], np.arange(4))
