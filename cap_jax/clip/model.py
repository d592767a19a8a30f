"""CLIP image and text towers in Flax linen, with MaPLe prompt slots.

The architecture follows OpenAI CLIP with a ViT image tower: pre-LayerNorm residual blocks, a
patch embedding without bias, class-token pooling in the image tower, pooling at the EOT token in
the causal text tower, and projections without bias.

MaPLe prompts (Khattak et al., "MaPLe: Multi-modal Prompt Learning", CVPR 2023) enter as follows:

* The image tower appends ``shallow_prompts`` (``n_ctx`` tokens of the vision width) after the
  class and patch tokens, after the positional embedding is added and before ``ln_pre``.
* Before block ``i`` for ``i`` in ``1 .. len(deep_prompts)``, the image tower overwrites its last
  ``n_ctx`` tokens with ``deep_prompts[i - 1]`` and the text tower overwrites the ``n_ctx`` tokens
  after SOS with its own ``deep_prompts[i - 1]``.

Parameters are float32. Activations use ``dtype`` (float32 or bfloat16); the final LayerNorm and
the output projection of each tower run in float32, so features are always float32.

The last block of each tower computes its attention output and MLP only at the pooled position
(class token or EOT token). Keys and values still cover every token, so the result equals the full
computation while the last block does about a quarter of the work. With ``remat=True`` the other
blocks recompute their activations in the backward pass, which bounds the memory of training
prompts through the text tower with hundreds of classes.

NOTE: on TPU, float32 matmuls use the backend's default precision, which is lower than full
float32. Set ``jax.config.update("jax_default_matmul_precision", "highest")`` when float32
parity with PyTorch matters there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# CLIP's initialisation scale for the text token and position embeddings.
TOKEN_EMBEDDING_STD = 0.02
TEXT_POSITION_STD = 0.01
LOGIT_SCALE_INIT = math.log(1 / 0.07)

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Sizes and token ids of a CLIP model with a ViT image tower.

    Attributes:
        embed_dim: width of the joint image-text feature space.
        image_resolution: input image height and width in pixels.
        vision_layers: number of residual blocks of the image tower.
        vision_width: token width of the image tower.
        vision_patch_size: patch height and width in pixels.
        vision_heads: attention heads of the image tower.
        text_width: token width of the text tower.
        text_heads: attention heads of the text tower.
        text_layers: number of residual blocks of the text tower.
        context_length: text length in tokens, including SOT and EOT.
        vocab_size: number of token ids.
        layer_norm_eps: LayerNorm epsilon of both towers.
        hidden_act: MLP activation, one of ``ACTIVATIONS``.
        sot_token_id: start-of-text token id.
        eot_token_id: end-of-text token id; text features pool at its first occurrence.
        pad_token_id: id that fills token rows after EOT.
        vision_mlp_width: hidden width of the image MLPs; None means ``4 * vision_width``.
        text_mlp_width: hidden width of the text MLPs; None means ``4 * text_width``.
    """

    embed_dim: int
    image_resolution: int
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    vision_heads: int
    text_width: int
    text_heads: int
    text_layers: int
    context_length: int = 77
    vocab_size: int = 49408
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    sot_token_id: int = 49406
    eot_token_id: int = 49407
    pad_token_id: int = 49407
    vision_mlp_width: int | None = None
    text_mlp_width: int | None = None

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}"
            )
        if self.vision_width % self.vision_heads:
            raise ValueError(
                f"vision_width {self.vision_width} is not divisible by "
                f"vision_heads {self.vision_heads}"
            )
        if self.text_width % self.text_heads:
            raise ValueError(
                f"text_width {self.text_width} is not divisible by text_heads {self.text_heads}"
            )
        if self.image_resolution % self.vision_patch_size:
            raise ValueError(
                f"image_resolution {self.image_resolution} is not divisible by "
                f"vision_patch_size {self.vision_patch_size}"
            )

    @property
    def grid_size(self) -> int:
        """Number of patches along each image side."""
        return self.image_resolution // self.vision_patch_size

    @property
    def num_image_tokens(self) -> int:
        """Class token plus patch tokens, before any prompt tokens."""
        return 1 + self.grid_size**2


def _select_positions(x: jax.Array, index: int | jax.Array) -> jax.Array:
    """Take one position per row: ``x [B, T, ...]`` -> ``[B, 1, ...]``."""
    if isinstance(index, int):
        return x[:, index : index + 1]
    index = index.reshape((-1,) + (1,) * (x.ndim - 1))
    return jnp.take_along_axis(x, index, axis=1)


