"""Residual adapters on CLIP features: ``x + ratio · fc2(relu(fc1(x)))``.

CAP trains three of them next to the prompts: ``'text'`` on class text features,
``'visual'`` on the image features of the main branch (labeled images and main
samples) and ``'pseudo'`` on the strong view of unlabeled images. Evaluation
uses none.

Parameters are plain dicts, so they sit in any optax or Orbax pytree::

    {'fc1': {'kernel': [D, H], 'bias': [H]}, 'fc2': {'kernel': [H, D], 'bias': [D]}}

Kernels are ``[in, out]`` as in Flax; PyTorch ``nn.Linear`` weights are
``[out, in]`` and are transposed by :func:`adapters_from_state_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "adapters_from_state_dict",
    "adapters_to_state_dict",
    "apply_adapter",
    "init_adapter_params",
    "init_adapters",
]

# The PyTorch CAP code names its adapters like this; fc.0 and fc.2 are the two
# Linear layers of nn.Sequential(Linear, ReLU, Linear).
_REFERENCE_PREFIXES = {
    "text": "cross_adapter.textual_adapter.fc",
    "visual": "cross_adapter.visual_adapter.fc",
    "pseudo": "pseudo_adapter.fc",
}
_REFERENCE_LAYERS = {"fc1": "0", "fc2": "2"}
_BRANCHES = ("text", "visual", "pseudo")


def _init_linear(rng: jax.Array, fan_in: int, fan_out: int) -> dict:
    # PyTorch's nn.Linear default: kaiming_uniform(a=sqrt(5)) for the weight and
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for the bias, both with bound 1/sqrt(fan_in).
    bound = 1.0 / np.sqrt(fan_in)
    kernel_rng, bias_rng = jax.random.split(rng)
    return {
        "kernel": jax.random.uniform(kernel_rng, (fan_in, fan_out), jnp.float32, -bound, bound),
        "bias": jax.random.uniform(bias_rng, (fan_out,), jnp.float32, -bound, bound),
    }


def init_adapter_params(rng: jax.Array, dim: int, *, hidden: int = 128) -> dict:
    """Initialise one adapter as PyTorch's ``nn.Linear`` default does.

    Args:
      rng: a ``jax.random.key``.
      dim: feature size ``D`` (512 for ViT-B, 768 for ViT-L/14).
      hidden: hidden size ``H`` (128 in the reference).

    Returns:
      ``{'fc1': {'kernel': [D, H], 'bias': [H]}, 'fc2': {'kernel': [H, D], 'bias': [D]}}``,
      float32.
    """
    if dim < 1 or hidden < 1:
        raise ValueError(f"dim and hidden must be positive, got dim={dim}, hidden={hidden}")
    rng1, rng2 = jax.random.split(rng)
    return {"fc1": _init_linear(rng1, dim, hidden), "fc2": _init_linear(rng2, hidden, dim)}


def apply_adapter(params: Mapping, x, *, ratio: float = 0.01) -> jax.Array:
    """Apply a residual adapter: ``x + ratio · (relu(x W1 + b1) W2 + b2)``.

    The computation runs in float32 whatever the dtype of ``x``, because the
    1% residual would be mostly rounded away in bfloat16 (8 significant bits).

    Args:
      params: adapter parameters (see :func:`init_adapter_params`).
      x: ``[..., D]`` features (CLIP outputs before normalisation).
      ratio: residual weight, 0.01 in CAP.

    Returns:
      float32 ``[..., D]``.
    """
    x = jnp.asarray(x)
    dim = params["fc1"]["kernel"].shape[0]
    if x.shape[-1:] != (dim,):
        raise ValueError(f"x must have shape [..., {dim}] to match the adapter, got {x.shape}")
    x = x.astype(jnp.float32)
    hidden = jax.nn.relu(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])  # [.., D] -> [.., H]
    return x + ratio * (hidden @ params["fc2"]["kernel"] + params["fc2"]["bias"])  # -> [.., D]


def init_adapters(rng: jax.Array, dim: int, *, hidden: int = 128) -> dict:
    """Initialise the three CAP adapters.

    Returns:
      ``{'text': ..., 'visual': ..., 'pseudo': ...}``, each as from
      :func:`init_adapter_params` with its own key.
    """
    rngs = jax.random.split(rng, len(_BRANCHES))
    return {
        branch: init_adapter_params(key, dim, hidden=hidden) for branch, key in zip(_BRANCHES, rngs)
    }


def _strip_prefix(state_dict: Mapping, prefix: str) -> dict:
    if prefix:
        return {
            name[len(prefix) :]: value
            for name, value in state_dict.items()
            if name.startswith(prefix)
        }
    # Accelerate and DistributedDataParallel save wrapped modules under "module.".
    if state_dict and all(name.startswith("module.") for name in state_dict):
        return {name[len("module.") :]: value for name, value in state_dict.items()}
    return dict(state_dict)


def adapters_from_state_dict(state_dict: Mapping, *, prefix: str = "") -> dict:
    """Read the three adapters from a PyTorch CAP state dict.

    Reads ``cross_adapter.textual_adapter.fc.{0,2}.{weight,bias}`` into
    ``'text'``, ``cross_adapter.visual_adapter.*`` into ``'visual'`` and
    ``pseudo_adapter.*`` into ``'pseudo'``, transposing the ``[out, in]``
    weights into ``[in, out]`` kernels. Other names are ignored.

    Args:
      state_dict: name to array (numpy arrays or CPU torch tensors).
      prefix: a leading name part to strip, e.g. ``"debias_module."``. When
        empty and every name starts with ``"module."``, that is stripped.

    Returns:
      ``{'text', 'visual', 'pseudo'}`` adapter parameters, float32 numpy.
    """
    arrays = _strip_prefix(state_dict, prefix)
    adapters = {}
    for branch, base in _REFERENCE_PREFIXES.items():
        params = {}
        for layer, index in _REFERENCE_LAYERS.items():
            weight_name = f"{base}.{index}.weight"
            bias_name = f"{base}.{index}.bias"
            missing = [name for name in (weight_name, bias_name) if name not in arrays]
            if missing:
                raise KeyError(
                    f"state dict has no {missing} (prefix {prefix!r}); it contains "
                    f"{sorted(arrays)[:8]}..."
                )
            weight = np.asarray(arrays[weight_name], dtype=np.float32)
            bias = np.asarray(arrays[bias_name], dtype=np.float32)
            if weight.ndim != 2 or bias.shape != weight.shape[:1]:
                raise ValueError(
                    f"{weight_name} {weight.shape} and {bias_name} {bias.shape} do not form "
                    "a Linear layer ([out, in] and [out])"
                )
            params[layer] = {"kernel": weight.T.copy(), "bias": bias}
        if params["fc1"]["kernel"].shape[::-1] != params["fc2"]["kernel"].shape:
            raise ValueError(
                f"{base}: fc.0 kernel {params['fc1']['kernel'].shape} and fc.2 kernel "
                f"{params['fc2']['kernel'].shape} must be [D, H] and [H, D]"
            )
        adapters[branch] = params
    return adapters


def adapters_to_state_dict(adapters: Mapping) -> dict:
    """Write the three adapters under the PyTorch CAP names (inverse of the reader).

    Returns:
      name to float32 numpy array, weights ``[out, in]``.
    """
    state_dict = {}
    for branch, base in _REFERENCE_PREFIXES.items():
        for layer, index in _REFERENCE_LAYERS.items():
            params = adapters[branch][layer]
            state_dict[f"{base}.{index}.weight"] = np.asarray(params["kernel"], np.float32).T.copy()
            state_dict[f"{base}.{index}.bias"] = np.asarray(params["bias"], np.float32)
    return state_dict
