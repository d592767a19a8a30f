import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cap_jax.schedules import learning_rate_schedule


def test_schedule_warmup_peak_and_end():
    schedule = learning_rate_schedule(0.01, warmup_steps=50, total_steps=2500)
    values = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(2501)))
    np.testing.assert_allclose(values[:51], 0.01 * np.arange(51) / 50, atol=1e-9)
    middle = 50 + (2500 - 50) // 2
    np.testing.assert_allclose(values[middle], 0.005, atol=1e-7)
    assert values[2500] == pytest.approx(0.0, abs=1e-9)
    assert np.all(np.diff(values[50:]) <= 1e-9)


def test_schedule_rejects_bad_steps():
    with pytest.raises(ValueError, match="warmup_steps"):
        learning_rate_schedule(0.01, warmup_steps=10, total_steps=10)