class MultiHeadAttention(nn.Module):
    """Self-attention with a fused query-key-value projection."""

    num_heads: int
    qkv_std: float
    out_std: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        is_causal: bool = False,
        query_index: int | jax.Array | None = None,
    ) -> jax.Array:
        """Attend over ``x [B, T, W]``.

        Args:
            x: input tokens ``[B, T, W]``.
            is_causal: mask each query to the keys at or before its position.
            query_index: when given (an int, or ``[B]`` ints), only the query at that position of
                each row is computed and the output is ``[B, 1, W]``.

        Returns:
            ``[B, T, W]``, or ``[B, 1, W]`` when ``query_index`` is given.
        """
        batch, length, width = x.shape
        head_dim = width // self.num_heads
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)

        # [B, T, W] @ [W, 3W] -> [B, T, 3W]: q, k and v along the last axis, each split into heads.
        qkv = dense(3 * width, kernel_init=nn.initializers.normal(self.qkv_std), name="qkv")(x)
        qkv = qkv.reshape(batch, length, 3, self.num_heads, head_dim)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, N, H] each

        key_lengths = None
        if query_index is not None:
            query = _select_positions(query, query_index)  # [B, 1, N, H]
            if is_causal:
                # A causal query at position p attends to keys 0..p: a key-length mask.
                key_lengths = jnp.asarray(query_index, jnp.int32) + 1
                key_lengths = jnp.broadcast_to(key_lengths, (batch,))
                is_causal = False

        # softmax(q k^T / sqrt(H)) v per head: [B, Tq, N, H] x [B, T, N, H] -> [B, Tq, N, H].
        # The XLA implementation computes the logits and the softmax in float32.
        out = jax.nn.dot_product_attention(
            query, key, value, is_causal=is_causal, key_value_seq_lengths=key_lengths
        )
        out = out.reshape(batch, out.shape[1], width)
        # [B, Tq, W] @ [W, W] -> [B, Tq, W]
        return dense(width, kernel_init=nn.initializers.normal(self.out_std), name="out")(out)


class MLP(nn.Module):
    """Two dense layers with an activation between them."""

    hidden_width: int
    hidden_act: str
    fc1_std: float
    fc2_std: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        width = x.shape[-1]
        # [B, T, W] @ [W, M] -> [B, T, M]
        h = dense(self.hidden_width, kernel_init=nn.initializers.normal(self.fc1_std), name="fc1")(
            x
        )
        h = ACTIVATIONS[self.hidden_act](h)
        # [B, T, M] @ [M, W] -> [B, T, W]
        return dense(width, kernel_init=nn.initializers.normal(self.fc2_std), name="fc2")(h)


def block_init_stds(width: int, num_layers: int) -> dict[str, float]:
    """Return CLIP's init std of each kernel of a block; residual outputs shrink with depth."""
    out_std = width**-0.5 * (2 * num_layers) ** -0.5
    return {"qkv": width**-0.5, "out": out_std, "fc1": (2 * width) ** -0.5, "fc2": out_std}


class ResidualBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    num_heads: int
    mlp_width: int
    hidden_act: str
    num_layers: int
    causal: bool = False
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, pool_index: int | jax.Array | None = None) -> jax.Array:
        """Apply the block to ``x [B, T, W]``.

        With ``pool_index`` (an int, or ``[B]`` ints) only that position of each row is updated
        and returned, as ``[B, 1, W]``.
        """
        stds = block_init_stds(x.shape[-1], self.num_layers)
        layer_norm = functools.partial(
            nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32
        )

        h = layer_norm(name="ln_1")(x)
        h = MultiHeadAttention(
            self.num_heads, stds["qkv"], stds["out"], dtype=self.dtype, name="attn"
        )(h, is_causal=self.causal, query_index=pool_index)
        if pool_index is not None:
            x = _select_positions(x, pool_index)  # [B, 1, W]
        x = x + h

        h = layer_norm(name="ln_2")(x)
        h = MLP(
            self.mlp_width, self.hidden_act, stds["fc1"], stds["fc2"], dtype=self.dtype, name="mlp"
        )(h)
        return x + h


def _make_blocks(
    config: CLIPConfig, dtype: Dtype, *, tower: str, remat: bool
) -> list[ResidualBlock]:
    """Create a tower's blocks; with ``remat``, all but the last recompute their activations."""
    if tower == "visual":
        layers, heads, width = config.vision_layers, config.vision_heads, config.vision_width
        mlp_width = config.vision_mlp_width
    else:
        layers, heads, width = config.text_layers, config.text_heads, config.text_width
        mlp_width = config.text_mlp_width
    # The last block pools to one token per row, so its activations are small.
    block_types = [nn.remat(ResidualBlock) if remat else ResidualBlock] * (layers - 1)
    return [
        block_type(
            num_heads=heads,
            mlp_width=mlp_width or 4 * width,
            hidden_act=config.hidden_act,
            num_layers=layers,
            causal=tower == "text",
            layer_norm_eps=config.layer_norm_eps,
            dtype=dtype,
        )
        for block_type in block_types + [ResidualBlock]
    ]


