"""Delay models: support, statistics, determinism, replay and argument validation."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asgd_jax import delays

N = 20_000


def _draw(model, seed=0, num=N):
    sample = jax.jit(delays.sample, static_argnums=(0, 2))
    return np.asarray(sample(model, jax.random.key(seed), num))


def test_constant():
    taus = _draw(delays.constant(3), num=50)
    np.testing.assert_array_equal(taus, 3)
    assert delays.constant(3).max_delay == 3
    assert delays.constant(0).mean == 0.0


def test_uniform_support_and_moments():
    model = delays.uniform(2, 7)
    taus = _draw(model)
    assert taus.min() == 2 and taus.max() == 7
    assert set(np.unique(taus)) == set(range(2, 8))
    assert abs(taus.mean() - 4.5) < 0.05
    # Each value has probability 1/6: a loose chi-square bound.
    counts = np.bincount(taus, minlength=8)[2:]
    expected = N / 6
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 25.0  # 5 dof: P(chi2 > 25) ≈ 1e-4.


def test_geometric_law():
    model = delays.geometric(mean=3.0, max_delay=60)
    taus = _draw(model)
    assert taus.min() >= 0 and taus.max() <= 60
    assert abs(taus.mean() - model.mean) < 0.1
    assert abs(model.mean - 3.0) < 1e-3  # truncation at 60 is negligible for mean 3.
    # P(τ = 0) = p = 1/4.
    assert abs((taus == 0).mean() - 0.25) < 0.015


def test_poisson_law():
    model = delays.poisson(mean=5.0, max_delay=30)
    taus = _draw(model, seed=3)
    assert abs(taus.mean() - 5.0) < 0.08
    assert abs(taus.var() - 5.0) < 0.3


def test_truncated_mean_is_exact():
    model = delays.geometric(mean=4.0, max_delay=4)
    taus = _draw(model, seed=1)
    assert taus.max() <= 4
    assert abs(taus.mean() - model.mean) < 0.05
    assert model.mean < 4.0


def test_round_robin_exact():
    taus = _draw(delays.round_robin(4), num=12)
    np.testing.assert_array_equal(taus, [0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3, 3])
    np.testing.assert_array_equal(_draw(delays.round_robin(1), num=5), 0)


def test_trace_replays_and_wraps():
    model = delays.trace([3, 0, 2])
    assert model.max_delay == 3
    np.testing.assert_array_equal(_draw(model, num=7), [3, 0, 2, 3, 0, 2, 3])
    hold = delays.trace([3, 0, 2], on_exhausted="hold")
    np.testing.assert_array_equal(_draw(hold, num=5), [3, 0, 2, 2, 2])


def test_trace_counts_draws_past_its_end():
    model = delays.trace([1, 2])
    state = model.init(jax.random.key(0))
    for _ in range(2):
        _, state = model.next(state)
    assert int(state.exhausted) == 0
    _, state = model.next(state)
    assert int(state.exhausted) == 1


def test_trace_accepts_objects_with_staleness():
    class Trace:
        staleness = np.array([0, 1, 1])

    np.testing.assert_array_equal(_draw(delays.trace(Trace()), num=3), [0, 1, 1])
    np.testing.assert_array_equal(_draw(delays.trace({"staleness": [2, 0]}), num=2), [2, 0])


@pytest.mark.parametrize(
    "model",
    [delays.uniform(0, 9), delays.geometric(2.0, 20), delays.poisson(3.0, 12)],
    ids=["uniform", "geometric", "poisson"],
)
def test_same_key_same_sequence_and_keys_differ(model):
    a, b, c = _draw(model, 5, 500), _draw(model, 5, 500), _draw(model, 6, 500)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_jit_and_eager_agree():
    model = delays.uniform(0, 5)
    state = model.init(jax.random.key(2))
    eager = []
    for _ in range(20):
        tau, state = model.next(state)
        eager.append(int(tau))
    np.testing.assert_array_equal(_draw(model, 2, 20), eager)


def test_vmap_over_keys_equals_separate_runs():
    model = delays.poisson(2.0, 10)
    keys = jax.random.split(jax.random.key(0), 4)
    batched = jax.vmap(lambda k: delays.sample(model, k, 64))(keys)
    for i in range(4):
        np.testing.assert_array_equal(batched[i], delays.sample(model, keys[i], 64))


def test_raw_and_typed_keys():
    model = delays.uniform(0, 5)
    typed = delays.sample(model, jax.random.key(1), 32)
    raw = delays.sample(model, jax.random.PRNGKey(1), 32)
    np.testing.assert_array_equal(typed, raw)


def test_uniform01_range_and_determinism():
    seed = delays.key_words(jax.random.key(0))
    u = delays.uniform01(seed, jnp.arange(10_000))
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    chex.assert_trees_all_equal(u, delays.uniform01(seed, jnp.arange(10_000)))
    other = delays.uniform01(seed, jnp.arange(10_000), stream=1)
    assert abs(float(jnp.corrcoef(u, other)[0, 1])) < 0.05


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: delays.constant(-1), ValueError, "tau"),
        (lambda: delays.constant(1.5), TypeError, "tau"),
        (lambda: delays.constant(True), TypeError, "tau"),
        (lambda: delays.uniform(5, 2), ValueError, "low"),
        (lambda: delays.uniform(-1, 2), ValueError, "low"),
        (lambda: delays.geometric(5.0, 3), ValueError, "max_delay"),
        (lambda: delays.geometric(-1.0, 3), ValueError, "mean"),
        (lambda: delays.poisson(float("nan"), 3), ValueError, "mean"),
        (lambda: delays.round_robin(0), ValueError, "num_workers"),
        (lambda: delays.trace([]), ValueError, "empty"),
        (lambda: delays.trace([1, -2]), ValueError, "taus"),
        (lambda: delays.trace([1.5]), TypeError, "taus"),
        (lambda: delays.trace([[1, 2]]), ValueError, "one-dimensional"),
        (lambda: delays.trace([4, 1], max_delay=3), ValueError, "max_delay"),
        (lambda: delays.trace([1], on_exhausted="error"), ValueError, "on_exhausted"),
        (lambda: delays.categorical([0.0, 0.0]), ValueError, "pmf"),
        (lambda: delays.as_delay_model("fast"), TypeError, "delay"),
    ],
)
def test_bad_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
