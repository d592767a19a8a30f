"""MaPLe prompt parameters and the prompted CLIP encoders.

MaPLe (Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023) learns ``n_ctx`` text
context tokens that replace the first ``n_ctx`` words of the class prompt, plus deep text prompts
for blocks ``1 .. depth - 1`` of the text tower. Linear maps project each text prompt to the
vision width, and the projections serve as the image tower's prompts. With ``n_ctx = 2`` and the
template "a photo of a {}.", the text tower reads ``[SOS] ctx_1 ctx_2 of a {class}. [EOT]``.

The prompt parameters are a pytree separate from the frozen CLIP parameters, so a train step can
differentiate with respect to them alone. ``prompted_text_features`` and
``prompted_image_features`` are pure and jittable. Parameters are float32; activations run in
the module's dtype; features are float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cap_jax.clip.model import CLIP

if TYPE_CHECKING:
    from cap_jax.clip.loading import CLIPModel

PromptParams = dict[str, Any]


class PromptInputs(NamedTuple):
    """The fixed text-tower inputs around the learned context, one row per class.

    Attributes:
        token_ids: int32 ``[C, L]`` token ids of the filled template.
        prefix: float32 ``[C, 1, Wt]`` embedding of the SOS token.
        suffix: float32 ``[C, L - 1 - n_ctx, Wt]`` embeddings of the tokens after the context.
        eot_positions: int32 ``[C]`` position of the EOT token, where text features pool.
    """

    token_ids: jax.Array
    prefix: jax.Array
    suffix: jax.Array
    eot_positions: jax.Array


def _torch_linear_init(rng: jax.Array, fan_in: int, shape: tuple[int, ...]) -> jax.Array:
    """Sample like ``torch.nn.Linear``'s default init: uniform in ``[-1/sqrt(fan_in), +]``."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def _clip_variables(clip_params: Any) -> dict[str, Any]:
    """Wrap the inner CLIP parameter dict for ``module.apply``; accept a wrapped one too."""
    if isinstance(clip_params, dict) and set(clip_params) == {"params"}:
        return clip_params
    return {"params": clip_params}


def init_prompt_params(
    rng: jax.Array,
    model: CLIPModel,
    *,
    n_ctx: int = 2,
    depth: int = 8,
    ctx_init: str | None = "a photo",
) -> PromptParams:
    """Initialise MaPLe prompt parameters as the reference does.

    The context starts as the token embeddings of the first ``n_ctx`` tokens of ``ctx_init``
    (random normal with std 0.02 when ``ctx_init`` is empty or None). Deep text prompts are
    normal with std 0.02. The projections use ``torch.nn.Linear``'s default initialisation, and
    all deep projections start equal because MaPLe clones one layer.

    Args:
        rng: a JAX random key.
        model: the CLIP model whose token embedding and widths are used.
        n_ctx: number of learned context tokens.
        depth: prompt depth; deep prompts go into blocks ``1 .. depth - 1`` of both towers.
        ctx_init: text whose first ``n_ctx`` tokens initialise the context.

    Returns:
        ``{'ctx': [n_ctx, Wt], 'proj': {'kernel': [Wt, Wv], 'bias': [Wv]},
        'deep_text': [depth - 1, n_ctx, Wt],
        'deep_proj': {'kernel': [depth - 1, Wt, Wv], 'bias': [depth - 1, Wv]}}``, float32.
    """
    config = model.config
    max_depth = min(config.vision_layers, config.text_layers)
    if not 1 <= depth <= max_depth:
        raise ValueError(f"depth must be in [1, {max_depth}] for this model, got {depth}")
    if n_ctx < 1:
        raise ValueError(f"n_ctx must be at least 1, got {n_ctx}")
    params = _random_prompt_params(
        rng,
        n_ctx=n_ctx,
        depth=depth,
        text_width=config.text_width,
        vision_width=config.vision_width,
    )
    if ctx_init:
        token_ids = model.tokenize([ctx_init])
        num_words = int(np.argmax(token_ids[0] == config.eot_token_id)) - 1
        if num_words < n_ctx:
            raise ValueError(
                f"ctx_init {ctx_init!r} has {num_words} tokens, fewer than n_ctx={n_ctx}"
            )
        params["ctx"] = model.embed_tokens(token_ids)[0, 1 : 1 + n_ctx]
    return params


@functools.partial(jax.jit, static_argnames=("n_ctx", "depth", "text_width", "vision_width"))
def _random_prompt_params(
    rng: jax.Array, *, n_ctx: int, depth: int, text_width: int, vision_width: int
) -> PromptParams:
    """Sample every prompt parameter; ``ctx`` is normal with std 0.02."""
    keys = jax.random.split(rng, 6)
    deep_kernel = _torch_linear_init(keys[4], text_width, (text_width, vision_width))
    deep_bias = _torch_linear_init(keys[5], text_width, (vision_width,))
    return {
        "ctx": 0.02 * jax.random.normal(keys[0], (n_ctx, text_width), jnp.float32),
        "proj": {
            "kernel": _torch_linear_init(keys[1], text_width, (text_width, vision_width)),
            "bias": _torch_linear_init(keys[2], text_width, (vision_width,)),
        },
        "deep_text": 0.02 * jax.random.normal(keys[3], (depth - 1, n_ctx, text_width)),
        # MaPLe clones one projection layer, so the deep projections start equal.
        "deep_proj": {
            "kernel": jnp.tile(deep_kernel, (depth - 1, 1, 1)),
            "bias": jnp.tile(deep_bias, (depth - 1, 1)),
        },
    }