def _check_deep_prompts(deep_prompts: jax.Array, *, layers: int, width: int, tower: str) -> None:
    if deep_prompts.ndim != 3 or deep_prompts.shape[-1] != width:
        raise ValueError(
            f"{tower} deep_prompts must be [depth - 1, n_ctx, {width}], got {deep_prompts.shape}"
        )
    if deep_prompts.shape[0] > layers - 1:
        raise ValueError(
            f"{tower} deep_prompts has {deep_prompts.shape[0]} layers of prompts, but a tower of "
            f"{layers} blocks takes at most {layers - 1} (blocks 1 to {layers - 1})"
        )


class VisionTransformer(nn.Module):
    """CLIP's ViT image tower."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        c = self.config
        scale = c.vision_width**-0.5
        self.patch_embedding = nn.Conv(
            c.vision_width,
            kernel_size=(c.vision_patch_size, c.vision_patch_size),
            strides=(c.vision_patch_size, c.vision_patch_size),
            padding="VALID",
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
        )
        normal = nn.initializers.normal(scale)
        self.class_embedding = self.param("class_embedding", normal, (c.vision_width,))
        self.positional_embedding = self.param(
            "positional_embedding", normal, (c.num_image_tokens, c.vision_width)
        )
        self.ln_pre = nn.LayerNorm(
            epsilon=c.layer_norm_eps, dtype=self.dtype, param_dtype=jnp.float32
        )
        self.blocks = _make_blocks(c, self.dtype, tower="visual", remat=self.remat)
        self.ln_post = nn.LayerNorm(epsilon=c.layer_norm_eps, param_dtype=jnp.float32)
        self.proj = self.param("proj", normal, (c.vision_width, c.embed_dim))

    def __call__(
        self,
        images: jax.Array,
        shallow_prompts: jax.Array | None = None,
        deep_prompts: jax.Array | None = None,
    ) -> jax.Array:
        c = self.config
        size = (c.image_resolution, c.image_resolution, 3)
        if images.ndim != 4 or images.shape[1:] != size:
            raise ValueError(f"images must be [B, {size[0]}, {size[1]}, 3], got {images.shape}")
        if deep_prompts is not None:
            _check_deep_prompts(
                deep_prompts, layers=c.vision_layers, width=c.vision_width, tower="image"
            )
            if shallow_prompts is None or shallow_prompts.shape[0] != deep_prompts.shape[1]:
                raise ValueError(
                    "image deep_prompts [depth - 1, n_ctx, W] overwrite the n_ctx shallow prompt "
                    f"tokens, so shallow_prompts must be [n_ctx, W]; got deep_prompts "
                    f"{deep_prompts.shape} and shallow_prompts "
                    f"{None if shallow_prompts is None else shallow_prompts.shape}"
                )
        if shallow_prompts is not None and (
            shallow_prompts.ndim != 2 or shallow_prompts.shape[1] != c.vision_width
        ):
            raise ValueError(
                f"shallow_prompts must be [n_ctx, {c.vision_width}], got {shallow_prompts.shape}"
            )
        batch = images.shape[0]

        # Patch embedding: [B, R, R, 3] -> [B, G, G, W] -> [B, G*G, W].
        x = self.patch_embedding(images.astype(self.dtype))
        x = x.reshape(batch, -1, c.vision_width).astype(jnp.float32)
        class_token = jnp.broadcast_to(self.class_embedding, (batch, 1, c.vision_width))
        x = jnp.concatenate([class_token, x], axis=1) + self.positional_embedding
        if shallow_prompts is not None:
            prompts = jnp.broadcast_to(
                shallow_prompts.astype(jnp.float32), (batch,) + shallow_prompts.shape
            )
            x = jnp.concatenate([x, prompts], axis=1)  # [B, 1 + G*G + n_ctx, W]
        x = self.ln_pre(x.astype(self.dtype))

        num_deep = 0 if deep_prompts is None else deep_prompts.shape[0]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if 1 <= i <= num_deep:
                n_ctx = deep_prompts.shape[1]
                x = x.at[:, -n_ctx:].set(deep_prompts[i - 1].astype(self.dtype))
            x = block(x, 0 if i == last else None)

        x = self.ln_post(x[:, 0].astype(jnp.float32))
        return x @ self.proj  # [B, Wv] @ [Wv, D] -> [B, D]


class TextTransformer(nn.Module):
    """CLIP's causal text tower."""

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        c = self.config
        self.token_embedding = nn.Embed(
            c.vocab_size,
            c.text_width,
            embedding_init=nn.initializers.normal(TOKEN_EMBEDDING_STD),
            param_dtype=jnp.float32,
        )
        self.positional_embedding = self.param(
            "positional_embedding",
            nn.initializers.normal(TEXT_POSITION_STD),
            (c.context_length, c.text_width),
        )
        self.blocks = _make_blocks(c, self.dtype, tower="text", remat=self.remat)
        self.ln_final = nn.LayerNorm(epsilon=c.layer_norm_eps, param_dtype=jnp.float32)
        self.proj = self.param(
            "proj", nn.initializers.normal(c.text_width**-0.5), (c.text_width, c.embed_dim)
        )

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """Look up token embeddings: int ``[N, L]`` -> float32 ``[N, L, Wt]``."""
        return self.token_embedding(token_ids)

    def encode_embeddings(
        self,
        embeddings: jax.Array,
        eot_positions: jax.Array,
        deep_prompts: jax.Array | None = None,
    ) -> jax.Array:
        """Encode token embeddings ``[N, L, Wt]`` and pool at ``eot_positions [N]``."""
        c = self.config
        if (
            embeddings.ndim != 3
            or embeddings.shape[2] != c.text_width
            or not 1 <= embeddings.shape[1] <= c.context_length
        ):
            raise ValueError(
                f"embeddings must be [N, L, {c.text_width}] with L <= {c.context_length}, got "
                f"{embeddings.shape}"
            )
        if eot_positions.shape != embeddings.shape[:1]:
            raise ValueError(
                f"eot_positions must be [{embeddings.shape[0]}] to match embeddings "
                f"{embeddings.shape}, got {eot_positions.shape}"
            )
        if deep_prompts is not None:
            _check_deep_prompts(
                deep_prompts, layers=c.text_layers, width=c.text_width, tower="text"
            )
        eot_positions = eot_positions.astype(jnp.int32)

        # Attention is causal, so a sequence cut after its last EOT pools exactly as the full
        # context does. Its positions are those of the first L tokens.
        length = embeddings.shape[1]
        x = embeddings.astype(jnp.float32) + self.positional_embedding[:length]
        x = x.astype(self.dtype)

        num_deep = 0 if deep_prompts is None else deep_prompts.shape[0]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if 1 <= i <= num_deep:
                n_ctx = deep_prompts.shape[1]
                x = x.at[:, 1 : 1 + n_ctx].set(deep_prompts[i - 1].astype(self.dtype))
            x = block(x, eot_positions if i == last else None)

        x = self.ln_final(x[:, 0].astype(jnp.float32))
        return x @ self.proj  # [N, Wt] @ [Wt, D] -> [N, D]

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        """Encode int token ids ``[N, L]``; each row pools at its first EOT token."""
        eot_positions = jnp.argmax(token_ids == self.config.eot_token_id, axis=-1)
        return self.encode_embeddings(self.embed_tokens(token_ids), eot_positions)


