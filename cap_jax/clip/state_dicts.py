"""Conversion of PyTorch CLIP state dicts (as numpy arrays) into ``CLIP`` parameters.

Three naming schemes are read:

* OpenAI CLIP (``visual.conv1.weight``, ``transformer.resblocks.{i}.attn.in_proj_weight``, ...).
* The reference CAP/MaPLe ``CustomCLIP`` (``image_encoder.*``, ``text_encoder.*``,
  ``prompt_learner.*``); its towers use OpenAI's layout under other prefixes.
* Hugging Face transformers ``CLIPModel`` (``vision_model.*``, ``text_model.*``,
  ``visual_projection.weight``, ...), whose sizes come from ``config.json``.

PyTorch linear weights are ``[out, in]`` and become Flax kernels ``[in, out]``. The patch
convolution ``[W, 3, p, p]`` becomes ``[p, p, 3, W]``. OpenAI's ``in_proj_weight`` already stacks
q, k and v in the order of the fused ``qkv`` kernel. Every array is converted to float32.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cap_jax.clip.model import CLIPConfig, param_shapes

Params = dict[str, Any]


class _StateDict:
    """Read access to named arrays with errors that name the missing key."""

    def __init__(self, arrays: Mapping[str, Any], *, source: str):
        self.arrays = arrays
        self.source = source

    def __contains__(self, name: str) -> bool:
        return name in self.arrays

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise ValueError(f"{self.source} has no array named {name!r}")
        return np.asarray(self.arrays[name], dtype=np.float32)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(np.shape(self(name)))

    def count_layers(self, pattern: str) -> int:
        """Count distinct ``(\\d+)`` matches of ``pattern`` over the names."""
        regex = re.compile(pattern)
        indices = {int(m.group(1)) for name in self.arrays if (m := regex.match(name))}
        return len(indices)


def _layer_norm(sd: _StateDict, name: str) -> Params:
    return {"scale": sd(f"{name}.weight"), "bias": sd(f"{name}.bias")}


def _linear(sd: _StateDict, name: str) -> Params:
    return {"kernel": sd(f"{name}.weight").T, "bias": sd(f"{name}.bias")}


def _patch_kernel(weight: np.ndarray) -> np.ndarray:
    return weight.transpose(2, 3, 1, 0)  # [W, 3, p, p] -> [p, p, 3, W]


def _openai_block(sd: _StateDict, prefix: str) -> Params:
    return {
        "ln_1": _layer_norm(sd, f"{prefix}.ln_1"),
        "attn": {
            "qkv": {
                "kernel": sd(f"{prefix}.attn.in_proj_weight").T,
                "bias": sd(f"{prefix}.attn.in_proj_bias"),
            },
            "out": _linear(sd, f"{prefix}.attn.out_proj"),
        },
        "ln_2": _layer_norm(sd, f"{prefix}.ln_2"),
        "mlp": {
            "fc1": _linear(sd, f"{prefix}.mlp.c_fc"),
            "fc2": _linear(sd, f"{prefix}.mlp.c_proj"),
        },
    }


def _hf_block(sd: _StateDict, prefix: str) -> Params:
    attn = f"{prefix}.self_attn"
    qkv_weight = np.concatenate([sd(f"{attn}.{n}_proj.weight") for n in "qkv"], axis=0)
    qkv_bias = np.concatenate([sd(f"{attn}.{n}_proj.bias") for n in "qkv"], axis=0)
    return {
        "ln_1": _layer_norm(sd, f"{prefix}.layer_norm1"),
        "attn": {
            "qkv": {"kernel": qkv_weight.T, "bias": qkv_bias},
            "out": _linear(sd, f"{attn}.out_proj"),
        },
        "ln_2": _layer_norm(sd, f"{prefix}.layer_norm2"),
        "mlp": {"fc1": _linear(sd, f"{prefix}.mlp.fc1"), "fc2": _linear(sd, f"{prefix}.mlp.fc2")},
    }


def _mlp_width(hidden: int, width: int) -> int | None:
    return None if hidden == 4 * width else hidden


def _openai_config(
    sd: _StateDict,
    *,
    visual: str,
    text: str,
    vision_heads: int | None,
    text_heads: int | None,
) -> CLIPConfig:
    """Infer the sizes from the array shapes, as OpenAI's ``build_model`` does.

    Heads default to ``width // 64``, which holds for every released OpenAI model.
    """
    if f"{visual}layer1.0.conv1.weight" in sd:
        raise ValueError(
            f"{sd.source} has a ResNet image tower; only ViT image towers are supported"
        )
    vision_width, _, _, patch_size = sd.shape(f"{visual}conv1.weight")
    num_tokens = sd.shape(f"{visual}positional_embedding")[0]
    grid_size = round((num_tokens - 1) ** 0.5)
    text_width = sd.shape(f"{text}ln_final.weight")[0]
    token_embedding = f"{text}token_embedding.weight"
    return CLIPConfig(
        embed_dim=sd.shape(f"{visual}proj")[1],
        image_resolution=grid_size * patch_size,
        vision_layers=sd.count_layers(
            rf"^{re.escape(visual)}transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$"
        ),
        vision_width=vision_width,
        vision_patch_size=patch_size,
        vision_heads=vision_heads or vision_width // 64,
        text_width=text_width,
        text_heads=text_heads or text_width // 64,
        text_layers=sd.count_layers(
            rf"^{re.escape(text)}transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$"
        ),
        context_length=sd.shape(f"{text}positional_embedding")[0],
        vocab_size=sd.shape(token_embedding)[0] if token_embedding in sd else 49408,
        vision_mlp_width=_mlp_width(
            sd.shape(f"{visual}transformer.resblocks.0.mlp.c_fc.weight")[0], vision_width
        ),
        text_mlp_width=_mlp_width(
            sd.shape(f"{text}transformer.resblocks.0.mlp.c_fc.weight")[0], text_width
        ),
    )


def _openai_params(sd: _StateDict, config: CLIPConfig, *, visual: str, text: str) -> Params:
    """Build the parameter tree from OpenAI names under the given tower prefixes.

    A missing text token embedding (the reference text encoder has none) becomes zeros.
    """
    token_embedding = f"{text}token_embedding.weight"
    if token_embedding in sd:
        embedding = sd(token_embedding)
    else:
        embedding = np.zeros((config.vocab_size, config.text_width), np.float32)
    return {
        "logit_scale": sd("logit_scale"),
        "visual": {
            "patch_embedding": {"kernel": _patch_kernel(sd(f"{visual}conv1.weight"))},
            "class_embedding": sd(f"{visual}class_embedding"),
            "positional_embedding": sd(f"{visual}positional_embedding"),
            "ln_pre": _layer_norm(sd, f"{visual}ln_pre"),
            **{
                f"blocks_{i}": _openai_block(sd, f"{visual}transformer.resblocks.{i}")
                for i in range(config.vision_layers)
            },
            "ln_post": _layer_norm(sd, f"{visual}ln_post"),
            "proj": sd(f"{visual}proj"),
        },
        "text": {
            "token_embedding": {"embedding": embedding},
            "positional_embedding": sd(f"{text}positional_embedding"),
            **{
                f"blocks_{i}": _openai_block(sd, f"{text}transformer.resblocks.{i}")
                for i in range(config.text_layers)
            },
            "ln_final": _layer_norm(sd, f"{text}ln_final"),
            "proj": sd(f"{text}text_projection"),
        },
    }


def _hf_params(sd: _StateDict, config: CLIPConfig) -> Params:
    vision, text = "vision_model", "text_model"
    return {
        "logit_scale": sd("logit_scale"),
        "visual": {
            "patch_embedding": {
                "kernel": _patch_kernel(sd(f"{vision}.embeddings.patch_embedding.weight"))
            },
            "class_embedding": sd(f"{vision}.embeddings.class_embedding"),
            "positional_embedding": sd(f"{vision}.embeddings.position_embedding.weight"),
            # "pre_layrnorm" is the transformers spelling.
            "ln_pre": _layer_norm(sd, f"{vision}.pre_layrnorm"),
            **{
                f"blocks_{i}": _hf_block(sd, f"{vision}.encoder.layers.{i}")
                for i in range(config.vision_layers)
            },
            "ln_post": _layer_norm(sd, f"{vision}.post_layernorm"),
            "proj": sd("visual_projection.weight").T,
        },
        "text": {
            "token_embedding": {"embedding": sd(f"{text}.embeddings.token_embedding.weight")},
            "positional_embedding": sd(f"{text}.embeddings.position_embedding.weight"),
            **{
                f"blocks_{i}": _hf_block(sd, f"{text}.encoder.layers.{i}")
                for i in range(config.text_layers)
            },
            "ln_final": _layer_norm(sd, f"{text}.final_layer_norm"),
            "proj": sd("text_projection.weight").T,
        },
    }


def _finalize(params: Params, config: CLIPConfig, *, source: str) -> Params:
    """Check ``params`` against the shapes that ``CLIP(config)`` expects; return jax arrays."""
    expected = param_shapes(config)
    expected_paths = {jax.tree_util.keystr(p): s.shape for p, s in _leaves(expected)}
    actual_paths = {jax.tree_util.keystr(p): np.shape(a) for p, a in _leaves(params)}
    problems = [
        f"{path}: expected {shape}, got {actual_paths.get(path, 'nothing')}"
        for path, shape in expected_paths.items()
        if actual_paths.get(path) != shape
    ]
    problems += [f"{path}: unexpected" for path in actual_paths if path not in expected_paths]
    if problems:
        raise ValueError(
            f"{source} does not match the inferred {config}:\n  " + "\n  ".join(problems)
        )
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)


def _leaves(tree: Params) -> list[tuple[Any, Any]]:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def load_openai_state_dict(
    arrays: Mapping[str, Any],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
) -> tuple[CLIPConfig, Params]:
    """Convert an OpenAI CLIP (ViT) state dict into a config and ``CLIP`` parameters.

    Args:
        arrays: name -> array (numpy, or anything ``np.asarray`` reads), OpenAI names such as
            ``visual.conv1.weight`` and ``transformer.resblocks.0.attn.in_proj_weight``.
        vision_heads: attention heads of the image tower; default ``vision_width // 64``.
        text_heads: attention heads of the text tower; default ``text_width // 64``.

    Returns:
        ``(config, params)``; ``params`` is the inner parameter dict of ``CLIP(config)``.
    """
    sd = _StateDict(arrays, source="the OpenAI CLIP state dict")
    config = _openai_config(
        sd, visual="visual.", text="", vision_heads=vision_heads, text_heads=text_heads
    )
    params = _openai_params(sd, config, visual="visual.", text="")
    return config, _finalize(params, config, source=sd.source)


def load_hf_state_dict(arrays: Mapping[str, Any], config: CLIPConfig) -> Params:
    """Convert a transformers ``CLIPModel`` state dict into ``CLIP(config)`` parameters.

    Args:
        arrays: name -> array with transformers names (``vision_model.encoder.layers.0...``).
        config: the sizes, read from the checkpoint's ``config.json``.

    Returns:
        The inner parameter dict of ``CLIP(config)``.
    """
    sd = _StateDict(arrays, source="the Hugging Face CLIP state dict")
    return _finalize(_hf_params(sd, config), config, source=sd.source)


def load_prompt_state_dict(
    arrays: Mapping[str, Any], *, prefix: str = "prompt_learner."
) -> dict[str, Any]:
    """Convert MaPLe prompt-learner arrays into the prompt parameters of ``cap_jax.prompts``.

    Args:
        arrays: name -> array with the reference names ``{prefix}ctx``, ``{prefix}proj.*``,
            ``{prefix}compound_prompts_text.{i}`` and
            ``{prefix}compound_prompt_projections.{i}.*``.
        prefix: the prefix of the prompt-learner names.

    Returns:
        ``{'ctx': [n_ctx, Wt], 'proj': {'kernel': [Wt, Wv], 'bias': [Wv]},
        'deep_text': [depth - 1, n_ctx, Wt],
        'deep_proj': {'kernel': [depth - 1, Wt, Wv], 'bias': [depth - 1, Wv]}}``, float32.
    """
    sd = _StateDict(arrays, source="the prompt-learner state dict")
    p = re.escape(prefix)
    depth_minus_1 = sd.count_layers(rf"^{p}compound_prompts_text\.(\d+)$")
    ctx = sd(f"{prefix}ctx")
    if ctx.ndim != 2:
        raise ValueError(
            f"{prefix}ctx must be [n_ctx, width] (one context shared by all classes), "
            f"got {ctx.shape}"
        )
    proj = _linear(sd, f"{prefix}proj")
    n_ctx, text_width = ctx.shape
    vision_width = proj["bias"].shape[0]
    deep_text = [sd(f"{prefix}compound_prompts_text.{i}") for i in range(depth_minus_1)]
    deep_proj = [
        _linear(sd, f"{prefix}compound_prompt_projections.{i}") for i in range(depth_minus_1)
    ]
    return {
        "ctx": jnp.asarray(ctx),
        "proj": jax.tree_util.tree_map(jnp.asarray, proj),
        "deep_text": jnp.asarray(np.stack(deep_text).reshape(depth_minus_1, n_ctx, text_width)),
        "deep_proj": {
            "kernel": jnp.asarray(
                np.stack([d["kernel"] for d in deep_proj]).reshape(
                    depth_minus_1, text_width, vision_width
                )
            ),
            "bias": jnp.asarray(
                np.stack([d["bias"] for d in deep_proj]).reshape(depth_minus_1, vision_width)
            ),
        },
    }


def load_reference_state_dict(
    arrays: Mapping[str, Any],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
):
    """Convert a reference CAP/MaPLe ``CustomCLIP`` state dict.

    The reference text encoder has no token embedding, so the returned
    ``clip_params['text']['token_embedding']`` is zeros: the text tower is usable only through
    ``prompt_inputs`` (or after copying in the embedding of the matching OpenAI model).

    Args:
        arrays: name -> array with ``image_encoder.*``, ``text_encoder.*``, ``prompt_learner.*``
            and ``logit_scale``. When ``tokenized_prompts`` ``[C, L]`` is present as well, the
            class prompt inputs are built from it and the stored token prefix and suffix.
        vision_heads: attention heads of the image tower; default ``vision_width // 64``.
        text_heads: attention heads of the text tower; default ``text_width // 64``.

    Returns:
        ``(config, clip_params, prompt_params, prompt_inputs)``; ``prompt_inputs`` is a
        ``cap_jax.prompts.PromptInputs``, or None without ``tokenized_prompts``,
        ``prompt_learner.token_prefix`` and ``prompt_learner.token_suffix``.
    """
    # Imported here because cap_jax.prompts imports this package.
    from cap_jax.prompts import PromptInputs

    sd = _StateDict(arrays, source="the reference state dict")
    config = _openai_config(
        sd,
        visual="image_encoder.",
        text="text_encoder.",
        vision_heads=vision_heads,
        text_heads=text_heads,
    )
    clip_params = _finalize(
        _openai_params(sd, config, visual="image_encoder.", text="text_encoder."),
        config,
        source=sd.source,
    )
    prompt_params = load_prompt_state_dict(arrays)

    names = ("tokenized_prompts", "prompt_learner.token_prefix", "prompt_learner.token_suffix")
    prompt_inputs = None
    if all(name in sd for name in names):
        token_ids = np.asarray(arrays["tokenized_prompts"]).astype(np.int32)
        prompt_inputs = PromptInputs(
            token_ids=jnp.asarray(token_ids),
            prefix=jnp.asarray(sd("prompt_learner.token_prefix")),
            suffix=jnp.asarray(sd("prompt_learner.token_suffix")),
            eot_positions=jnp.asarray(np.argmax(token_ids == config.eot_token_id, axis=-1)),
        )
    return config, clip_params, prompt_params, prompt_inputs
