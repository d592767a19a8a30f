"""CLIP in Flax with MaPLe prompt slots, weight loading and tokenisation."""

from cap_jax.clip.loading import CLIPModel, load, read_safetensors
from cap_jax.clip.model import CLIP, CLIPConfig, init_params, param_shapes
from cap_jax.clip.state_dicts import (
    load_hf_state_dict,
    load_openai_state_dict,
    load_prompt_state_dict,
    load_reference_state_dict,
)
from cap_jax.clip.tokenizer import openai_tokenizer, tokenize

__all__ = [
    "CLIP",
    "CLIPConfig",
    "CLIPModel",
    "init_params",
    "load",
    "load_hf_state_dict",
    "load_openai_state_dict",
    "load_prompt_state_dict",
    "load_reference_state_dict",
    "openai_tokenizer",
    "param_shapes",
    "read_safetensors",
    "tokenize",
]