class CLIP(nn.Module):
    """CLIP with a ViT image tower and a causal text tower, both with MaPLe prompt slots.

    Parameters are ``{'visual': ..., 'text': ..., 'logit_scale': ()}``, where ``logit_scale`` is
    the log of the logit multiplier. Call the encoders through ``apply(..., method=...)``.

    Attributes:
        config: model sizes and token ids.
        dtype: activation dtype, float32 or bfloat16. Parameters and returned features are
            float32 either way.
        remat: recompute each block's activations in the backward pass instead of storing
            them (``flax.linen.remat``), trading compute for memory when gradients flow through
            the towers, as they do for prompts.
    """

    config: CLIPConfig
    dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        self.visual = VisionTransformer(self.config, self.dtype, self.remat)
        self.text = TextTransformer(self.config, self.dtype, self.remat)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(LOGIT_SCALE_INIT), ())

    def __call__(self, images: jax.Array, token_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Encode images and texts; used by ``init`` to create every parameter.

        Returns:
            ``(image_features [B, D], text_features [N, D])``, float32, not normalised.
        """
        return self.encode_image(images), self.encode_text(token_ids)

    def encode_image(
        self,
        images: jax.Array,
        shallow_prompts: jax.Array | None = None,
        deep_prompts: jax.Array | None = None,
    ) -> jax.Array:
        """Encode images, optionally with MaPLe image prompts.

        Args:
            images: ``[B, H, W, 3]`` CLIP-normalised images, H = W = ``config.image_resolution``.
            shallow_prompts: ``[n_ctx, Wv]`` tokens appended after the patch tokens.
            deep_prompts: ``[depth - 1, n_ctx, Wv]``; entry ``i - 1`` overwrites the prompt
                tokens before block ``i``. Requires ``shallow_prompts``.

        Returns:
            ``[B, D]`` float32 image features, not normalised.
        """
        return self.visual(images, shallow_prompts, deep_prompts)

    def embed_tokens(self, token_ids: jax.Array) -> jax.Array:
        """Look up token embeddings: int ``[N, L]`` -> float32 ``[N, L, Wt]``."""
        return self.text.embed_tokens(token_ids)

    def encode_text_embeddings(
        self,
        embeddings: jax.Array,
        eot_positions: jax.Array,
        deep_prompts: jax.Array | None = None,
    ) -> jax.Array:
        """Encode token embeddings, optionally with MaPLe deep text prompts.

        Args:
            embeddings: ``[N, L, Wt]`` token embeddings, L at most ``config.context_length``
                and past every EOT position.
            eot_positions: ``[N]`` int position of the EOT token of each row, where the
                features are pooled.
            deep_prompts: ``[depth - 1, n_ctx, Wt]``; entry ``i - 1`` overwrites positions
                ``1 .. n_ctx`` before block ``i``.

        Returns:
            ``[N, D]`` float32 text features, not normalised.
        """
        return self.text.encode_embeddings(embeddings, eot_positions, deep_prompts)

    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        """Encode int token ids ``[N, L]`` pooled at the first EOT token: ``[N, D]`` float32.

        A row without an EOT token pools at position 0.
        """
        return self.text(token_ids)


def param_shapes(config: CLIPConfig) -> dict[str, Any]:
    """Return the ``CLIP(config)`` parameter tree with ``jax.ShapeDtypeStruct`` leaves."""
    images = jax.ShapeDtypeStruct(
        (1, config.image_resolution, config.image_resolution, 3), jnp.float32
    )
    token_ids = jax.ShapeDtypeStruct((1, config.context_length), jnp.int32)
    variables = jax.eval_shape(CLIP(config).init, jax.random.key(0), images, token_ids)
    return variables["params"]


def _init_std(config: CLIPConfig, keys: list[str], shape: tuple[int, ...]) -> float:
    """Return the init std of the normally distributed parameter at ``keys``."""
    tower, name = keys[0], keys[-1]
    width = config.vision_width if tower == "visual" else config.text_width
    layers = config.vision_layers if tower == "visual" else config.text_layers
    if len(keys) >= 3 and keys[1].startswith("blocks_"):
        return block_init_stds(width, layers)[keys[-2]]
    if name == "embedding":
        return TOKEN_EMBEDDING_STD
    if tower == "text" and name == "positional_embedding":
        return TEXT_POSITION_STD
    if keys[-2:] == ["patch_embedding", "kernel"]:
        return float(np.prod(shape[:-1])) ** -0.5  # LeCun normal over the patch pixels
    return width**-0.5  # class and position embeddings of the image tower, projections


def init_params(config: CLIPConfig, *, seed: int = 0) -> dict[str, Any]:
    """Sample ``CLIP(config)`` parameters with numpy, following the module's initialisers.

    Kernels and embeddings are normal with CLIP's standard deviations, LayerNorm scales are 1,
    biases 0 and the logit scale ``log(1 / 0.07)``. Sampling with numpy avoids compiling
    ``CLIP.init``, which takes tens of seconds for ViT-B/32 on a CPU, and gives the same values
    on every platform for a given seed. The patch kernel is plain normal where ``CLIP.init``
    uses a truncated normal of the same scale.

    Returns:
        The inner parameter dict of ``CLIP(config)``, float32 jax arrays.
    """
    rng = np.random.default_rng(seed)

    def sample(path, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        keys = [entry.key for entry in path]
        if keys == ["logit_scale"]:
            value = np.full(leaf.shape, LOGIT_SCALE_INIT, np.float32)
        elif keys[-1] == "scale":
            value = np.ones(leaf.shape, np.float32)
        elif keys[-1] == "bias":
            value = np.zeros(leaf.shape, np.float32)
        else:
            std = _init_std(config, keys, leaf.shape)
            value = rng.standard_normal(leaf.shape, dtype=np.float32)
            value *= np.float32(std)
        return jnp.asarray(value)

    return jax.tree_util.tree_map_with_path(sample, param_shapes(config))