def class_prompt_inputs(
    model: CLIPModel,
    class_names: Sequence[str],
    *,
    n_ctx: int = 2,
    template: str = "a photo of a {}.",
    trim: bool = True,
) -> PromptInputs:
    """Tokenise and embed the class prompts around the learned context.

    The first ``n_ctx`` tokens after SOS of ``template.format(name)`` are the ones the context
    replaces, so with the defaults the words "a photo" give way to the context.

    Args:
        model: the CLIP model.
        class_names: C class names, as they go into the template.
        n_ctx: number of learned context tokens.
        template: prompt with one ``{}`` for the class name.
        trim: cut the token sequences after the last EOT of all classes. The text tower is
            causal, so the features do not change, and it runs on about 10 positions instead
            of 77 for short prompts.

    Returns:
        ``PromptInputs`` with C rows.

    Raises:
        ValueError: a prompt has no more than ``n_ctx`` tokens between SOS and EOT, or is longer
            than the context length.
    """
    token_ids = model.tokenize([template.format(name) for name in class_names])
    eot_positions = np.argmax(token_ids == model.config.eot_token_id, axis=-1).astype(np.int32)
    too_short = [name for name, eot in zip(class_names, eot_positions) if eot <= n_ctx + 1]
    if too_short:
        raise ValueError(
            f"the prompts of classes {too_short} have at most n_ctx={n_ctx} tokens, so the "
            f"context would replace all of them; use a longer template than {template!r}"
        )
    if trim:
        token_ids = token_ids[:, : int(eot_positions.max()) + 1]
    embeddings = model.embed_tokens(token_ids)
    return PromptInputs(
        token_ids=jnp.asarray(token_ids),
        prefix=embeddings[:, :1],
        suffix=embeddings[:, 1 + n_ctx :],
        eot_positions=jnp.asarray(eot_positions),
    )


def text_prompt_embeddings(prompt_params: PromptParams, prompt_inputs: PromptInputs) -> jax.Array:
    """Assemble ``[SOS] ctx [rest]`` per class: float32 ``[C, L, Wt]``."""
    ctx = prompt_params["ctx"]
    prefix, suffix = prompt_inputs.prefix, prompt_inputs.suffix
    if ctx.ndim != 2 or prefix.shape[-1] != ctx.shape[-1] or suffix.shape[-1] != ctx.shape[-1]:
        raise ValueError(
            f"ctx [n_ctx, Wt], prefix [C, 1, Wt] and suffix [C, S, Wt] must share Wt; got "
            f"{ctx.shape}, {prefix.shape} and {suffix.shape}"
        )
    num_classes = prefix.shape[0]
    ctx = jnp.broadcast_to(ctx.astype(prefix.dtype), (num_classes,) + ctx.shape)
    return jnp.concatenate([prefix, ctx, suffix], axis=1)


def project_prompts(prompt_params: PromptParams) -> tuple[jax.Array, jax.Array]:
    """Project the text prompts to the vision width, in float32.

    Returns:
        ``(shallow [n_ctx, Wv], deep [depth - 1, n_ctx, Wv])``: ``proj(ctx)`` and
        ``deep_proj[i](deep_text[i])`` for each deep layer ``i``.
    """
    proj, deep_proj = prompt_params["proj"], prompt_params["deep_proj"]
    # [n_ctx, Wt] @ [Wt, Wv] -> [n_ctx, Wv]
    shallow = prompt_params["ctx"] @ proj["kernel"] + proj["bias"]
    # [depth - 1, n_ctx, Wt] @ [depth - 1, Wt, Wv] -> [depth - 1, n_ctx, Wv]
    deep = jnp.einsum("lnt,ltv->lnv", prompt_params["deep_text"], deep_proj["kernel"])
    return shallow, deep + deep_proj["bias"][:, None, :]


def prompted_text_features(
    module: CLIP,
    clip_params: Any,
    prompt_params: PromptParams,
    prompt_inputs: PromptInputs,
) -> jax.Array:
    """Encode the class prompts with the learned context and deep text prompts.

    Args:
        module: the ``CLIP`` module (``model.module``); its dtype sets the activation dtype.
        clip_params: the inner CLIP parameter dict (``model.params``).
        prompt_params: MaPLe prompt parameters from ``init_prompt_params``.
        prompt_inputs: class prompt inputs from ``class_prompt_inputs``.

    Returns:
        float32 ``[C, D]`` text features, not normalised.
    """
    embeddings = text_prompt_embeddings(prompt_params, prompt_inputs)
    return module.apply(
        _clip_variables(clip_params),
        embeddings,
        prompt_inputs.eot_positions,
        prompt_params["deep_text"],
        method=CLIP.encode_text_embeddings,
    )


def prompted_image_features(
    module: CLIP,
    clip_params: Any,
    prompt_params: PromptParams,
    images: jax.Array,
) -> jax.Array:
    """Encode images with the projected MaPLe prompts.

    Args:
        module: the ``CLIP`` module (``model.module``); its dtype sets the activation dtype.
        clip_params: the inner CLIP parameter dict (``model.params``).
        prompt_params: MaPLe prompt parameters from ``init_prompt_params``.
        images: ``[B, H, W, 3]`` CLIP-normalised images.

    Returns:
        float32 ``[B, D]`` image features, not normalised.
    """
    shallow, deep = project_prompts(prompt_params)
    return module.apply(
        _clip_variables(clip_params), images, shallow, deep, method=CLIP.encode_image
    )
