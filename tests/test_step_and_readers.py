"""make_step (the core contract written once) and the public readers of the stale state."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import asgd_jax as asgd


def _loss(params, batch):
    x, y = batch
    return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)


def _problem(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    params = {"w": jax.random.normal(k1, (4, 2)), "b": jnp.zeros((2,))}
    x = jax.random.normal(k2, (8, 4))
    y = jax.random.normal(k3, (8, 2))
    return params, (x, y)


def _manual_step(tx, params, state, batch):
    at = asgd.stale_params(state, params)
    loss, grads = jax.value_and_grad(_loss)(at, batch)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


@pytest.mark.parametrize("jit", [False, True])
def test_make_step_is_the_core_contract_bitwise(jit):
    params, batch = _problem()
    tx = asgd.stale(optax.adam(0.05), asgd.delays.uniform(0, 3), seed=1)
    step = asgd.make_step(_loss, tx)
    manual = lambda p, s: _manual_step(tx, p, s, batch)
    mine = lambda p, s: step(p, s, batch)
    if jit:
        manual, mine = jax.jit(manual), jax.jit(mine)
    p1, s1 = params, tx.init(params)
    p2, s2 = params, tx.init(params)
    for _ in range(12):
        p1, s1, l1 = manual(p1, s1)
        p2, s2, l2 = mine(p2, s2)
        chex.assert_trees_all_equal((p1, s1, l1), (p2, s2, l2))


def test_make_step_without_stale_is_the_plain_step():
    params, batch = _problem()
    tx = optax.sgd(0.1)
    p, s, loss = asgd.make_step(_loss, tx)(params, tx.init(params), batch)
    want_loss, grads = jax.value_and_grad(_loss)(params, batch)
    updates, _ = tx.update(grads, tx.init(params), params)
    chex.assert_trees_all_equal((p, loss), (optax.apply_updates(params, updates), want_loss))


def test_make_step_reduce_and_aux():
    params, batch = _problem()
    tx = asgd.stale(optax.sgd(0.1), 2)
    loss_aux = lambda p, b: (_loss(p, b), jnp.float32(7.0))
    step = asgd.make_step(
        loss_aux, tx, reduce_grads=lambda g: jax.tree.map(lambda x: 2 * x, g), has_aux=True
    )
    p, _, (loss, aux) = step(params, tx.init(params), batch)
    assert float(aux) == 7.0
    plain = asgd.make_step(_loss, asgd.stale(optax.sgd(0.2), 2))
    p2, _, loss2 = plain(params, plain.tx.init(params), batch)
    chex.assert_trees_all_close(p, p2, rtol=1e-6)
    assert float(loss) == float(loss2)


def test_make_step_rejects_bad_arguments():
    with pytest.raises(TypeError, match="loss_fn"):
        asgd.make_step(3, optax.sgd(0.1))
    with pytest.raises(TypeError, match="`tx`"):
        asgd.make_step(_loss, "sgd")
    with pytest.raises(TypeError, match="reduce_grads"):
        asgd.make_step(_loss, optax.sgd(0.1), reduce_grads=1)


def test_stale_params_at_reads_what_later_updates_read():
    # A fixed τ sequence: check every (step t, ahead j, τ ≥ j) against the sequential run.
    taus = np.array([0, 1, 2, 3, 1, 0, 3, 2, 2, 3, 1, 3, 0, 2], np.int32)
    params, batch = _problem()
    tx = asgd.stale(optax.sgd(0.1), asgd.delays.trace(taus))
    step = jax.jit(asgd.make_step(_loss, tx))
    states, ps = [], []
    p, s = params, tx.init(params)
    for _ in range(len(taus) - 1):
        states.append(s)
        ps.append(p)
        p, s, _ = step(p, s, batch)
    for t in range(len(states) - 4):
        for j in range(4):
            tau = int(taus[t + j])
            if tau < j:
                continue
            got = asgd.stale_params_at(states[t], ps[t], ahead=j, staleness=tau)
            want = asgd.stale_params(states[t + j], ps[t + j])
            chex.assert_trees_all_equal(got, want)
    # ahead = 0 with the state's own τ is stale_params itself.
    s5 = states[5]
    chex.assert_trees_all_equal(
        asgd.stale_params_at(s5, ps[5], ahead=0, staleness=asgd.staleness(s5)),
        asgd.stale_params(s5, ps[5]),
    )


def test_upcoming_staleness_is_the_sequence_update_applies():
    params, batch = _problem()
    tx = asgd.stale(optax.sgd(0.1), asgd.delays.uniform(0, 5), seed=3)
    state = tx.init(params)
    ahead = np.asarray(jax.jit(asgd.upcoming_staleness, static_argnums=1)(state, 20))
    seen = []
    p = params
    step = jax.jit(asgd.make_step(_loss, tx))
    for _ in range(20):
        seen.append(int(asgd.staleness(state)))
        p, state, _ = step(p, state, batch)
    np.testing.assert_array_equal(ahead, seen)
    with pytest.raises(ValueError, match="num"):
        asgd.upcoming_staleness(state, 0)


def test_staleness_summary_numpy_and_jax():
    hist = np.array([[2, 0, 2], [0, 0, 0]])
    out = asgd.staleness_summary(hist)
    np.testing.assert_allclose(out["mean"], [1.0, 0.0])
    np.testing.assert_array_equal(out["max"], [2, 0])
    assert isinstance(out["mean"], np.ndarray)
    jout = jax.jit(asgd.staleness_summary)(jnp.asarray(hist))
    assert jout["mean"].dtype == jnp.float32
    np.testing.assert_allclose(jout["mean"], [1.0, 0.0])


def test_has_stale_state_and_delay_report():
    params, _ = _problem()
    assert not asgd.has_stale_state(optax.sgd(0.1).init(params))
    tx = asgd.stale(optax.sgd(0.1), asgd.delays.uniform(0, 2))
    state = optax.chain(optax.clip(1.0), tx).init(params)
    assert asgd.has_stale_state(state)
    assert asgd.delay_report(state) == {}
    model = asgd.workers.parameter_server(4, asgd.workers.exponential(1.0), max_delay=16)
    wstate = asgd.stale(optax.sgd(0.1), model).init(params)
    report = asgd.delay_report(wstate)
    assert set(report) == {"time", "worker", "worker_step", "dropped", "clipped"}
    assert float(report["time"]) > 0
