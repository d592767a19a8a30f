import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cap_jax.adapters import (
    adapters_from_state_dict,
    adapters_to_state_dict,
    apply_adapter,
    init_adapter_params,
    init_adapters,
)


def test_init_shapes_and_torch_bounds():
    params = init_adapters(jax.random.key(0), 32, hidden=8)
    assert set(params) == {"text", "visual", "pseudo"}
    for branch in params.values():
        assert branch["fc1"]["kernel"].shape == (32, 8)
        assert branch["fc1"]["bias"].shape == (8,)
        assert branch["fc2"]["kernel"].shape == (8, 32)
        assert branch["fc2"]["bias"].shape == (32,)
        # torch.nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        assert np.abs(branch["fc1"]["kernel"]).max() <= 32**-0.5
        assert np.abs(branch["fc2"]["kernel"]).max() <= 8**-0.5
    assert not np.allclose(params["text"]["fc1"]["kernel"], params["visual"]["fc1"]["kernel"])


def test_apply_matches_torch_module():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 4), torch.nn.ReLU(), torch.nn.Linear(4, 16))
    state = {f"pseudo_adapter.fc.{k}": v for k, v in mlp.state_dict().items()}
    for name in ("cross_adapter.textual_adapter", "cross_adapter.visual_adapter"):
        state.update({f"{name}.fc.{k}": v for k, v in mlp.state_dict().items()})
    params = adapters_from_state_dict(state)
    x = torch.randn(5, 16)
    expected = (x + 0.01 * mlp(x)).detach().numpy()
    result = jax.jit(apply_adapter)(params["pseudo"], x.numpy())
    np.testing.assert_allclose(result, expected, atol=1e-6)


def test_state_dict_round_trip_and_module_prefix():
    params = init_adapters(jax.random.key(1), 12, hidden=3)
    state = adapters_to_state_dict(params)
    assert state["cross_adapter.textual_adapter.fc.0.weight"].shape == (3, 12)
    wrapped = {f"module.{k}": v for k, v in state.items()}
    for source in (state, wrapped):
        back = adapters_from_state_dict(source)
        for branch in params:
            for layer in ("fc1", "fc2"):
                for leaf in ("kernel", "bias"):
                    np.testing.assert_array_equal(
                        back[branch][layer][leaf], params[branch][layer][leaf]
                    )
    prefixed = {f"debias_module.{k}": v for k, v in state.items()}
    back = adapters_from_state_dict(prefixed, prefix="debias_module.")
    assert back["text"]["fc1"]["kernel"].shape == (12, 3)


def test_state_dict_missing_name():
    state = adapters_to_state_dict(init_adapters(jax.random.key(2), 4, hidden=2))
    del state["pseudo_adapter.fc.2.bias"]
    with pytest.raises(KeyError, match="pseudo_adapter.fc.2.bias"):
        adapters_from_state_dict(state)


def test_zero_adapter_is_identity_and_float32():
    params = jax.tree.map(jnp.zeros_like, init_adapter_params(jax.random.key(3), 6, hidden=2))
    x = jnp.arange(12.0).reshape(2, 6).astype(jnp.bfloat16)
    out = apply_adapter(params, x)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, x.astype(jnp.float32))


def test_apply_rejects_wrong_feature_size():
    params = init_adapter_params(jax.random.key(4), 6, hidden=2)
    with pytest.raises(ValueError, match=r"\[\.\.\., 6\]"):
        apply_adapter(params, jnp.zeros((2, 5)))
