"""History integrity: after update t every slot s holds exactly W_s, whatever the updates hold.

Non-finite gradients are injected at chosen steps and skipped three ways (by the caller, by
``optax.apply_if_finite`` around ``stale`` and inside it); each later gradient must be taken
at exactly the W_s a naive reference says. The ordering that keeps the buffer in place under
donation is checked on the optimized HLO: no copy of the buffer or of the parameters.
"""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import asgd_jax as asgd
from asgd_jax import history as history_lib

K = 3
NUM_STEPS = 14
# step -> which gradient elements become NaN (all of a leaf, only a later element, inf).
POISON = {2: ("w", slice(None)), 5: ("w", slice(1, 2)), 6: ("b", slice(None)), 9: ("w", 0)}


def _loss(params):
    return jnp.sum((params["w"] - jnp.arange(4.0)) ** 2) + jnp.sum(params["b"] ** 2 * 3.0)


def _params():
    return {"w": jnp.array([0.5, -1.0, 2.0, 0.25]), "b": jnp.array([1.0, -2.0])}


def _poisoned_grad(params, t):
    grads = jax.grad(_loss)(params)
    if t in POISON:
        name, where = POISON[t]
        bad = jnp.inf if t == 9 else jnp.nan
        grads = dict(grads, **{name: grads[name].at[where].set(bad)})
    return grads


def _finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def _check_slots(state, snapshots):
    """Every slot s of the buffer holds W_s for the K most recent snapshots s."""
    s = asgd.transforms.find_stale_state(state)
    t = int(s.step)
    for index in range(max(t - K, 0), t):
        chex.assert_trees_all_equal(history_lib.read(s.history, index), snapshots[index])


@pytest.mark.parametrize("mode", ["caller", "outside", "inside"])
def test_skipped_nonfinite_steps_keep_every_snapshot_exact(mode):
    delay = asgd.delays.uniform(0, K)
    if mode == "inside":
        tx = asgd.stale(optax.apply_if_finite(optax.sgd(0.05), 100), delay, seed=3)
    elif mode == "outside":
        tx = optax.apply_if_finite(asgd.stale(optax.sgd(0.05), delay, seed=3), 100)
    else:
        tx = asgd.stale(optax.sgd(0.05), delay, seed=3)
    update = jax.jit(tx.update)
    params = _params()
    state = tx.init(params)
    snapshots = []  # snapshots[s] = W_s, the parameters before the s-th counted update.
    for t in range(NUM_STEPS):
        s = asgd.transforms.find_stale_state(state)
        step, tau = int(s.step), int(asgd.staleness(state))
        if len(snapshots) == step:
            snapshots.append(params)
        want = snapshots[max(step - tau, 0)] if tau else params
        at = asgd.stale_params(state, params)
        chex.assert_trees_all_equal(at, want)
        grads = _poisoned_grad(at, t)
        updates, new_state = update(grads, state, params)
        if mode == "caller" and not _finite(grads):
            state = new_state  # The step counts, the parameters stay: W_{t+1} = W_t.
        else:
            params, state = optax.apply_updates(params, updates), new_state
        _check_slots(state, snapshots + [params])
    s = asgd.transforms.find_stale_state(state)
    skipped = sum(1 for t in POISON if t < NUM_STEPS)
    assert int(s.step) == (NUM_STEPS - skipped if mode == "outside" else NUM_STEPS)
    assert _finite(params)


def test_nonfinite_parameters_stay_elementwise():
    # A NaN in one element of W_t must not spread to the other elements of W_{t+1}.
    tx = asgd.stale(optax.sgd(0.1), asgd.delays.constant(2))
    params = {"w": jnp.array([jnp.nan, 1.0, 2.0]), "b": jnp.array([3.0, jnp.inf])}
    state = tx.init(params)
    grads = {"w": jnp.array([1.0, 1.0, 1.0]), "b": jnp.array([1.0, 1.0])}
    updates, _ = jax.jit(tx.update)(grads, state, params)
    plain, _ = optax.sgd(0.1).update(grads, optax.sgd(0.1).init(params), params)
    chex.assert_trees_all_equal(updates, plain)


def _copies(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if re.search(r"= \S+ copy\(", line)]


@pytest.mark.parametrize("inner", [optax.sgd(0.01), optax.adam(0.01)], ids=["sgd", "adam"])
def test_donated_step_copies_neither_buffer_nor_params(inner):
    tx = asgd.stale(inner, asgd.delays.uniform(0, 8))
    params = {"w": jnp.ones((64, 32)), "b": jnp.zeros((32,))}
    x = jnp.ones((16, 64))

    def step(params, state):
        loss = lambda p: jnp.mean(jnp.tanh(x @ p["w"] + p["b"]) ** 2)  # noqa: E731
        grads = jax.grad(loss)(asgd.stale_params(state, params))
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    hlo = jax.jit(step, donate_argnums=(0, 1)).lower(params, state).compile().as_text()
    # Scalar counters may be copied; no array the size of a parameter or a snapshot may be.
    big = [line for line in _copies(hlo) if re.search(r"f32\[\d", line)]
    assert not big, "\n".join(big)


def test_ordering_is_a_bitwise_no_op_on_random_values():
    rng = np.random.default_rng(0)
    tx = asgd.stale(optax.sgd(1.0), asgd.delays.uniform(0, 2), seed=1)
    params = {"w": jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
    plain = optax.sgd(1.0)
    state, plain_state = tx.init(params), plain.init(params)
    for _ in range(6):
        grads = {"w": jnp.asarray(rng.normal(size=(5,)) * 1e30, jnp.float32)}
        grads["w"] = grads["w"].at[rng.integers(5)].set(rng.choice([jnp.nan, jnp.inf, -0.0]))
        updates, state = jax.jit(tx.update)(grads, state, params)
        want, plain_state = jax.jit(plain.update)(grads, plain_state, params)
        np.testing.assert_array_equal(
            np.asarray(updates["w"]).view(np.uint32), np.asarray(want["w"]).view(np.uint32)
        )
