"""The circular parameter-history buffer against a naive list of snapshots."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asgd_jax import history


def _params(i):
    return {"a": jnp.full((3,), float(i)), "b": {"c": jnp.full((2, 2), -float(i), jnp.bfloat16)}}


@pytest.mark.parametrize("num_slots", [1, 3, 8])
def test_matches_naive_reference(num_slots):
    rng = np.random.default_rng(0)  # test-side randomness only: drives the reference check.
    buffer = history.init(_params(0), num_slots)
    written = [_params(0)]
    write = jax.jit(history.write)
    read_lagged = jax.jit(history.read_lagged)
    for step in range(25):
        if step > 0:
            buffer = write(buffer, _params(step), step)
            written.append(_params(step))
        # Lags up to K − 1 are exact; a lag past snapshot 0 (possible only before the buffer
        # wraps, since lag < K) must return W_0.
        for lag in rng.integers(0, num_slots, size=6).tolist():
            got = read_lagged(buffer, step, lag)
            chex.assert_trees_all_equal(got, written[max(step - lag, 0)])


def test_shapes_and_dtypes():
    buffer = history.init(_params(1), 4)
    chex.assert_shape(buffer["a"], (4, 3))
    chex.assert_shape(buffer["b"]["c"], (4, 2, 2))
    assert buffer["b"]["c"].dtype == jnp.bfloat16
    low = history.init(_params(1), 4, dtype=jnp.bfloat16)
    assert low["a"].dtype == jnp.bfloat16
    assert history.size(buffer) == 4


def test_init_on_abstract_shapes():
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params(0))
    out = jax.eval_shape(lambda p: history.init(p, 5), abstract)
    assert out["a"].shape == (5, 3) and out["b"]["c"].dtype == jnp.bfloat16


def test_init_does_not_alias_params():
    params = {"w": jnp.ones((4,))}
    buffer = history.init(params, 1)
    assert buffer["w"].unsafe_buffer_pointer() != params["w"].unsafe_buffer_pointer()


def test_write_is_in_place_under_donation():
    # A donated buffer must be reused: the write lowers to an in-place dynamic-update-slice.
    buffer = history.init({"w": jnp.zeros((64, 64))}, 16)
    write = jax.jit(history.write, donate_argnums=0)
    pointer = buffer["w"].unsafe_buffer_pointer()
    buffer = write(buffer, {"w": jnp.ones((64, 64))}, 3)
    assert buffer["w"].unsafe_buffer_pointer() == pointer
    np.testing.assert_array_equal(buffer["w"][3], 1.0)
    np.testing.assert_array_equal(buffer["w"][2], 0.0)


def test_vmap():
    buffers = jax.vmap(lambda x: history.init({"w": x}, 3))(jnp.arange(4.0)[:, None])
    buffers = jax.vmap(history.write, in_axes=(0, 0, None))(
        buffers, {"w": 10 + jnp.arange(4.0)[:, None]}, 1
    )
    got = jax.vmap(history.read, in_axes=(0, None))(buffers, 1)
    np.testing.assert_array_equal(got["w"][:, 0], 10 + np.arange(4.0))


def test_bad_size():
    with pytest.raises(ValueError, match="num_slots"):
        history.init({"w": jnp.ones(2)}, 0)


def test_vmapped_write_with_per_run_slots():
    # The custom batching rule (one in-place update per run) against the unbatched write.
    buffers = jax.vmap(lambda x: history.init({"w": x}, 4))(jnp.arange(3.0)[:, None])
    steps = jnp.array([0, 2, 3])
    new = {"w": 10 + jnp.arange(3.0)[:, None]}
    batched = jax.jit(jax.vmap(history.write))(buffers, new, steps)
    for run in range(3):
        single = history.write(
            jax.tree.map(lambda b: b[run], buffers), {"w": new["w"][run]}, steps[run]
        )
        chex.assert_trees_all_equal(jax.tree.map(lambda b: b[run], batched), single)
